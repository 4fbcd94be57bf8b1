"""The GPU code paths that a CPU can run: bf16 autocast training through the real train function,
compiled models without graph breaks, bf16 sampling, device-independent noise.

On a GPU these paths are the defaults (``engine.precision=auto`` and ``engine.compile`` pick bf16
and torch.compile there); here they are switched on by hand, so a defect in them fails the
default test run and not only the opt-in GPU tier (``tests/test_gpu.py``).
"""

import pytest
import torch

from ddm.ensemble.sample import SamplingConfig, draw
from ddm.models.build import build_model, build_router
from ddm.models.config import ModelConfig
from ddm.models.flow import FlowMatching
from tests.helpers import assert_same_weights, exported, summary
from tests.test_train import fresh, prepared, run_cli  # noqa: F401

CFG = ModelConfig("DiT-Tiny/2", (1, 8, 8), num_classes=10)


def test_bf16_job_trains_and_resumes_exactly(prepared, tmp_path):  # noqa: F811
    """DeepSpeed's bf16 mode cast the weights and broke at the first step ("Input type (float) and
    bias type (BFloat16)"); bf16 is autocast over fp32 weights, and a killed bf16 run resumes to the
    weights of an uninterrupted one."""
    bf16 = ["engine.precision=bf16", "steps=6", "checkpoint.every=3"]
    straight = fresh(prepared, tmp_path, "straight")
    s = summary(run_cli(straight, *bf16))
    assert s["bf16"] is True and s["step"] == 6 and s["final_loss"] < 10
    crashed = fresh(prepared, tmp_path, "crashed")
    out = run_cli(crashed, *bf16, env={"DDM_FAULT": "step:5", "DDM_FAULT_ONCE": str(tmp_path / "once")})
    assert out.returncode != 0  # killed at step 5, after the step-3 commit
    assert summary(run_cli(crashed, *bf16))["startup"]["resumed_from"] == 3
    assert_same_weights(exported(straight), exported(crashed))
    assert all(v.dtype == torch.float32 for v in exported(straight).values())  # the EMA export stays fp32


def test_the_bf16_engine_runs_matmuls_in_bf16_over_fp32_weights():
    """What engine.precision=bf16 (the GPU default) means, checked inside the DeepSpeed engine."""
    from ddm.distributed.parallel import ensure_process_group
    from ddm.train.engine import build_engine
    from ddm.train.job import EngineConfig, JobConfig

    ensure_process_group()
    cfg = JobConfig(model=CFG, global_batch_size=4, engine=EngineConfig(zero_stage=1, precision="bf16"))
    engine = build_engine(build_model(CFG), cfg, on_gpu=False)
    seen = []
    engine.module.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 10, (4,))
    out = engine(x, t, y)
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}  # the weights stay fp32
    # ZeRO reduces every gradient in fp32 (engine.reduce_dtype's default), bf16 only when asked.
    assert set(engine.optimizer.ipg_buckets) == {torch.float32}
    cfg = JobConfig(
        model=CFG, global_batch_size=4, engine=EngineConfig(zero_stage=1, precision="bf16", reduce_dtype="bf16")
    )
    assert set(build_engine(build_model(CFG), cfg, on_gpu=False).optimizer.ipg_buckets) == {
        torch.float32,
        torch.bfloat16,
    }


@pytest.mark.parametrize("train", [True, False])
def test_dit_and_router_compile_without_graph_breaks(train):
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.randint(0, 10, (4,))
    for model in (build_model(CFG), build_router(CFG, 3)):
        model.train(train)
        explanation = torch._dynamo.explain(model)(x, t, y)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Random non-zero weights: a zero-initialised output layer would make every velocity 0."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_bf16_sampling_is_close_to_fp32_and_keeps_an_fp32_state():
    model = _trained_looking(build_model(CFG))
    labels = torch.arange(16) % 10

    def run(precision: str) -> torch.Tensor:
        cfg = SamplingConfig(
            num_samples=16, steps=8, sampler="heun", batch_size=8, device="cpu", precision=precision, seed=0
        )
        return draw(FlowMatching(), lambda rows: lambda x, t: model(x, t, labels[rows]), cfg, (1, 8, 8))

    fp32, bf16 = run("fp32"), run("bf16")
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # bf16 autocast was on
    assert (fp32 - bf16).abs().max() < 0.05 * fp32.abs().max()


