"""Exports: a trained job's EMA model as safetensors + JSON, written once and read by many.

``{job}/export/`` holds ``model.safetensors`` (the EMA weights, no pickle), ``config.json`` (the
job kind, model and flow settings, step, partition) and the ``MANIFEST.json`` that commits them.
``write_export`` is called by every rank of a training job (expert-parallel MoE weights are
gathered to rank 0); ``LazyModel`` reads an export on first use, checking it against a known
sha256, from a content-addressed local cache when the store is remote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddm import layout
from ddm.config import to_dict
from ddm.job import JobConfig
from ddm.models.build import build_model, build_router
from ddm.models.config import ModelConfig, MoEConfig, TextConfig, architecture, flow_description
from ddm.parallel import ParallelState, expert_index, shift_expert
from ddm.secrets import redact_url
from ddm.store import NotCommittedError, Store

log = logging.getLogger("ddm.exports")

# config.json of an export: 2 adds kind, format_version, architecture and probability_path (ddm 0.2).
EXPORT_FORMAT = 2


def write_export(
    run: Store,
    weights: dict[str, torch.Tensor],
    cfg: JobConfig,
    ps: ParallelState,
    step: int,
    extra: dict | None = None,
) -> None:
    """The EMA model as safetensors + config.json under ``export/``, committed by a manifest.

    With expert parallelism each rank holds some MoE experts; their weights are gathered to rank 0
    (from the first ep ranks only) under global expert indices, so the export is one complete
    model. Every rank must call this.
    ``extra`` goes into config.json (a router's ``num_partitions``).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    ep = cfg.model.moe.ep_size if cfg.model.moe.enabled else 1
    if ep > 1:
        first = ps.ep_rank * (cfg.model.moe.num_experts // ep)
        mine = {shift_expert(n, first): t for n, t in state.items() if expert_index(n) is not None}
        # To rank 0 only, and only from ranks 0..ep-1 (they hold every expert once): an all-gather
        # would copy every expert to every rank (a DiT-XL MoE of 8 experts on 64 GPUs: ~38 GB each).
        gathered: list | None = [None] * ps.world_size if ps.is_main else None
        dist.gather_object(mine if ps.rank < ep else {}, gathered, dst=0)
        if ps.is_main:
            state = {k: v for k, v in state.items() if expert_index(k) is None}
            for part in gathered[:ep]:
                state.update(part)
    if not ps.is_main:
        return
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:  # the trainer stops before this; anything else that exports must not publish them
        raise ValueError(
            f"not exporting {run.url}: {len(nonfinite)} tensors are not finite (e.g. {nonfinite[:3]}); the model "
            "diverged. Lower lr (or check the data) and train it again"
        )
    extra = extra or {}
    config = {
        "kind": "ddm.export",
        "format_version": EXPORT_FORMAT,
        "job": cfg.job,
        "model": to_dict(cfg.model),
        "flow": to_dict(cfg.flow),
        # Self-describing: enough to rebuild and sample the network without ddm (examples/plain_dit.py).
        "architecture": architecture(cfg.model, extra.get("num_partitions") if cfg.job == "router" else None),
        "probability_path": flow_description(cfg.flow),
        "step": step,
        "partition": cfg.data_partition,
        "ema_decay": cfg.ema_decay,
    }
    if cfg.job == "distill":
        config["teacher"] = cfg.teacher
    config.update(extra)
    weights_bytes = save_safetensors(state, metadata={"step": str(step)})
    known = {
        layout.EXPORT_WEIGHTS: run.write_hashed(f"{layout.EXPORT}/{layout.EXPORT_WEIGHTS}", weights_bytes),
        layout.EXPORT_CONFIG: run.write_hashed(
            f"{layout.EXPORT}/{layout.EXPORT_CONFIG}", json.dumps(config, indent=2, allow_nan=False).encode()
        ),
    }
    run.commit(
        layout.EXPORT,
        list(known),
        meta={"kind": "ddm.export", "format_version": EXPORT_FORMAT, "step": step},
        known=known,
    )
    log.info("exported the EMA model of %s at step %d", cfg.run_dir, step)


def read_export(store: Store, run_dir: str) -> tuple[dict, dict]:
    """(config.json, manifest) of the committed, checksum-verified export in ``run_dir``."""
    run = store.child(layout.safe_relpath(run_dir, f"the export folder of {store.url}"))
    try:
        manifest = run.verify(layout.EXPORT)
    except NotCommittedError as e:
        raise ValueError(f"{store.url}/{run_dir} has no committed export; train it first ({e})") from e
    return export_config(run, run.read_verified(layout.EXPORT, layout.EXPORT_CONFIG)), manifest


def export_config(run: Store, raw: bytes) -> dict:
    """An export's config.json, parsed and checked: a JSON object of a format this ddm reads."""
    where = f"{run.url}/{layout.EXPORT}/{layout.EXPORT_CONFIG}"
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); train the job again to rewrite its export") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{where} is not an export's config (no model settings); it was not written by ddm")
    version = config.get("format_version", 1)
    if not isinstance(version, int) or version > EXPORT_FORMAT:
        raise ValueError(
            f"{where} was written by a newer ddm (export format {version}; this ddm {_version()} reads up to "
            f"{EXPORT_FORMAT}): upgrade ddm to use it"
        )
    return config


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddm")
    except PackageNotFoundError:
        return "(unknown version)"


