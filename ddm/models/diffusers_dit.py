"""diffusers' DiT in ddm's names (``init_from`` of a ``DiTTransformer2DModel`` folder; a PixArt
transformer's: ``ddm.models.diffusers_pixart``): its config
checked to be the DiT that ddm's DiT computes, its safetensors read (sharded or not), its
parameters renamed (q, k and v concatenated into ``qkv``; the per-block copies of the timestep and
class embedding checked equal and shared). ``tests/test_pretrained.py`` runs diffusers' own model
beside ddm's on the same inputs."""

from __future__ import annotations

import hashlib
import json
import re

import torch

from ddm.models.diffusers_names import joined, renamed
from ddm.models.diffusers_pixart import check_pixart_config, pixart_state
from ddm.models.pretrained_io import folder, local_copy
from ddm.store import Store
from ddm.store.layout import safe_relpath

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
DIT_NORM = "ada_norm_zero"  # the norm that makes diffusers' generic Transformer2DModel a DiT


def diffusers_config(source: str, store: Store) -> tuple[Store, dict]:
    """The model folder (a pipeline's ``transformer/``) and its config, checked to be a DiT that ddm's
    DiT computes exactly."""
    where = folder(source, store)
    if where.exists("model_index.json"):  # a pipeline: its transformer
        where = where.child("transformer")
    if not where.exists("config.json"):
        raise ValueError(f"init_from={source}: no config.json in {where.url} (a diffusers model folder)")
    config = where.read_json("config.json")
    cls, norm = config.get("_class_name"), config.get("norm_type")
    if cls == "Transformer2DModel":  # diffusers maps the generic name by norm_type, as here
        cls = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}.get(norm, cls)
    if cls == "PixArtTransformer2DModel":  # a text DiT's start (ddm.models.diffusers_pixart)
        check_pixart_config(config, source)
        return where, {**config, "_class_name": cls}
    if cls != "DiTTransformer2DModel":
        raise ValueError(
            f"init_from={source}: a diffusers {cls}; ddm starts from DiTTransformer2DModel and "
            "PixArtTransformer2DModel folders"
        )
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


def diffusers_state(source: str, store: Store, model: torch.nn.Module) -> tuple[dict, str, str, list[str], str]:
    """The tensors in ``model``'s names, their sha256 and URL, notes, and the format's name."""
    where, config = diffusers_config(source, store)
    pixart = config["_class_name"] == "PixArtTransformer2DModel"
    text = hasattr(model, "null_text")
    if pixart != text:
        raise ValueError(
            f"init_from={source}: a PixArt transformer starts text DiTs only (set model.text: its caption_channels "
            "wide, T5's 120 tokens, pooled=false)"
            if pixart
            else f"init_from={source}: a class-conditional DiT cannot start a text DiT; start from a PixArt transformer"
        )
    if pixart and not hasattr(model.blocks[0], "cross_attn"):
        raise ValueError(
            f"init_from={source}: a PixArt transformer starts a cross-attention text DiT (model.arch=DiT-...), not "
            f"an MMDiT"
        )
    heads = model.blocks[0].attn.num_heads
    if config.get("num_attention_heads") != heads:
        raise ValueError(
            f"init_from={source}: {config.get('num_attention_heads')} attention heads, this job's model {heads} "
            "(tensor shapes cannot show it): give the job the source's size (model.arch)"
        )
    from safetensors.torch import load_file

    files, state, digests = weight_files(where, source), {}, []
    for name in files:
        with local_copy(where, name) as (path, sha256):
            state.update(load_file(path))
            digests.append(sha256)
    notes = [f"diffusers config: {_brief(config)}"]
    if config.get("norm_eps", 1e-5) != 1e-6:  # diffusers' default: 1e-5 before each feed-forward
        notes.append(
            f"norm_eps {config.get('norm_eps', 1e-5)}: diffusers normalises before each feed-forward with it, ddm "
            "with 1e-6 as DiT does (outputs differ by about 1e-6 of their size)"
        )
    shards = json.dumps(dict(zip(files, digests))).encode()
    sha256 = digests[0] if len(digests) == 1 else hashlib.sha256(shards).hexdigest()
    if len(digests) > 1:
        notes.append(f"sharded: sha256 of {{shard: sha256}} over {len(files)} shards")
    if pixart:
        state, more = pixart_state(state, model, source)
        return state, sha256, where.url, notes + more, "diffusers PixArtTransformer2DModel"
    return _from_diffusers(state, source), sha256, where.url, notes, "diffusers DiTTransformer2DModel"


def weight_files(where: Store, source: str) -> list[str]:
    """The safetensors file, or the shards its index names."""
    for name in WEIGHT_FILES:
        if where.exists(name):
            return [name]
        index = f"{name}.index.json"
        if where.exists(index):
            try:
                shards = where.read_json(index)["weight_map"].values()
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"init_from={source}: {where.url}/{index} is not a weight index ({e})") from None
            # Each shard's name becomes a path: a plain file name beside the index, nothing that reaches out.
            return sorted({safe_relpath(n, f"init_from={source}: {where.url}/{index}") for n in shards})
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
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
        if m is None:
            new = renamed(key, rename)
            if new is None:
                raise ValueError(f"init_from={source}: tensor {key!r} has no place in ddm's DiT")
            out[new] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        if q := re.fullmatch(r"attn1\.to_([qkv])\.(weight|bias)", rest):
            qkv.setdefault((f"blocks.{i}.attn.qkv", q.group(2)), {})[q.group(1)] = value
        elif e := renamed(rest, embed):
            first = shared.setdefault(e, (i, value))
            if not torch.equal(first[1], value):
                pair, what = (min(first[0], i), max(first[0], i)), rest.rsplit(".", 1)[0]
                raise ValueError(
                    f"init_from={source}: blocks {pair[0]} and {pair[1]} hold different {what}; ddm's "
                    "DiT shares one timestep and class embedding across blocks (as the DiT paper, and as diffusers' "
                    "converted DiT checkpoints hold it)"
                )
        elif b := renamed(rest, block):
            out[f"blocks.{i}.{b}"] = value
        else:
            raise ValueError(f"init_from={source}: tensor {key!r} has no place in ddm's DiT")
    out.update(joined(qkv, source))
    out.update({k: v for k, (_, v) in shared.items()})
    return out


def _brief(config: dict) -> str:
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "sample_size", "in_channels",
            "out_channels", "num_embeds_ada_norm", "norm_eps")  # fmt: skip
    return json.dumps({k: config.get(k) for k in keys if k in config})
