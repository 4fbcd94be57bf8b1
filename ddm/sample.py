"""``ddm sample``: draw samples from the ensemble in the store; write a PNG grid and the arrays.

Outputs go to ``{store}/samples/<name>/``: ``grid.png``, ``samples.npy`` (float32, the model's
space: pixels in [-1, 1] or latents), ``labels.npy`` and ``meta.json`` (rule, steps, guidance, seed,
expert forwards per sample). A name that already holds samples made with other settings is an
error: outputs of two configs are never mixed.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ddm import layout
from ddm.assemble import load_ensemble
from ddm.flow import SAMPLERS, FlowMatching, VelocityFn
from ddm.logs import progress
from ddm.parallel import resolve_device
from ddm.store import Store

log = logging.getLogger("ddm.sample")


@dataclass(frozen=True)
class SamplingConfig:
    """How samples are drawn: ``ddm sample`` and ``ddm evaluate`` share these settings."""

    num_samples: int = 64
    steps: int = 50
    sampler: str = "heun"
    guidance: float = 1.0  # classifier-free guidance scale (1 = none)
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"  # auto: a CUDA GPU when there is one, else the CPU; or cpu, cuda, cuda:1, ...
    precision: str = "fp32"  # bf16: the networks run under bf16 autocast; the ODE state stays fp32

    def __post_init__(self) -> None:
        for name in ("num_samples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is unknown; choose one of {list(SAMPLERS)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")

    @property
    def evals_per_sample(self) -> int:
        """Velocity evaluations per sample: one per Euler step, two per Heun step."""
        return self.steps * (2 if self.sampler == "heun" else 1)


@dataclass(frozen=True)
class SampleConfig(SamplingConfig):
    rule: str = ""  # empty: the ensemble's default rule (top-1 unless assembled otherwise)
    name: str = ""  # output folder under samples/; empty: <rule>-s<seed>-<ensemble id>-<settings digest>


def draw(
    flow: FlowMatching,
    velocity: Callable[[slice], VelocityFn],
    cfg: SamplingConfig,
    data_shape: tuple[int, ...],
    generator: torch.Generator,
    desc: str | None = None,
) -> torch.Tensor:
    """``cfg.num_samples`` samples in batches, on the CPU: each batch's initial noise from
    ``generator`` (a CPU generator, so a seed gives the same noise on every device), then the ODE
    from noise to data on ``cfg.device`` with ``velocity(rows)``, the velocity function for those rows."""
    device = resolve_device(cfg.device)
    chunks = []
    starts = range(0, cfg.num_samples, cfg.batch_size)
    for start in progress(starts, desc=desc, unit="batch", disable=desc is None):
        n = min(cfg.batch_size, cfg.num_samples - start)
        noise = torch.randn(n, *data_shape, generator=generator).to(device)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            x = flow.sample(_fp32(velocity(slice(start, start + n))), noise, cfg.steps, cfg.sampler)
        chunks.append(x.float().cpu())
    return torch.cat(chunks)


def _fp32(velocity: VelocityFn) -> VelocityFn:
    """Velocities as fp32, so the ODE state keeps fp32 under bf16 autocast."""
    return lambda x, t: velocity(x, t).float()


def image_grid(images: np.ndarray, columns: int = 8) -> bytes:
    """(N, C, H, W) in [-1, 1] -> PNG bytes of a grid (1-channel as grayscale, 3 as RGB)."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"a PNG grid needs 1 or 3 channels, got {c} (latents need decoding first)")
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    pixels = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for i, img in enumerate(pixels):
        r, col = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
    scale = max(1, 512 // max(grid.shape[:2]))  # small images (digits) are upscaled to be seen
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    )
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def sample(store: Store, cfg: SampleConfig) -> dict:
    """Sample ``cfg.num_samples`` images with the store's ensemble; returns the meta dict."""
    device = resolve_device(cfg.device)
    ens = load_ensemble(store, rule=cfg.rule or None, device=device)
    desc = ens.description
    digest = layout.short_digest(asdict(cfg))
    name = cfg.name or f"{str(ens.rule).replace(':', '_')}-s{cfg.seed}-{layout.ensemble_id(desc)}-{digest}"
    out = layout.samples_dir(name)
    meta = {"config": asdict(cfg), "rule": str(ens.rule), "ensemble": desc, "dir": out}
    if store.exists(f"{out}/meta.json"):
        old = store.read_json(f"{out}/meta.json")
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{store.url}/{out} holds samples made with other settings; choose another name=")
        log.info("samples already in %s/%s", store.url, out)
        return old
    flow = FlowMatching(**desc["flow"])
    g = torch.Generator().manual_seed(cfg.seed)
    num_classes = int(desc["num_classes"])
    labels = (torch.arange(cfg.num_samples) % num_classes).to(device) if num_classes else None

    def velocity(rows: slice) -> VelocityFn:
        return ens.velocity_fn(y=None if labels is None else labels[rows], guidance_scale=cfg.guidance, generator=g)

    x = draw(flow, velocity, cfg, tuple(desc["data_shape"]), g, desc="sample").numpy()
    meta["expert_forwards_per_sample"] = ens.stats.expert_forwards_per_eval * cfg.evals_per_sample
    meta["experts_loaded"] = [e.loaded for e in ens.experts]
    for fname, array in (("samples.npy", x), ("labels.npy", None if labels is None else labels.cpu().numpy())):
        if array is not None:
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=False)
            store.write_bytes(f"{out}/{fname}", buf.getvalue())
    if x.shape[1] in (1, 3):
        store.write_bytes(f"{out}/grid.png", image_grid(x[:64]))
    store.write_bytes(f"{out}/meta.json", json.dumps(meta, indent=2).encode())  # last: marks the set complete
    log.info("%d samples (%s) -> %s/%s", cfg.num_samples, meta["rule"], store.url, out)
    return meta