def init_from_export(model: torch.nn.Module, source: str, store: Store, experts: tuple[int, int] | None = None) -> dict:
    """Load ``source`` into ``model``: a committed ddm export (a run folder of ``store``, or a URL
    of one), a facebookresearch/DiT checkpoint or a diffusers DiT folder (``ddm.models.pretrained``).
    Every tensor must be there with the shape the model has: a mismatch is a ValueError naming the
    tensors, raised before anything is trained. ``experts``: (first, count) of the MoE experts this
    rank holds under expert parallelism (an export holds every expert under its global index; the
    rank's model numbers its own from 0). Returns what the job records: {"url", "sha256"} of the
    weights, and for outside formats the format and what was dropped."""
    from ddm.models.pretrained import load_pretrained, source_kind
    from ddm.models.pretrained_io import split

    kind = source_kind(source, store)
    if kind != "ddm":
        tensors, record = load_pretrained(source, store, model, kind)
        _load_checked(model, tensors, source, "Give the job the source's sizes (model.arch, model.data_shape, "
                      "model.num_classes)")  # fmt: skip
        return record
    parent, run_dir = split(source)
    where = Store(parent) if parent else store
    _, manifest = read_export(where, run_dir)
    raw = where.child(run_dir).read_verified(layout.EXPORT, layout.EXPORT_WEIGHTS)
    tensors = load_safetensors(raw)
    upgrade = getattr(model, "upgrade_state_dict", None)  # exports of ddm 0.1 use older names
    tensors = upgrade(tensors) if upgrade else tensors
    if experts is not None:
        tensors = rank_experts(tensors, *experts)
    _load_checked(model, tensors, source, "Give the job the source's model settings (its export/config.json)")
    return {"url": redact_url(f"{where.url}/{run_dir}"), "sha256": weights_sha256(manifest)}


def rank_experts(tensors: dict, first: int, count: int) -> dict:
    """An export's tensors as a rank of expert parallelism holds them: the MoE experts
    ``first .. first + count - 1`` under local indices 0 .. count - 1 (``write_export`` in reverse),
    the other experts left out, every other tensor as it is."""
    mine = {}
    for name, tensor in tensors.items():
        i = expert_index(name)
        if i is None:
            mine[name] = tensor
        elif first <= i < first + count:
            mine[shift_expert(name, -first)] = tensor
    return mine


