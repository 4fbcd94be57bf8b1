"""Tier 6: GPU. Opt-in with `./scripts/test.sh -m gpu` on a machine with CUDA."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine with -m gpu)"),
]


def test_dit_b2_bf16_step_on_gpu():
    from ddm.flow import FlowMatching
    from ddm.models import ModelConfig
    from ddm.models.build import build_model

    model = build_model(ModelConfig("DiT-B/2", (4, 32, 32), num_classes=1000)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, 4, 32, 32, device="cuda")
    y = torch.randint(0, 1000, (8,), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = FlowMatching().training_losses(model, x, y)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
