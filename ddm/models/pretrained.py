"""Where a job's weights start (``init_from``): a ddm export, or pretrained DiT weights from outside
ddm in ddm's parameter names (``init_from`` loads any of them into a model, checking every tensor).

Two formats besides ddm's own exports:

- **facebookresearch/DiT**: a checkpoint file (``DiT-XL-2-256x256.pt``, or a training checkpoint
  ``{"model", "ema", "opt", "args"}``, whose EMA is taken as the DiT repository samples with it;
  ``.safetensors`` files of the same names too). ddm's DiT keeps that repository's parameter
  names, so the tensors map one to one. ``.pt`` files are read with ``torch.load(weights_only=True)``:
  tensors only, no code.
- **diffusers**: a ``DiTTransformer2DModel`` folder (what ``save_pretrained`` writes:
  ``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded or not; older saves, the
  hub's ``facebook/DiT-XL-2-256`` among them, call it ``Transformer2DModel`` with
  ``norm_type: ada_norm_zero``) or a pipeline folder with one under ``transformer/``. Its
  configuration must be the DiT that ddm's DiT computes (adaLN-Zero, tanh GELU, positions on the
  patch grid, the job's number of heads). Its names map as below; q, k and v are concatenated into ddm's
  ``qkv``. diffusers keeps a timestep and class embedding in every block (its converted DiT
  checkpoints hold the same copy in each); ddm's DiT shares one, so blocks whose copies differ are
  refused. diffusers embeds time at frequencies 10000^(-i/127) where DiT uses 10000^(-i/128): a
  job started from diffusers weights needs ``model.time_freq_shift=1`` and then computes what
  diffusers computes (``tests/test_pretrained.py`` checks the outputs against diffusers' own model).
  A ``PixArtTransformer2DModel`` folder starts a text DiT (``ddm.models.diffusers_pixart``).

Both formats are DiT's epsilon (and learned-sigma) predictors on DDPM's schedule. Where the source
has twice the input channels at its output (the learned sigma), the job's DiT keeps the variance
head with ``model.learn_sigma=true`` and otherwise the sigma half is dropped (either is recorded
in the job's export). The fixed sin-cos positions a source stores are
checked against ddm's and not loaded. ``hf://<repo>[@<revision>]`` names a model on the Hugging
Face hub: downloaded through huggingface_hub (safetensors only), with a clear error offline; the job
records the commit it resolved to (``revision``).
"""

from __future__ import annotations

import argparse
import re

import torch
from safetensors.torch import load as load_safetensors

from ddm.core.secrets import redact_url
from ddm.distributed.parallel import expert_index, shift_expert
from ddm.models.diffusers_dit import diffusers_config, diffusers_state, weight_files
from ddm.models.exports import read_export, weights_sha256
from ddm.models.pretrained_io import download, folder, hub_commit, local_copy, locate, split
from ddm.store import Store, layout

CHECKPOINT = r"\.(pt|pth|ckpt|safetensors)$"


def source_kind(source: str, store: Store) -> str:
    """ "hub", "dit" (a checkpoint file), "diffusers" (a model or pipeline folder) or "ddm" (an export)."""
    if source.startswith("hf://"):
        return "hub"
    if re.search(CHECKPOINT, source):
        return "dit"
    where = folder(source, store)
    if where.exists("model_index.json") or (
        where.exists("config.json") and "_class_name" in where.read_json("config.json")
    ):
        return "diffusers"
    return "ddm"


def check_source(source: str, store: Store) -> None:
    """Before any worker starts: ``source`` is there and of a kind ddm reads (a checkpoint file; a
    diffusers DiT folder with its config and safetensors weights; a committed ddm export); a hub
    id is fetched by the job. ValueError naming what is missing or unreadable."""
    kind = source_kind(source, store)
    if kind == "dit":
        locate(source, store)
    elif kind == "diffusers":
        where, _ = diffusers_config(source, store)
        weight_files(where, source)
    elif kind == "ddm":
        parent, run_dir = split(source)
        try:
            read_export(Store(parent) if parent else store, run_dir)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(
                f"init_from={source}: neither a checkpoint file, a diffusers model folder (config.json) nor a "
                f"committed ddm export ({e}). A job in the same `ddm run` as its source starts after it: train the "
                "source first"
            ) from e


def init_from(model: torch.nn.Module, source: str, store: Store, experts: tuple[int, int] | None = None) -> dict:
    """Load ``source`` into ``model``: a committed ddm export (a run folder of ``store``, or a URL
    of one), a facebookresearch/DiT checkpoint or a diffusers DiT folder (below).
    Every tensor must be there with the shape the model has: a mismatch is a ValueError naming the
    tensors, raised before anything is trained. ``experts``: (first, count) of the MoE experts this
    rank holds under expert parallelism (an export holds every expert under its global index; the
    rank's model numbers its own from 0). Returns what the job records: {"url", "sha256"} of the
    weights, and for outside formats the format and what was dropped."""
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


