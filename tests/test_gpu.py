"""Tier 6: GPU. Opt-in with `./scripts/test.sh -m gpu` (or `scripts/gpu-check.sh`) on a CUDA machine.

Every job kind trains on CUDA through the real train function (``python -m ddm.train``: the
function Ray Train workers run; Ray itself is not needed here), with the GPU defaults: bf16
autocast over fp32 weights and, for the expert, torch.compile. Each is stopped and resumed and must
reach the weights of an uninterrupted run; exports load and sample on the CPU; ensemble sampling on
CUDA matches the CPU's; an MoE expert trains on CUDA; one bf16 step on the GPU matches an fp32 step
on the CPU. Needs only torch, DeepSpeed, pyarrow, fsspec, safetensors, PyYAML, tqdm and Pillow.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ddm.store.layout import distilled_dir, ensemble_id
from tests.helpers import child_env, digits_store, exported, summary

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine with -m gpu)"),
]

JOB = ["model.arch=DiT-Tiny/2", "model.data_shape=[1,8,8]", "model.num_classes=10", "global_batch_size=32"]
JOB += ["log_every=5", "seed=3", "lr=0.0003", "engine.zero_stage=1"]
KINDS = {
    "expert": ["partition=0", "engine.compile=true"],  # the GPU default; compiled once, cached on disk after
    "monolith": ["partition=-1", "engine.compile=false"],
    "router": ["job=router", "flow.time_sampling=uniform", "engine.compile=false"],
}
RUN_DIRS = {"expert": "experts/00", "monolith": "monolith", "router": "router"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """Digits in 2 partitions (data and partitions only; no k-means needed here)."""
    return digits_store(str(tmp_path_factory.mktemp("digits")), with_jobs=False)


def copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def start(store: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ddm.train", f"store={store}", *JOB, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(env))


def finish(proc: subprocess.Popen, timeout: float = 400) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_resumed_weights(a: dict, b: dict) -> None:
    """A resumed run against an uninterrupted one. Bitwise when the kernels are deterministic; the
    bound covers SDPA's backward, whose accumulation order may vary between runs: after the ~10
    Adam steps since the resume, two runs can differ by at most about 2 x steps x lr (2e-3 here),
    while a wrong restore (optimizer moments, EMA, RNG streams or data position) differs by far more
    in most weights, which the mean catches."""
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    mean = sum((a[k].float() - b[k].float()).abs().sum().item() for k in a) / sum(v.numel() for v in a.values())
    assert worst < 6e-3 and mean < 1e-5, (worst, mean)


@pytest.mark.parametrize("kind", list(KINDS))
def test_job_kind_trains_on_cuda_stops_and_resumes(digits, tmp_path, kind):
    straight, stopped = copy(digits, tmp_path / "straight"), copy(digits, tmp_path / "stopped")
    kill = {"DDM_FAULT": "step:15", "DDM_FAULT_ONCE": str(tmp_path / "killed")}
    runs = [start(straight, *KINDS[kind], "steps=20", "checkpoint.every=10"),
            start(stopped, *KINDS[kind], "steps=20", "checkpoint.every=10", env=kill)]  # fmt: skip
    s = summary(finish(runs[0]))
    assert finish(runs[1]).returncode != 0  # killed at step 15, after the step-10 commit
    assert s["device"].startswith("cuda") and s["bf16"] is True
    assert s["compiled"] is (kind == "expert")
    resumed = summary(finish(start(stopped, *KINDS[kind], "steps=20", "checkpoint.every=10")))
    assert resumed["startup"]["resumed_from"] == 10 and resumed["step"] == 20
    a, b = exported(straight, RUN_DIRS[kind]), exported(stopped, RUN_DIRS[kind])
    assert all(v.dtype == torch.float32 for v in a.values())  # the EMA stays fp32 under bf16
    assert_resumed_weights(a, b)


@pytest.fixture(scope="module")
def ensemble_store(digits, tmp_path_factory) -> str:
    """Two experts and a router trained on the GPU, assembled."""
    from ddm.ensemble.assemble import assemble
    from ddm.store import Store

    store = copy(digits, tmp_path_factory.mktemp("ensemble") / "store")
    common = ["steps=30", "checkpoint.every=30", "engine.compile=false"]
    runs = [start(store, "partition=0", *common), start(store, "partition=1", *common)]
    runs.append(start(store, "job=router", "flow.time_sampling=uniform", *common))
    for run in runs:
        summary(finish(run))
    assemble(Store(store))
    return store


def test_distill_on_cuda_stops_and_resumes(ensemble_store, tmp_path):
    straight, stopped = copy(ensemble_store, tmp_path / "straight"), copy(ensemble_store, tmp_path / "stopped")
    job = ["job=distill", "partition=-1", "steps=20", "checkpoint.every=10", "engine.compile=false"]
    runs = [
        start(straight, *job),
        start(stopped, *job, env={"DDM_FAULT": "step:15", "DDM_FAULT_ONCE": str(tmp_path / "k")}),
    ]
    s = summary(finish(runs[0]))
    assert finish(runs[1]).returncode != 0
    assert s["device"].startswith("cuda") and s["final_loss"] > 0
    assert summary(finish(start(stopped, *job)))["startup"]["resumed_from"] == 10
    teacher = json.load(open(os.path.join(straight, "ensemble.json")))
    run_dir = distilled_dir(ensemble_id(teacher))
    assert_resumed_weights(exported(straight, run_dir), exported(stopped, run_dir))


def test_gpu_exports_sample_on_the_cpu_and_cuda_matches_cpu(ensemble_store):
    from ddm.ensemble.assemble import load_ensemble
    from ddm.ensemble.sample import SamplingConfig, draw
    from ddm.models.flow import FlowMatching
    from ddm.store import Store

    labels = torch.arange(64) % 10
    out = {}
    for device in ("cpu", "cuda"):
        ens = load_ensemble(Store(ensemble_store), device=device)

        def velocity(rows, ens=ens, device=device):
            return ens.velocity_fn(y=labels[rows].to(device))

        cfg = SamplingConfig(num_samples=64, steps=10, sampler="heun", batch_size=32, device=device, seed=0)
        out[device] = draw(FlowMatching(), velocity, cfg, (1, 8, 8))
        assert [e.loaded for e in ens.experts] == [True, True]
    assert torch.isfinite(out["cpu"]).all()
    # Same noise, same routing; fp32 on both (the GPU's matmuls may use TF32 when a process enabled it).
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=0, atol=2e-2)


def test_moe_expert_trains_on_cuda(digits, tmp_path):
    store = copy(digits, tmp_path / "moe")
    moe = ["model.moe.num_experts=4", "model.moe.every=1", "engine.compile=false"]
    s = summary(finish(start(store, "partition=0", "steps=10", "checkpoint.every=10", *moe)))
    assert s["device"].startswith("cuda") and s["step"] == 10 and torch.isfinite(torch.tensor(s["final_loss"]))
    weights = exported(store)
    assert sum(".deepspeed_experts." in k for k in weights) > 0


def test_a_bf16_step_on_cuda_matches_an_fp32_step_on_the_cpu():
    """The loss and gradient of one training step of a DiT-B/2 under the GPU's bf16 autocast agree
    with fp32 on the CPU for the same weights, batch, times and noise: only a right step passes."""
    from ddm.models.build import build_model
    from ddm.models.config import ModelConfig
    from ddm.models.flow import FlowMatching

    torch.manual_seed(0)
    cpu = build_model(ModelConfig("DiT-B/2", (4, 32, 32), num_classes=1000, class_dropout_prob=0.0))
    with torch.no_grad():  # leave the zero init: the velocity and gradients of a zero output are degenerate
        for p in cpu.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    gpu = build_model(ModelConfig("DiT-B/2", (4, 32, 32), num_classes=1000, class_dropout_prob=0.0))
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, 32, 32, generator=g), torch.randint(0, 1000, (16,), generator=g)
    t, noise = torch.rand(16, generator=g), torch.randn(16, 4, 32, 32, generator=g)
    flow = FlowMatching()
    loss_cpu = flow.training_losses(cpu, x, y, t=t, noise=noise)["loss"].mean()
    loss_cpu.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_gpu = flow.training_losses(gpu, x.cuda(), y.cuda(), t=t.cuda(), noise=noise.cuda())["loss"].mean()
    assert loss_gpu.dtype == torch.float32  # losses are computed in fp32
    loss_gpu.backward()
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu.detach(), rtol=2e-2, atol=0)
    g_cpu = torch.cat([p.grad.flatten() for p in cpu.parameters()])
    g_gpu = torch.cat([p.grad.flatten().cpu() for p in gpu.parameters()])
    assert torch.nn.functional.cosine_similarity(g_cpu, g_gpu, dim=0) > 0.99
