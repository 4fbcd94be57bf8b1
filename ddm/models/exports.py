"""Exports: a trained job's EMA model as safetensors + JSON, written once and read by many.

``{job}/export/`` holds ``model.safetensors`` (the EMA weights, no pickle), ``config.json`` (the
job kind, model and flow settings, step, partition) and the ``MANIFEST.json`` that commits them.
A training job writes it (``ddm.train.export``); this module reads it: ``read_export`` checks the
commit and the config, ``check_weights`` the tensors against the architecture the config builds,
and ``LazyModel`` loads an export on first use, checking it against a known sha256, from a
content-addressed local cache when the store is remote.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import torch
from safetensors.torch import load as load_safetensors

from ddm.models.build import build_model, build_router
from ddm.models.config import ModelConfig, MoEConfig, TextConfig
from ddm.models.flow import FlowMatching, converted
from ddm.store import NotCommittedError, Store, layout

# config.json of an export (written by ddm.train.export): 2 adds kind, format_version, architecture and
# probability_path (ddm 0.2).
EXPORT_FORMAT = 2


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