def load_pretrained(source: str, store: Store, model: torch.nn.Module, kind: str = "") -> tuple[dict, dict]:
    """The tensors of ``source`` (a facebookresearch/DiT file, a diffusers folder or a hub id) in
    ``model``'s names and shapes, and what the job records of them: {"url", "sha256", "format",
    "notes"}. Checks that can be made here (time embedding, positions, per-block embeddings) are
    ValueErrors naming the source and the fix; the caller checks every tensor's shape. ``kind``:
    ``source_kind``'s answer, where the caller has it."""
    kind = kind or source_kind(source, store)
    if not hasattr(model, "x_embedder"):
        raise ValueError(f"init_from={source}: a pretrained DiT starts DiT models only; this job's is not (model.arch)")
    origin = source
    if kind == "hub":  # recorded by its hub id; the snapshot's folder names its commit
        source = download(source)
    if kind == "dit":
        state, sha256, url, notes = _dit_state(source, store)
        freq_shift, fmt = 0, "facebookresearch/DiT"
    else:  # diffusers' DiT embeds time at 10000^(-i/127); its PixArt at DiT's 10000^(-i/128)
        state, sha256, url, notes, fmt = diffusers_state(source, store, model)
        freq_shift = 0 if "PixArt" in fmt else 1
    shift = model.t_embedder.freq_shift
    if shift != freq_shift:
        raise ValueError(
            f"init_from={source}: {fmt} embeds time at frequencies 10000^(-i/{128 - freq_shift}), this job's "
            f"model at 10000^(-i/{128 - shift}); set model.time_freq_shift={freq_shift} for this job"
        )
    notes += _drop_fixed_positions(state, model, source)
    notes += _drop_learned_sigma(state, model, source)
    record = {"url": redact_url(url), "sha256": sha256, "format": fmt, "notes": notes}
    if kind == "hub":  # the commit it resolved to: the same id may name other weights tomorrow
        record.update(url=redact_url(origin), notes=[*notes, f"downloaded to {source}"], revision=hub_commit(source))
    return state, record


# --- facebookresearch/DiT ------------------------------------------------------------------------
def _dit_state(source: str, store: Store) -> tuple[dict, str, str, list[str]]:
    """The checkpoint's tensors, its sha256 and URL. Local files are memory-mapped, others fetched
    to local scratch first (in pieces): an XL training checkpoint (about 11 GB with its optimizer)
    is never read into memory whole."""
    where, name = locate(source, store)
    url = f"{where.url}/{name}"
    with local_copy(where, name) as (path, sha256):
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state, notes = load_file(path), []
        else:
            state, notes = _torch_checkpoint(path, source)
    if any(k.startswith("transformer_blocks.") for k in state):
        raise ValueError(
            f"init_from={source}: these are diffusers' parameter names; give the folder that holds the file and "
            "its config.json (diffusers' time embedding and layout come from the config)"
        )
    return state, sha256, url, notes


def _torch_checkpoint(path: str, source: str) -> tuple[dict, list[str]]:
    # Tensors and the argparse.Namespace of the DiT repository's training arguments: nothing that
    # runs code (torch's weights_only unpickler refuses every other class).
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # files of torch's legacy (pre-zip) format cannot be mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusal names what the file holds beyond tensors
        raise ValueError(f"init_from={source}: not a checkpoint of tensors only ({e})") from e
    notes = []
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj, notes = obj["ema"], ["a training checkpoint: its EMA weights (as the DiT repository samples)"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj, notes = obj["model"], ["a training checkpoint without EMA: its model weights"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"init_from={source}: expected a state dict of tensors (a facebookresearch/DiT checkpoint)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, notes


# --- what every source shares --------------------------------------------------------------------
def _drop_fixed_positions(state: dict, model: torch.nn.Module, source: str) -> list[str]:
    pos = state.pop("pos_embed", None)
    if pos is None:
        return []
    own = model.pos_embed
    if tuple(pos.shape) != tuple(own.shape) or not torch.allclose(pos.float(), own.float(), atol=1e-4):
        raise ValueError(
            f"init_from={source}: its positional embedding {tuple(pos.shape)} is not the fixed sin-cos one of this "
            f"job's model {tuple(own.shape)}: give the job the source's input size and patch size (model.arch, "
            "model.data_shape)"
        )
    return ["pos_embed: the fixed sin-cos positions, equal to ddm's, not loaded"]


def _drop_learned_sigma(state: dict, model: torch.nn.Module, source: str) -> list[str]:
    """Keep the first C of 2C output channels (DiT's learned sigma is the second half), where the
    model outputs C. The output layer's rows are (patch row, patch column, channel), channel fastest."""
    name = "final_layer.linear" if hasattr(model, "final_layer") else "final_linear"  # a DiT's, a text DiT's
    w, own = state.get(f"{name}.weight"), model.get_submodule(name).weight
    if getattr(model, "learn_sigma", False) and w is not None and w.shape == own.shape:  # a router has none
        return ["learned sigma: kept (model.learn_sigma)"]
    if w is None or w.shape[0] != 2 * own.shape[0]:
        return []
    channels = model.in_channels
    keep = torch.arange(w.shape[0]) % (2 * channels) < channels
    state[f"{name}.weight"], state[f"{name}.bias"] = w[keep], state[f"{name}.bias"][keep]
    return [f"learned sigma: output channels {channels}..{2 * channels - 1} dropped (ddm's DiT predicts no variance)"]
