"""Pretrained DiT weights from outside ddm, in ddm's parameter names (``init_from``).

Two formats besides ddm's own exports:

- **facebookresearch/DiT**: a checkpoint file (``DiT-XL-2-256x256.pt``, or a training checkpoint
  ``{"model", "ema", "opt", "args"}``, whose EMA is taken as the DiT repository samples with it;
  ``.safetensors`` files of the same names too). ddm's DiT keeps that repository's parameter
  names, so the tensors map one to one. ``.pt`` files are read with ``torch.load(weights_only=True)``:
  tensors only, no code.
- **diffusers**: a ``DiTTransformer2DModel`` folder (what ``save_pretrained`` writes:
  ``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded or not) or a pipeline folder
  with one under ``transformer/``. Its names map as below; q, k and v are concatenated into ddm's
  ``qkv``. diffusers keeps a timestep and class embedding in every block (its converted DiT
  checkpoints hold the same copy in each); ddm's DiT shares one, so blocks whose copies differ are
  refused. diffusers embeds time at frequencies 10000^(-i/127) where DiT uses 10000^(-i/128): a
  job started from diffusers weights needs ``model.time_freq_shift=1`` and then computes what
  diffusers computes (``tests/test_pretrained.py`` checks the outputs against diffusers' own model).
  ``PixArtTransformer2DModel`` is text-conditioned; ddm's text experts do not exist yet, so it is
  refused with that said.

Both formats are DiT's epsilon (and learned-sigma) predictors on DDPM's schedule. Where the source
has twice the input channels at its output (the learned sigma) and ddm's DiT does not, the sigma
half is dropped (recorded in the job's export). The fixed sin-cos positions a source stores are
checked against ddm's and not loaded. ``hf://<repo>[@<revision>]`` names a model on the Hugging
Face hub: downloaded through huggingface_hub, with a clear error offline.
"""

from __future__ import annotations

import hashlib
import io
import json
import re

import torch

from ddm.store import Store

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
DIFFUSERS_CLASSES = ("DiTTransformer2DModel",)


def source_kind(source: str, store: Store) -> str:
    """ "hub", "dit" (a checkpoint file), "diffusers" (a model or pipeline folder) or "ddm" (an export)."""
    if source.startswith("hf://"):
        return "hub"
    if re.search(r"\.(pt|pth|ckpt|safetensors)$", source):
        return "dit"
    where = _folder(source, store)
    if where.exists("model_index.json") or (
        where.exists("config.json") and "_class_name" in where.read_json("config.json")
    ):
        return "diffusers"
    return "ddm"


def check_source(source: str, store: Store) -> None:
    """Before any worker starts: ``source`` is there (a file, a diffusers config, a committed ddm
    export); a hub id is fetched by the job. ValueError naming what is missing."""
    kind = source_kind(source, store)
    if kind == "dit":
        _read_file(source, store, check_only=True)
    elif kind == "diffusers":
        where = _folder(source, store)
        where = where.child("transformer") if where.exists("model_index.json") else where
        if not where.exists("config.json"):
            raise ValueError(f"init_from={source}: no config.json in {where.url} (a diffusers model folder)")
    elif kind == "ddm":
        from ddm.exports import read_export

        parent, run_dir = (
            source.rstrip("/").rsplit("/", 1) if ("://" in source or source.startswith("/")) else (None, source)
        )
        try:
            read_export(Store(parent) if parent else store, run_dir.strip("/"))
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(
                f"init_from={source}: {e}. A job in the same `ddm run` as its source starts with it: train the "
                "source first"
            ) from e