def test_sampling_noise_comes_from_a_cpu_stream_whatever_the_device():
    """The initial noise of a seed is the same on every device: samples on a GPU and on the CPU
    differ only by arithmetic, never by their starting points."""
    seen = []

    def velocity(rows):
        def v(x, t):
            if float(t[0]) == 1.0:
                seen.append(x.clone())
            return torch.zeros_like(x)

        return v

    from ddm.ensemble.sample import initial_noise

    cfg = SamplingConfig(num_samples=6, steps=2, sampler="euler", batch_size=6, device="cpu", seed=7)
    out = draw(FlowMatching(), velocity, cfg, (3,))
    assert torch.equal(seen[0], initial_noise(7, 0, 6, (3,)))  # drawn on the CPU
    assert torch.equal(out, seen[0])  # a zero velocity leaves the noise where it was


@pytest.mark.slow
def test_compiled_job_matches_the_eager_one(prepared, tmp_path):  # noqa: F811
    """engine.compile=true (the GPU default) through the real train function: the compiled model
    trains to the eager model's weights up to float reassociation. Without label dropout: Inductor
    draws the forward's random numbers (torch.rand in LabelEmbedder.token_drop) from its own Philox
    stream, not eager's generator, so the two runs would drop different labels. About 30 s on 2 CPU
    cores (Inductor's cache cold)."""
    job = ["steps=4", "checkpoint.every=4", "model.class_dropout_prob=0"]
    eager = fresh(prepared, tmp_path, "eager")
    summary(run_cli(eager, *job))
    compiled = fresh(prepared, tmp_path, "compiled")
    s = summary(run_cli(compiled, *job, "engine.compile=true"))
    assert s["compiled"] is True
    a, b = exported(eager), exported(compiled)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ensemble_samples_under_bf16_autocast():
    """Sparse rules add expert velocities into the fp32 state with index_add_, which refuses bf16
    inputs: the ensemble casts what its experts return."""
    from ddm.ensemble.combine import Ensemble, Rule

    experts = [_trained_looking(build_model(CFG)) for _ in range(3)]
    router = _trained_looking(build_router(CFG, 3))
    labels, parts = torch.arange(16) % 10, torch.arange(16) % 3  # each expert gets some rows: index_add_
    out = {}
    for precision in ("fp32", "bf16"):
        ens = Ensemble(experts, router, Rule.parse("oracle"))

        def velocity(rows, ens=ens):
            return ens.velocity_fn(y=labels[rows], partition=parts[rows])

        cfg = SamplingConfig(
            num_samples=16, steps=4, sampler="euler", batch_size=16, device="cpu", precision=precision, seed=0
        )
        out[precision] = draw(FlowMatching(), velocity, cfg, (1, 8, 8))
    assert torch.isfinite(out["bf16"]).all() and not torch.equal(out["bf16"], out["fp32"])
    assert (out["bf16"] - out["fp32"]).abs().max() < 0.05 * out["fp32"].abs().max()


def test_ema_restores_onto_the_device_of_the_weights():
    """Checkpoints hold CPU tensors; a GPU job's EMA must come back on its GPU (checked here with
    the meta device, which is as foreign to the CPU as CUDA is)."""
    from ddm.train.ema import EMA

    with torch.device("meta"):
        model = build_model(CFG)
    ema = EMA(model, 0.99)
    ema.load_state_dict({"shadow": {k: torch.zeros(v.shape) for k, v in ema.shadow.items()}, "num_updates": 3})
    assert {v.device.type for v in ema.shadow.values()} == {"meta"}
    assert {v.dtype for v in ema.shadow.values()} == {torch.float32}


def test_the_gpu_tier_needs_no_ray_scikit_learn_or_s3_client():
    """scripts/gpu-check.sh runs on bare GPU machines: the train function, sampling and the GPU
    tests must import with Ray, scikit-learn, s3fs, moto and matplotlib absent."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "for name in ('ray', 'sklearn', 's3fs', 'moto', 'matplotlib'): sys.modules[name] = None\n"
        "import ddm.train.trainer, ddm.train.__main__, ddm.ensemble.sample, ddm.ensemble.assemble, tests.test_gpu\n"
        "import bench.gpu_mfu, bench.gpu_sampling\n"
    )
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
