"""Distances between sample sets. (FID and image metrics join here with the image pipeline.)"""

from __future__ import annotations

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets (N, D), (M, D).

    Zero iff the distributions are equal; the within-set terms exclude the diagonal (unbiased
    U-statistics), so two independent sample sets of one distribution give values near 0.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_distance needs (N, D) and (M, D) sets with one D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("energy_distance needs at least 2 samples per set")
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)