def _load_checked(model: torch.nn.Module, tensors: dict, source: str, fix: str) -> None:
    own = model.state_dict()
    missing = sorted(own.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - own.keys())
    shapes = [k for k in sorted(own.keys() & tensors.keys()) if tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})"] if missing else []
        parts += [f"{len(unexpected)} not in this model (e.g. {unexpected[:3]})"] if unexpected else []
        parts += [
            f"{len(shapes)} of another shape (e.g. "
            + ", ".join(f"{k}: {tuple(tensors[k].shape)} there, {tuple(own[k].shape)} here" for k in shapes[:3])
            + ")"
        ] if shapes else []  # fmt: skip
        raise ValueError(
            f"init_from={source}: its weights do not fit this job's model: " + "; ".join(parts) + f". {fix}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def check_weights(store: Store, run_dir: str, export_config: dict) -> None:
    """The export's tensors (names, shapes, dtypes, read from the safetensors header only) are the
    ones its config.json builds; ValueError naming the export and the first tensor that differs."""
    with store.child(run_dir).open_read(f"{layout.EXPORT}/{layout.EXPORT_WEIGHTS}") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > 100_000_000:  # safetensors' own limit: a header that claims more is not one
            raise ValueError(f"{store.url}/{run_dir}/{layout.EXPORT}/{layout.EXPORT_WEIGHTS} is not a safetensors file")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    with torch.device("meta"):  # the architecture without allocating it
        module = build_from_export(export_config)
    upgrade = getattr(module, "upgrade_state_dict", None)  # exports of ddm 0.1 use older names
    stored = upgrade(header) if upgrade else header
    expected = module.state_dict()
    where = f"{store.url}/{run_dir}/{layout.EXPORT}"
    for name in sorted(set(expected) | set(stored)):
        if name not in stored:
            raise ValueError(
                f"{where} lacks the tensor {name!r} that its config ({export_config['model']['arch']}) has"
            )
        if name not in expected:
            raise ValueError(
                f"{where} holds a tensor {name!r} that its config ({export_config['model']['arch']}) has not"
            )
        shape, dtype = tuple(stored[name]["shape"]), _SAFETENSORS_DTYPES.get(stored[name]["dtype"])
        if shape != tuple(expected[name].shape) or dtype != expected[name].dtype:
            raise ValueError(
                f"{where}: tensor {name!r} is {stored[name]['dtype']} {list(shape)} but its config makes "
                f"{expected[name].dtype} {list(expected[name].shape)}"
            )


def weights_sha256(manifest: dict) -> str:
    return manifest["files"][layout.EXPORT_WEIGHTS]["sha256"]


def model_config(export_config: dict) -> ModelConfig:
    """The ModelConfig of an export's config.json, for one process (MoE experts all local)."""
    m = dict(export_config["model"])
    moe = dict(m.pop("moe"), ep_size=1)  # one process holds every MoE expert at sampling time
    text = TextConfig(**m.pop("text", {}))  # exports before text models have none
    return ModelConfig(**{**m, "data_shape": tuple(m["data_shape"]), "moe": MoEConfig(**moe), "text": text})


def build_from_export(export_config: dict) -> torch.nn.Module:
    """An untrained module of the export's architecture: a router for router exports, else a velocity model."""
    if export_config.get("job") == "router":
        return build_router(model_config(export_config), export_config["num_partitions"])
    return build_model(model_config(export_config))


def default_cache_dir(store: Store) -> str | None:
    """Where exports of a remote store are cached: $DDM_CACHE_DIR, else ~/.cache/ddm/exports
    (none for local stores, which are read in place; DDM_CACHE_DIR=off disables caching)."""
    env = os.environ.get("DDM_CACHE_DIR")
    if env == "off" or (env is None and store.protocol in ("file", "local", "memory")):
        return None
    return env or os.path.join(os.path.expanduser("~"), ".cache", "ddm", "exports")


def cached_weights(run: Store, sha256: str, cache_dir: str | None) -> bytes:
    """An export's model.safetensors, from a content-addressed local cache when it holds the exact
    bytes (checked by sha256), else from the store (checked against its manifest), then cached.
    ``sha256`` names the cache file: it must be a digest, nothing that reaches outside the cache."""
    layout.check_digest(sha256, f"the weights digest of {run.url}")
    path = os.path.join(cache_dir, f"{sha256}.safetensors") if cache_dir else None
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            raw = f.read()
        if hashlib.sha256(raw).hexdigest() == sha256:
            return raw
        os.remove(path)  # a damaged cache entry is dropped, never used
    raw = run.read_verified(layout.EXPORT, layout.EXPORT_WEIGHTS)
    if path and hashlib.sha256(raw).hexdigest() == sha256:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    return raw


class LazyModel:
    """The model of one export, loaded on first call (an ensemble loads only the experts it routes to).

    ``entry`` is {"dir": run dir, "sha256": of model.safetensors}: the weights must be exactly those;
    with ``"flow"`` (an expert of another path or prediction than the ensemble's ``flow``) calls
    return its output converted to the ensemble's velocity.
    """

    def __init__(
        self,
        store: Store,
        entry: dict,
        build: Callable[[dict], torch.nn.Module] = build_from_export,
        device="cpu",
        cache_dir: str | None = None,
        flow: dict | None = None,
    ):
        where = f"an ensemble entry of {store.url}"
        layout.safe_relpath(entry.get("dir"), where)
        layout.check_digest(entry.get("sha256"), where)
        self.store, self.entry, self.build, self.device, self.cache_dir = store, entry, build, device, cache_dir
        self.module: torch.nn.Module | None = None
        self.flow = flow  # the ensemble's: an entry with a flow of its own is converted to it
        self._velocity = None

    @property
    def loaded(self) -> bool:
        return self.module is not None

    def load(self) -> torch.nn.Module:
        if self.module is None:
            run = self.store.child(self.entry["dir"])
            raw = cached_weights(run, self.entry["sha256"], self.cache_dir)
            if hashlib.sha256(raw).hexdigest() != self.entry["sha256"]:
                raise ValueError(
                    f"{self.entry['dir']}/export changed since the ensemble was assembled; run `ddm assemble` again"
                )
            module = self.build(export_config(run, run.read_verified(layout.EXPORT, layout.EXPORT_CONFIG)))
            module.load_state_dict(load_safetensors(raw))
            self.module = module.to(self.device).eval()
        return self.module

    def __call__(self, x, t, y=None):
        if self._velocity is None:
            from ddm.flow import FlowMatching, converted

            own = self.entry.get("flow")
            module = self.load()
            self._velocity = (
                converted(module, FlowMatching(**own), FlowMatching(**self.flow)) if own and self.flow else module
            )
        return self._velocity(x, t, y)

    @property
    def null_label(self) -> int:
        return self.load().null_label

    def null_text(self, n: int):
        """A text expert's null caption (classifier-free guidance's unconditional branch)."""
        return self.load().null_text(n)


def load_export(store: Store, run_dir: str, device="cpu") -> torch.nn.Module:
    """The model of the committed export in ``run_dir`` (the monolith, a distilled student)."""
    _, manifest = read_export(store, run_dir)
    return LazyModel(store, {"dir": run_dir, "sha256": weights_sha256(manifest)}, device=device).load()
