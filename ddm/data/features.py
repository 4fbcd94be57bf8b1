"""Feature extractors for partitioning: what "semantically similar" means.

``pca`` (the offline default) projects flattened pixels or latents onto principal components fitted
on a seeded sample of the dataset. ``dinov2`` (the paper's choice) pools DINOv2 features; its
weights come from a model hub, and without them it fails with a message saying so.
Every extractor maps a batch (N, *sample_shape) of stored arrays to (N, dim) float32 features,
and saves what it needs to be re-applied (``state``) into the partition's safetensors file.
"""

from __future__ import annotations

import numpy as np
import torch

from ddm.data.shards import Dataset


def to_float(arrays: np.ndarray, dtype: str) -> np.ndarray:
    """Stored arrays -> float32 in about [-1, 1] (uint8 pixels) or as stored (latents), flattened."""
    x = arrays.reshape(len(arrays), -1).astype(np.float32)
    return x / 127.5 - 1.0 if dtype == "uint8" else x


class PCAFeatures:
    """Principal components of a seeded sample of (at most ``fit_samples``) stored arrays."""

    name = "pca"

    def __init__(self, dim: int = 32, fit_samples: int = 10_000, seed: int = 0):
        self.dim, self.fit_samples, self.seed = dim, fit_samples, seed
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def fit(self, dataset: Dataset) -> "PCAFeatures":
        n = dataset.num_samples
        rng = np.random.default_rng(self.seed)
        chosen = np.sort(rng.choice(n, size=min(self.fit_samples, n), replace=False))
        starts = np.cumsum([0] + dataset.shard_rows)
        rows = []
        for i in range(dataset.num_shards):  # only the shards that hold chosen rows are read
            local = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
            if len(local):
                shard = dataset.read_shard(i)
                rows.append(to_float(shard.arrays[local], dataset.dtype))
        x = np.concatenate(rows).astype(np.float64)
        self.mean = x.mean(0)
        # SVD of the centred sample; components are the top right-singular vectors.
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        k = min(self.dim, vt.shape[0])
        self.components = vt[:k].astype(np.float32)
        self.mean = self.mean.astype(np.float32)
        return self

    def __call__(self, arrays: np.ndarray, dtype: str) -> np.ndarray:
        assert self.components is not None, "fit() first"
        return (to_float(arrays, dtype) - self.mean) @ self.components.T

    def state(self) -> dict[str, np.ndarray]:
        return {"pca_mean": self.mean, "pca_components": self.components}


class DINOv2Features:
    """Pooled DINOv2 features (the paper's extractor); images are resized to 224 px."""

    name = "dinov2"

    def __init__(self, model_id: str = "facebook/dinov2-small", batch_size: int = 64):
        self.model_id, self.batch_size = model_id, batch_size
        try:
            from transformers import AutoModel
        except ImportError as e:
            raise ValueError(
                "features=dinov2 needs the transformers package (pip install transformers) and the DINOv2 "
                "weights; use features=pca to partition offline"
            ) from e
        try:
            self.model = AutoModel.from_pretrained(model_id).eval()
        except Exception as e:  # noqa: BLE001 - hub/network/cache errors come in many types
            raise ValueError(
                f"could not load DINOv2 weights {model_id!r} ({type(e).__name__}): they come from the Hugging Face "
                "hub; make them reachable (network, or HF_HOME with a cached copy) or use features=pca"
            ) from e

    def fit(self, dataset: Dataset) -> "DINOv2Features":
        if dataset.dtype != "uint8":
            raise ValueError("features=dinov2 needs pixel data (encoder=identity); these shards hold latents")
        return self

    def __call__(self, arrays: np.ndarray, dtype: str) -> np.ndarray:
        out = []
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            for i in range(0, len(arrays), self.batch_size):
                x = torch.from_numpy(arrays[i : i + self.batch_size]).float() / 255.0
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                x = torch.nn.functional.interpolate(x, size=224, mode="bicubic", align_corners=False)
                pooled = self.model(pixel_values=(x - mean) / std).pooler_output
                out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        return np.concatenate(out).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {}


def build_extractor(spec: str, dim: int, fit_samples: int, seed: int):
    """``pca`` or ``dinov2`` / ``dinov2:<hub id>``."""
    if spec == "pca":
        return PCAFeatures(dim, fit_samples, seed)
    if spec == "dinov2" or spec.startswith("dinov2:"):
        return DINOv2Features(spec.split(":", 1)[1]) if ":" in spec else DINOv2Features()
    raise ValueError(f"features {spec!r} is unknown; use pca (offline) or dinov2[:<hub id>]")
