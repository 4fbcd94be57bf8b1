"""diffusers' PixArt-alpha transformer in ddm's names (``init_from`` of a ``PixArtTransformer2DModel``
folder into a text DiT): ddm's ``TextDiT`` is PixArt-alpha's design (AdaLN-Single, cross-attention
without a norm before it, the caption MLP), so every tensor has a place:

    pos_embed.proj                         -> x_embedder.proj
    adaln_single.emb.timestep_embedder.linear_1 / _2 -> t_embedder.mlp.0 / .2
    adaln_single.linear                    -> t_block.1
    caption_projection.linear_1 / _2       -> y_embedder.fc1 / .fc2
    transformer_blocks.i.attn1.to_q|k|v    -> blocks.i.attn.qkv (concatenated), to_out.0 -> attn.proj
    transformer_blocks.i.attn2.to_q        -> blocks.i.cross_attn.q; to_k|v -> cross_attn.kv; to_out.0 -> .proj
    transformer_blocks.i.ff.net.0.proj / .2 -> blocks.i.mlp.fc1 / .fc2
    transformer_blocks.i.scale_shift_table -> blocks.i.scale_shift_table
    scale_shift_table, proj_out            -> final_table, final_linear (the learned sigma half dropped)

PixArt has no pooled caption path (``model.text.pooled=false``) and diffusers keeps no null caption
(its pipelines encode "" as the negative prompt): the job's learned null caption starts from its
own initialisation and learns in fine-tuning. The 1024-pixel models' resolution and aspect-ratio
conditioning and their scaled positions are refused. ``tests/test_pretrained.py`` runs diffusers'
own model beside ddm's on the same inputs.
"""

from __future__ import annotations

import re

import torch

from ddm.models.diffusers_names import joined, renamed

WRONG = "not the PixArt-alpha transformer that ddm's text DiT computes"


def check_pixart_config(config: dict, source: str) -> None:
    sample = config.get("sample_size", 128)
    extra = config.get("use_additional_conditions")
    extra = sample == 128 if extra is None else extra  # diffusers' own default
    scale = config.get("interpolation_scale") or max(sample // 64, 1)
    wrong = {
        "norm_type": (config.get("norm_type", "ada_norm_single"), "ada_norm_single"),
        "activation_fn": (config.get("activation_fn", "gelu-approximate"), "gelu-approximate"),
        "norm_elementwise_affine": (config.get("norm_elementwise_affine", False), False),
        "attention_bias": (config.get("attention_bias", True), True),
        "use_additional_conditions": (extra, False),
        "interpolation_scale": (scale, 1),
    }
    wrong = {k: v for k, (v, want) in wrong.items() if v != want}
    if wrong:
        raise ValueError(
            f"init_from={source}: {', '.join(f'{k}={v!r}' for k, v in wrong.items())}: {WRONG} (AdaLN-Single, tanh "
            "GELU, biased attention, no resolution conditioning, positions on the patch grid: the 256 and 512 "
            "pixel models)"
        )


def pixart_state(state: dict, model: torch.nn.Module, source: str) -> tuple[dict, list[str]]:
    """``state`` (diffusers' names) in the text DiT ``model``'s names, the learned sigma still in
    ``final_linear`` (``ddm.models.pretrained`` drops it, as for a DiT); notes of what was kept."""
    if getattr(model, "pooled_embedder", None) is not None:
        raise ValueError(f"init_from={source}: PixArt has no pooled caption path: set model.text.pooled=false")
    rename = {
        "pos_embed.proj.": "x_embedder.proj.",
        "pos_embed.pos_embed": "pos_embed",
        "adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
        "adaln_single.linear.": "t_block.1.",
        "caption_projection.linear_1.": "y_embedder.fc1.",
        "caption_projection.linear_2.": "y_embedder.fc2.",
        "scale_shift_table": "final_table",
        "proj_out.": "final_linear.",
    }
    block = {
        "scale_shift_table": "scale_shift_table",
        "attn1.to_out.0.": "attn.proj.",
        "attn2.to_q.": "cross_attn.q.",
        "attn2.to_out.0.": "cross_attn.proj.",
        "ff.net.0.proj.": "mlp.fc1.",
        "ff.net.2.": "mlp.fc2.",
    }
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (ddm name, weight|bias) -> q, k, v
    for key, value in state.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
        if m is None:
            new = renamed(key, rename)
            if new is None:
                raise ValueError(f"init_from={source}: tensor {key!r} has no place in ddm's text DiT")
            out[new] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        if q := re.fullmatch(r"attn1\.to_([qkv])\.(weight|bias)", rest):
            parts.setdefault((f"blocks.{i}.attn.qkv", q.group(2)), {})[q.group(1)] = value
        elif kv := re.fullmatch(r"attn2\.to_([kv])\.(weight|bias)", rest):
            parts.setdefault((f"blocks.{i}.cross_attn.kv", kv.group(2)), {})[kv.group(1)] = value
        elif b := renamed(rest, block):
            out[f"blocks.{i}.{b}"] = value
        else:
            raise ValueError(f"init_from={source}: tensor {key!r} has no place in ddm's text DiT")
    out.update(joined(parts, source))
    out["null_tokens"] = model.state_dict()["null_tokens"]
    notes = ["null caption: not in diffusers' PixArt (its pipelines encode \"\" instead); the job's starts from its "
             "own initialisation"]  # fmt: skip
    return out, notes
