"""diffusers' tensors under ddm's names: renaming by prefix and joining q, k and v into one tensor,
shared by the DiT (``ddm.models.diffusers_dit``) and PixArt (``ddm.models.diffusers_pixart``) readers."""

from __future__ import annotations

import torch


def renamed(key: str, table: dict[str, str]) -> str | None:
    """``key`` with the first prefix of ``table`` it starts with replaced by that prefix's new name."""
    return next((n + key[len(o) :] for o, n in table.items() if key.startswith(o)), None)


def joined(parts: dict[tuple[str, str], dict[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    """{(ddm name, weight|bias): {"q"|"k"|"v": tensor}} as ddm's concatenated tensors: ``<name>.qkv``
    holds q, k and v in that order, any other name k and v."""
    out = {}
    for (name, kind), got in parts.items():
        order = "qkv" if name.endswith("qkv") else "kv"
        if set(got) != set(order):
            raise ValueError(f"init_from={source}: {name} lacks some of to_{', to_'.join(order)} ({kind})")
        out[f"{name}.{kind}"] = torch.cat([got[c] for c in order], dim=0)
    return out
