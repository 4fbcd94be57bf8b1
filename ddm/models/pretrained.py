"""Pretrained DiT weights from outside ddm, in ddm's parameter names (``init_from``).

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
  ``PixArtTransformer2DModel`` is text-conditioned; ddm's text experts do not exist yet, so it is
  refused with that said.

Both formats are DiT's epsilon (and learned-sigma) predictors on DDPM's schedule. Where the source
has twice the input channels at its output (the learned sigma), the job's DiT keeps the variance
head with ``model.learn_sigma=true`` and otherwise the sigma half is dropped (either is recorded
in the job's export). The fixed sin-cos positions a source stores are
checked against ddm's and not loaded. ``hf://<repo>[@<revision>]`` names a model on the Hugging
Face hub: downloaded through huggingface_hub, with a clear error offline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile

import torch

from ddm.store import Store

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
CHECKPOINT = r"\.(pt|pth|ckpt|safetensors)$"


def source_kind(source: str, store: Store) -> str:
    """ "hub", "dit" (a checkpoint file), "diffusers" (a model or pipeline folder) or "ddm" (an export)."""
    if source.startswith("hf://"):
        return "hub"
    if re.search(CHECKPOINT, source):
        return "dit"
    where = _folder(source, store)
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
        _locate(source, store)
    elif kind == "diffusers":
        where, _ = _diffusers_config(source, store)
        _weight_files(where, source)
    elif kind == "ddm":
        from ddm.exports import read_export

        parent, run_dir = _split(source)
        try:
            read_export(Store(parent) if parent else store, run_dir)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(
                f"init_from={source}: neither a checkpoint file, a diffusers model folder (config.json) nor a "
                f"committed ddm export ({e}). A job in the same `ddm run` as its source starts after it: train the "
                "source first"
            ) from e


def load_pretrained(source: str, store: Store, model: torch.nn.Module) -> tuple[dict, dict]:
    """The tensors of ``source`` (a facebookresearch/DiT file, a diffusers folder or a hub id) in
    ``model``'s names and shapes, and what the job records of them: {"url", "sha256", "format",
    "notes"}. Checks that can be made here (time embedding, positions, per-block embeddings) are
    ValueErrors naming the source and the fix; the caller checks every tensor's shape."""
    kind = source_kind(source, store)
    if not hasattr(model, "x_embedder"):
        raise ValueError(f"init_from={source}: a pretrained DiT starts DiT models only; this job's is not (model.arch)")
    origin = source
    if kind == "hub":  # recorded by its hub id; the snapshot's folder names its commit
        source = _download(source)
    if kind == "dit":
        state, sha256, url, notes = _dit_state(source, store)
        freq_shift, fmt = 0, "facebookresearch/DiT"
    else:
        state, sha256, url, notes = _diffusers_state(source, store, model)
        freq_shift, fmt = 1, "diffusers DiTTransformer2DModel"
    shift = model.t_embedder.freq_shift
    if shift != freq_shift:
        raise ValueError(
            f"init_from={source}: {fmt} embeds time at frequencies 10000^(-i/{128 - freq_shift}), this job's "
            f"model at 10000^(-i/{128 - shift}); set model.time_freq_shift={freq_shift} for this job"
        )
    notes += _drop_fixed_positions(state, model, source)
    notes += _drop_learned_sigma(state, model, source)
    if kind == "hub":
        url, notes = origin, [*notes, f"downloaded to {source}"]
    return state, {"url": url, "sha256": sha256, "format": fmt, "notes": notes}


# --- facebookresearch/DiT ------------------------------------------------------------------------
def _dit_state(source: str, store: Store) -> tuple[dict, str, str, list[str]]:
    """The checkpoint's tensors, its sha256 and URL. Local files are memory-mapped, others fetched
    to local scratch first (in pieces): an XL training checkpoint (about 11 GB with its optimizer)
    is never read into memory whole."""
    where, name = _locate(source, store)
    url = f"{where.url}/{name}"
    with _local_copy(where, name) as (path, sha256):
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


# --- diffusers -----------------------------------------------------------------------------------
# The class names diffusers gives a DiT: its own, and the generic one of older saves (the hub's
# facebook/DiT-XL-2-256 among them), which diffusers itself maps by norm_type.
DIT_NORM = "ada_norm_zero"