def load_pretrained(source: str, store: Store, model: torch.nn.Module) -> tuple[dict, dict]:
    """The tensors of ``source`` (a facebookresearch/DiT file, a diffusers folder or a hub id) in
    ``model``'s names and shapes, and what the job records of them: {"url", "sha256", "format",
    "notes"}. Checks that can be made here (time embedding, positions, per-block embeddings) are
    ValueErrors naming the source and the fix; the caller checks every tensor's shape."""
    kind = source_kind(source, store)
    if kind == "hub":
        source = _download(source)
        kind = "dit" if re.search(r"\.(pt|pth|ckpt|safetensors)$", source) else "diffusers"
    if kind == "dit":
        raw, url = _read_file(source, store)
        state, notes = _dit_state(raw, source)
        freq_shift, fmt = 0, "facebookresearch/DiT"
    else:
        state, raw, url, notes = _diffusers_state(source, store)
        freq_shift, fmt = 1, "diffusers DiTTransformer2DModel"
    if not hasattr(model, "x_embedder"):
        raise ValueError(f"init_from={source}: a {fmt} checkpoint is a DiT; this job's model is not (model.arch)")
    shift = model.t_embedder.freq_shift
    if shift != freq_shift:
        raise ValueError(
            f"init_from={source}: {fmt} embeds time at frequencies 10000^(-i/{128 - freq_shift}), this job's "
            f"model at 10000^(-i/{128 - shift}); set model.time_freq_shift={freq_shift} for this job"
        )
    notes += _drop_fixed_positions(state, model, source)
    notes += _drop_learned_sigma(state, model, source)
    return state, {"url": url, "sha256": hashlib.sha256(raw).hexdigest(), "format": fmt, "notes": notes}


