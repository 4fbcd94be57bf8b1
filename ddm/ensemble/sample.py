"""``ddm sample``: draw samples from the ensemble in the store; write a PNG grid and the arrays.

Outputs go to ``{store}/samples/<name>/``: ``grid.png``, ``samples.npy`` (float32, the model's
space: pixels in [-1, 1] or latents), ``labels.npy`` and ``meta.json`` (rule, steps, guidance, seed,
expert forwards and FLOPs per sample). A name that already holds samples made with other settings is
an error: outputs of two configs are never mixed.

Randomness comes from separate streams of one seed (``stream``): the initial noise, the labels and
the rules' own draws (the sample rule's expert choice). Sample i's initial noise depends on the
seed and i alone, not on the rule or the batch size, so every rule starts from the same noise.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ddm.core.logs import progress
from ddm.distributed.parallel import resolve_device
from ddm.ensemble.assemble import ensemble_encoder, load_ensemble
from ddm.ensemble.cost import ensemble_sampling_cost, forward_flops_of
from ddm.ensemble.settings import SampleConfig, SamplingConfig
from ddm.models.flow import FlowMatching, VelocityFn
from ddm.store import Store, layout

log = logging.getLogger("ddm.ensemble.sample")

# Random streams of one seed (see the module doc); STREAMS names this layout in output digests, so
# outputs drawn under an older layout are never taken for today's.
NOISE, LABELS, RULE_DRAWS = 0, 1, 2
STREAMS = 2
NOISE_BLOCK = 256  # initial noise is drawn in blocks of this many samples, each block its own stream


def stream(seed: int, which: int, index: int = 0) -> torch.Generator:
    """A CPU generator for stream ``which`` (NOISE, LABELS, RULE_DRAWS) of ``seed`` (and block
    ``index``): independent streams from numpy's SeedSequence, the same on every machine."""
    state = np.random.SeedSequence([seed, which, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def initial_noise(seed: int, start: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of samples start..start+n-1: a function of the seed and the indices only."""
    blocks = range(start // NOISE_BLOCK, (start + n - 1) // NOISE_BLOCK + 1)
    noise = torch.cat([torch.randn(NOISE_BLOCK, *shape, generator=stream(seed, NOISE, b)) for b in blocks])
    offset = start - blocks[0] * NOISE_BLOCK
    return noise[offset : offset + n]


def draw(
    flow: FlowMatching,
    velocity: Callable[[slice], VelocityFn],
    cfg: SamplingConfig,
    data_shape: tuple[int, ...],
    desc: str | None = None,
) -> torch.Tensor:
    """``cfg.num_samples`` samples in batches: each batch's initial noise from ``initial_noise`` of
    ``cfg.seed`` (drawn on the CPU, so a seed gives the same noise on every device and batch size),
    then the ODE from noise to data on ``cfg.device`` with ``velocity(rows)``, the velocity function
    for those rows."""
    if cfg.seed is None:
        raise ValueError("draw needs a config with its seed set (cfg.seeded())")
    device = resolve_device(cfg.device)
    chunks = []
    starts = range(0, cfg.num_samples, cfg.batch_size)
    for start in progress(starts, desc=desc, unit="batch", disable=desc is None):
        n = min(cfg.batch_size, cfg.num_samples - start)
        noise = initial_noise(cfg.seed, start, n, data_shape).to(device)
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


def read_prompts(cfg: SampleConfig) -> list[tuple[str, float]]:
    """(prompt, guidance) pairs: ``cfg.prompts`` at ``cfg.guidance``, then ``cfg.prompts_file``'s
    lines (blank ones skipped; "<guidance><TAB><prompt>" sets that prompt's guidance)."""
    pairs = [(p, cfg.guidance) for p in cfg.prompts]
    if cfg.prompts_file:
        import fsspec

        try:
            with fsspec.open(cfg.prompts_file, "r", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError as e:
            raise ValueError(f"prompts_file {cfg.prompts_file!r} does not exist") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            head, tab, tail = line.partition("\t")
            try:
                pairs.append((tail.strip(), float(head)) if tab else (line.strip(), cfg.guidance))
            except ValueError as e:
                raise ValueError(
                    f"{cfg.prompts_file} line {n}: {head!r} before the tab is not a guidance scale; write "
                    "'<guidance><TAB><prompt>' or the prompt alone"
                ) from e
    return pairs


def prompted(
    desc: dict, cfg: SampleConfig, device, store: str | None = None
) -> tuple[list[tuple[str, float]], object, float | torch.Tensor]:
    """For a text-conditioned ensemble (in the store at URL ``store``): each sample's (prompt,
    guidance) (the prompts cycled over ``num_samples``), a function from rows of samples to their
    embeddings by the experts' encoder (on ``device``; checked against the encoder each export
    recorded, ``ddm.ensemble.assemble.ensemble_encoder``), and the guidance per sample; for a
    class-conditional one, nothing (prompts are refused)."""
    pairs = read_prompts(cfg)
    text = desc.get("text")
    if not text:
        if pairs:
            raise ValueError("this ensemble is not text-conditioned: it takes no prompts (it samples its classes)")
        return [], None, cfg.guidance
    if not pairs:
        raise ValueError(
            f"this ensemble is text-conditioned ({text['encoder']}): give prompts=[...] or prompts_file=<one per line>"
        )
    if not store:
        raise ValueError("a text-conditioned ensemble samples with the text encoder of its store: give its URL")
    per_sample = [pairs[i % len(pairs)] for i in range(cfg.num_samples)]
    encoder = ensemble_encoder(Store(store), desc, device)
    unique = {p: i for i, p in enumerate(sorted({p for p, _ in per_sample}))}
    emb = encoder.encode_to_cpu(list(unique))  # each prompt once, kept in host memory
    index = torch.tensor([unique[p] for p, _ in per_sample])
    del encoder  # sampling needs only the embeddings

    def captions(rows: slice):  # the embeddings of samples ``rows``, on the device
        return emb[index[rows]].to(device)

    scales = torch.tensor([g for _, g in per_sample], device=device)
    return per_sample, captions, scales if len({g for _, g in per_sample}) > 1 else per_sample[0][1]


def sample(store: Store, cfg: SampleConfig) -> dict:
    """Sample ``cfg.num_samples`` images with the store's ensemble; returns the meta dict."""
    cfg = cfg.seeded()
    device = resolve_device(cfg.device)
    ens = load_ensemble(store, rule=cfg.rule or None, device=device)
    desc = ens.description
    # A prompts file's content counts, not only its path: the same name with other prompts is an error.
    listed = {"prompts": [[p, g] for p, g in read_prompts(cfg)]} if cfg.prompts_file else {}
    digest = layout.short_digest({**asdict(cfg), "streams": STREAMS, **listed})
    name = cfg.name or f"{str(ens.rule).replace(':', '_')}-s{cfg.seed}-{layout.ensemble_id(desc)}-{digest}"
    out = layout.samples_dir(name)
    meta = {"config": asdict(cfg), "rule": str(ens.rule), "ensemble": desc, "dir": out, "streams": STREAMS, **listed}
    if store.exists(f"{out}/meta.json"):
        old = store.read_json(f"{out}/meta.json")
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{store.url}/{out} holds samples made with other settings; choose another name=")
        log.info("samples already in %s/%s", store.url, out)
        return old
    flow = FlowMatching(**desc["flow"])
    rule_draws = stream(cfg.seed, RULE_DRAWS)
    num_classes = int(desc["num_classes"])
    labels = (torch.arange(cfg.num_samples) % num_classes).to(device) if num_classes else None
    prompts, captions, guidance = prompted(desc, cfg, device, store.url)

    def velocity(rows: slice) -> VelocityFn:
        if captions is not None:
            scale = guidance[rows] if isinstance(guidance, torch.Tensor) else guidance
            return ens.velocity_fn(y=captions(rows), guidance_scale=scale, generator=rule_draws)
        y = None if labels is None else labels[rows]
        return ens.velocity_fn(y=y, guidance_scale=cfg.guidance, generator=rule_draws)

    x = draw(flow, velocity, cfg, tuple(desc["data_shape"]), desc="sample").numpy()
    flops = forward_flops_of(store, desc)
    st = ens.stats
    meta.update(
        ensemble_sampling_cost(
            flops["experts"], flops["router"], st.expert_evals, st.router_evals, st.velocity_evals, cfg.evals_per_sample
        )
    )
    meta["experts_loaded"] = [e.loaded for e in ens.experts]
    for fname, array in (("samples.npy", x), ("labels.npy", None if labels is None else labels.cpu().numpy())):
        if array is not None:
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=False)
            store.write_bytes(f"{out}/{fname}", buf.getvalue())
    if prompts:  # each sample's prompt and guidance, in sample order
        rows = [{"prompt": p, "guidance": g} for p, g in prompts]
        store.write_bytes(f"{out}/prompts.json", json.dumps(rows, indent=1).encode())
    if x.shape[1] in (1, 3):
        store.write_bytes(f"{out}/grid.png", image_grid(x[:64]))
    store.write_bytes(f"{out}/meta.json", json.dumps(meta, indent=2).encode())  # last: marks the set complete
    log.info("%d samples (%s) -> %s/%s", cfg.num_samples, meta["rule"], store.url, out)
    return meta