def _diffusers_config(source: str, store: Store) -> tuple[Store, dict]:
    """The model folder (a pipeline's ``transformer/``) and its config, checked to be a DiT that ddm's
    DiT computes exactly."""
    where = _folder(source, store)
    if where.exists("model_index.json"):  # a pipeline: its transformer
        where = where.child("transformer")
    if not where.exists("config.json"):
        raise ValueError(f"init_from={source}: no config.json in {where.url} (a diffusers model folder)")
    config = where.read_json("config.json")
    cls, norm = config.get("_class_name"), config.get("norm_type")
    if cls == "Transformer2DModel":  # diffusers maps the generic name by norm_type, as here
        cls = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}.get(norm, cls)
    if cls == "PixArtTransformer2DModel":
        raise ValueError(
            f"init_from={source}: a PixArt transformer is text-conditioned; ddm's experts are class-conditioned "
            "until its text experts land (cross-attention DiT): start from a DiT"
        )
    if cls != "DiTTransformer2DModel":
        raise ValueError(f"init_from={source}: a diffusers {cls}; ddm starts from DiTTransformer2DModel folders")
    wrong = {
        "norm_type": (norm or DIT_NORM, DIT_NORM),
        "activation_fn": (config.get("activation_fn", "gelu-approximate"), "gelu-approximate"),
        "norm_elementwise_affine": (config.get("norm_elementwise_affine", False), False),
        "attention_bias": (config.get("attention_bias", True), True),
    }
    wrong = {k: v for k, (v, want) in wrong.items() if v != want}
    # Older saves scale the positions by max(sample_size // 64, 1); DiTTransformer2DModel by 1.
    scale = config.get("interpolation_scale") or (
        max(config.get("sample_size", 32) // 64, 1) if config.get("_class_name") == "Transformer2DModel" else 1
    )
    if scale != 1:
        wrong["interpolation_scale"] = scale
    if wrong:
        raise ValueError(
            f"init_from={source}: {', '.join(f'{k}={v!r}' for k, v in wrong.items())}: not the DiT that ddm's DiT "
            "computes (adaLN-Zero, tanh GELU, biased attention, positions on the patch grid)"
        )
    return where, config


def _diffusers_state(source: str, store: Store, model: torch.nn.Module) -> tuple[dict, str, str, list[str]]:
    where, config = _diffusers_config(source, store)
    heads = model.blocks[0].attn.num_heads
    if config.get("num_attention_heads") != heads:
        raise ValueError(
            f"init_from={source}: {config.get('num_attention_heads')} attention heads, this job's model {heads} "
            "(tensor shapes cannot show it): give the job the source's size (model.arch)"
        )
    from safetensors.torch import load_file

    files, state, digests = _weight_files(where, source), {}, []
    for name in files:
        with _local_copy(where, name) as (path, sha256):
            state.update(load_file(path))
            digests.append(sha256)
    notes = [f"diffusers config: {_brief(config)}"]
    if config.get("norm_eps", 1e-5) != 1e-6:  # diffusers' default: 1e-5 before each feed-forward
        notes.append(
            f"norm_eps {config.get('norm_eps', 1e-5)}: diffusers normalises before each feed-forward with it, ddm "
            "with 1e-6 as DiT does (outputs differ by about 1e-6 of their size)"
        )
    sha256 = digests[0] if len(digests) == 1 else _sha256_of(json.dumps(dict(zip(files, digests))).encode())
    if len(digests) > 1:
        notes.append(f"sharded: sha256 of {{shard: sha256}} over {len(files)} shards")
    return _from_diffusers(state, source), sha256, where.url, notes


def _weight_files(where: Store, source: str) -> list[str]:
    """The safetensors file, or the shards its index names."""
    for name in WEIGHT_FILES:
        if where.exists(name):
            return [name]
        index = f"{name}.index.json"
        if where.exists(index):
            return sorted(set(where.read_json(index)["weight_map"].values()))
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
    if getattr(model, "learn_sigma", False) and w is not None and own is not None and w.shape == own.shape:
        return ["learned sigma: kept (model.learn_sigma)"]
    if w is None or own is None or w.shape[0] != 2 * own.shape[0]:
        return []
    channels = model.in_channels
    keep = torch.arange(w.shape[0]) % (2 * channels) < channels
    state["final_layer.linear.weight"] = w[keep]
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"][keep]
    return [f"learned sigma: output channels {channels}..{2 * channels - 1} dropped (ddm's DiT predicts no variance)"]


def _split(source: str) -> tuple[str | None, str]:
    """(parent URL, last part) of an absolute path or URL; (None, source) for a path in the store."""
    if "://" in source or source.startswith("/"):
        parent, name = source.rstrip("/").rsplit("/", 1)
        return parent or "/", name
    return None, source.strip("/")


def _folder(source: str, store: Store) -> Store:
    if "://" in source or source.startswith("/"):
        return Store(source.rstrip("/"))
    return store.child(source.strip("/"))


def _locate(source: str, store: Store) -> tuple[Store, str]:
    parent, rel = _split(source)
    where = Store(parent) if parent else store
    if not where.exists(rel):
        raise ValueError(
            f"init_from={source}: no such file ({where.url}/{rel}); a relative path is inside the job's store"
        )
    return where, rel


@contextlib.contextmanager
def _local_copy(where: Store, name: str):
    """(a local path of ``name``, its sha256): the file itself on a local store, else a copy in local
    scratch fetched in pieces and removed afterwards."""
    from ddm.transfer import file_digest

    if where.protocol == "file":
        path = where.path(name)
        yield path, file_digest(path)["sha256"]
        return
    with tempfile.TemporaryDirectory(prefix="ddm-init-from-") as tmp:
        local = os.path.join(tmp, os.path.basename(name))
        yield local, where.get_file(name, local)["sha256"]


def _sha256_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


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
                                                             "diffusion_pytorch_model*.safetensors*"],
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