# --- facebookresearch/DiT ------------------------------------------------------------------------
def _dit_state(raw: bytes, source: str) -> tuple[dict, list[str]]:
    if source.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return dict(load_safetensors(raw)), []
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickler refusal names what the file holds beyond tensors
        raise ValueError(f"init_from={source}: not a checkpoint of tensors only ({e})") from e
    notes = []
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj, notes = obj["ema"], ["a training checkpoint: its EMA weights (as the DiT repository samples)"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj, notes = obj["model"], ["a training checkpoint without EMA: its model weights"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"init_from={source}: expected a state dict of tensors (a facebookresearch/DiT checkpoint)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, notes


# --- diffusers -----------------------------------------------------------------------------------
def _diffusers_state(source: str, store: Store) -> tuple[dict, bytes, str, list[str]]:
    where = _folder(source, store)
    if where.exists("model_index.json"):  # a pipeline: its transformer
        where = where.child("transformer")
    config = where.read_json("config.json")
    cls = config.get("_class_name")
    if cls == "PixArtTransformer2DModel":
        raise ValueError(
            f"init_from={source}: a PixArt transformer is text-conditioned; ddm's experts are class-conditioned "
            "until its text experts land (cross-attention DiT): start from a DiTTransformer2DModel"
        )
    if cls not in DIFFUSERS_CLASSES:
        raise ValueError(f"init_from={source}: a diffusers {cls}; ddm starts from {', '.join(DIFFUSERS_CLASSES)}")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"init_from={source}: norm_type {config['norm_type']!r}; ddm's DiT is adaLN-Zero")
    raw, files = _diffusers_weights(where, source)
    from safetensors.torch import load as load_safetensors

    state = {}
    for blob in files:
        state.update(load_safetensors(blob))
    notes = [f"diffusers config: {_brief(config)}"]
    if config.get("norm_eps", 1e-5) != 1e-6:  # diffusers' default: 1e-5 before each feed-forward
        notes.append(
            f"norm_eps {config.get('norm_eps', 1e-5)}: diffusers normalises before each feed-forward with it, ddm "
            "with 1e-6 as DiT does (outputs differ by about 1e-6 of their size)"
        )
    return _from_diffusers(state, source), raw, where.url, notes


def _diffusers_weights(where: Store, source: str) -> tuple[bytes, list[bytes]]:
    for name in WEIGHT_FILES:
        if where.exists(name):
            raw = where.read_bytes(name)
            return raw, [raw]
        index = f"{name}.index.json"
        if where.exists(index):  # sharded: the index, then each shard once
            shards = sorted(set(where.read_json(index)["weight_map"].values()))
            blobs = [where.read_bytes(s) for s in shards]
            return b"".join([where.read_bytes(index), *blobs]), blobs
    raise ValueError(
        f"init_from={source}: no {WEIGHT_FILES[0]} in {where.url}; ddm reads safetensors only (re-save the "
        "model with save_pretrained(..., safe_serialization=True))"
    )


def _from_diffusers(state: dict, source: str) -> dict:
    out, shared = {}, {}
    rename = {
        "pos_embed.proj.": "x_embedder.proj.",
        "pos_embed.pos_embed": "pos_embed",
        "proj_out_1.": "final_layer.adaLN_modulation.1.",
        "proj_out_2.": "final_layer.linear.",
    }
    block = {
        "norm1.linear.": "adaLN_modulation.1.",
        "attn1.to_out.0.": "attn.proj.",
        "ff.net.0.proj.": "mlp.fc1.",
        "ff.net.2.": "mlp.fc2.",
    }
    embed = {
        "norm1.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "norm1.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
        "norm1.emb.class_embedder.embedding_table.": "y_embedder.embedding_table.",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
        if m is None:
            new = next((n + key[len(o) :] for o, n in rename.items() if key.startswith(o)), None)
            if new is None:
                raise ValueError(f"init_from={source}: tensor {key!r} has no place in ddm's DiT")
            out[new] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        if q := re.fullmatch(r"attn1\.to_([qkv])\.(weight|bias)", rest):
            qkv.setdefault((i, q.group(2)), {})[q.group(1)] = value
        elif e := next((n + rest[len(o) :] for o, n in embed.items() if rest.startswith(o)), None):
            first = shared.setdefault(e, (i, value))
            if not torch.equal(first[1], value):
                pair, what = (min(first[0], i), max(first[0], i)), rest.rsplit(".", 1)[0]
                raise ValueError(
                    f"init_from={source}: blocks {pair[0]} and {pair[1]} hold different {what}; ddm's "
                    "DiT shares one timestep and class embedding across blocks (as the DiT paper, and as diffusers' "
                    "converted DiT checkpoints hold it)"
                )
        elif b := next((n + rest[len(o) :] for o, n in block.items() if rest.startswith(o)), None):
            out[f"blocks.{i}.{b}"] = value
        else:
            raise ValueError(f"init_from={source}: tensor {key!r} has no place in ddm's DiT")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"init_from={source}: block {i}'s attention lacks some of to_q, to_k, to_v ({kind})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    out.update({k: v for k, (_, v) in shared.items()})
    return out


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
    w = state.get("final_layer.linear.weight")
    own = model.state_dict().get("final_layer.linear.weight")
    if w is None or own is None or w.shape[0] != 2 * own.shape[0]:
        return []
    channels = model.in_channels
    keep = torch.arange(w.shape[0]) % (2 * channels) < channels
    state["final_layer.linear.weight"] = w[keep]
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"][keep]
    return [f"learned sigma: output channels {channels}..{2 * channels - 1} dropped (ddm's DiT predicts no variance)"]


def _folder(source: str, store: Store) -> Store:
    if "://" in source or source.startswith("/"):
        return Store(source.rstrip("/"))
    return store.child(source.strip("/"))


def _read_file(source: str, store: Store, check_only: bool = False) -> tuple[bytes, str]:
    parent, name = source.rsplit("/", 1) if "/" in source else ("", source)
    where = Store(parent) if ("://" in source or source.startswith("/")) else store.child(parent) if parent else store
    if not where.exists(name):
        raise ValueError(
            f"init_from={source}: no such file ({where.url}/{name}); a relative path is inside the job's store"
        )
    return (b"" if check_only else where.read_bytes(name)), f"{where.url}/{name}"


def _download(source: str) -> str:
    """A local folder holding ``hf://<repo>[@<revision>]``'s transformer (or DiT checkpoint file)."""
    repo, _, revision = source.removeprefix("hf://").partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ValueError(f"init_from={source}: the hub needs huggingface_hub (pip install 'ddm[encoders]')") from e
    try:
        folder = snapshot_download(
            repo, revision=revision or None, allow_patterns=["model_index.json", "transformer/*", "config.json",
                                                             "*.safetensors", "*.safetensors.index.json"],
        )  # fmt: skip
    except Exception as e:
        raise ValueError(
            f"init_from={source}: could not fetch {repo} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline, download it where there is a network (huggingface-cli download {repo} --local-dir DIR), "
            "copy DIR here and give init_from=DIR"
        ) from e
    return folder


def _brief(config: dict) -> str:
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "sample_size", "in_channels",
            "out_channels", "num_embeds_ada_norm", "norm_eps")  # fmt: skip
    return json.dumps({k: config.get(k) for k in keys if k in config})
