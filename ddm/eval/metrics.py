"""Distances between sample sets and the feature networks they are measured on.

- ``energy_distance``: for low-dimensional data (the mixture demo).
- ``frechet_distance``: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between the Gaussians
  fitted to two feature sets. On features of a small CNN trained on the dataset itself
  (``FeatureClassifier``, kept under ``eval/classifier/``) it is reported as **FD-classifier**
  (works offline, on any dataset, comparable only within one dataset); on Inception-v3 pool
  features it is **FID** (``InceptionFeatures``: the pinned ``pytorch-fid`` and its weights, which
  are downloaded on first use). The weights are a pickled torch file: ddm reads it with torch's
  restricted unpickler (``weights_only=True``: tensors and plain containers, no code runs) after
  checking its sha256 against the published file's, never with pytorch-fid's own ``torch.load``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import numpy as np
import torch
from safetensors.torch import load, save
from torch import nn

from ddm.store import Store
from ddm.store.layout import CLASSIFIER_DIR
from ddm.store.transfer import file_digest

log = logging.getLogger("ddm.eval.metrics")

FID_REQUIREMENT = "pytorch-fid==0.3.0"  # the one FID implementation ddm uses (pinned: FIDs differ across libraries)
# pytorch-fid's Inception-v3 weights: the file its release publishes, named with the first hex digits
# of its sha256 (torch.hub's convention), and that file's whole sha256.
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS}"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


# --- distances ------------------------------------------------------------------------------


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets (N, D), (M, D).

    Zero iff the distributions are equal; the within-set terms exclude the diagonal (unbiased
    U-statistics), so two independent sample sets of one distribution give values near 0.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"energy_distance needs (N, D) and (M, D) sets with one D, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("energy_distance needs at least 2 samples per set")
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need an (N, D) array with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, s1) and N(mu2, s2).

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum), which is stable for singular covariances,
    unlike a general matrix square root.
    """
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, s1, s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched Gaussian statistics: means {mu1.shape}/{mu2.shape}, covariances {s1.shape}/{s2.shape}"
        )
    r1 = _psd_sqrt(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


# --- the feature network of FD-classifier -----------------------------------------------------


class FeatureClassifier(nn.Module):
    """A small CNN for (C, H, W) images; its 128-d pooled features define FD-classifier."""

    feature_dim = 128

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GroupNorm(8, 128), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        self.eval()
        return torch.cat([self.features(x[i : i + batch_size].float()) for i in range(0, len(x), batch_size)]).numpy()


def train_classifier(
    x: torch.Tensor, targets: torch.Tensor, num_classes: int, steps: int = 600, seed: int = 0
) -> tuple[FeatureClassifier, float]:
    """Train on 90% of (x, targets); returns the model and its accuracy on the other 10%."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = max(1, len(x) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    model = FeatureClassifier(x.shape[1], num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        idx = tr[torch.randint(len(tr), (128,), generator=g)]
        xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)  # light noise: features robust to sampler grain
        loss = nn.functional.cross_entropy(model(xb), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[val]).argmax(1) == targets[val]).float().mean().item()
    return model, acc


def load_or_train_classifier(
    store: Store, x: torch.Tensor, targets: torch.Tensor, num_classes: int, target_name: str
) -> tuple[FeatureClassifier, dict]:
    """The store's feature classifier (trained once per dataset and kept under eval/classifier/)."""
    data_committed_at = store.manifest("data").get("committed_at")
    if store.is_committed(CLASSIFIER_DIR):
        info = json.loads(store.read_verified(CLASSIFIER_DIR, "config.json"))
        if (info["target"], info["num_classes"], info["in_channels"], info["data"]) == (
            target_name,
            num_classes,
            x.shape[1],
            data_committed_at,
        ):
            model = FeatureClassifier(info["in_channels"], num_classes)
            model.load_state_dict(load(store.read_verified(CLASSIFIER_DIR, "model.safetensors")))
            return model.eval(), info
        raise ValueError(
            f"{store.url}/{CLASSIFIER_DIR} holds a feature classifier for other data or targets ({info['target']}, "
            f"{info['num_classes']} classes); this evaluation needs one for {target_name} ({num_classes} classes) on "
            "the current dataset; delete that folder to retrain it (distances from the two networks are not comparable)"
        )
    log.info(
        "training the FD-classifier feature network on %d samples (%s, %d classes)", len(x), target_name, num_classes
    )
    model, acc = train_classifier(x, targets, num_classes)
    info = {
        "target": target_name,
        "num_classes": num_classes,
        "in_channels": int(x.shape[1]),
        "val_accuracy": acc,
        "data": data_committed_at,
    }
    known = {
        "model.safetensors": store.write_hashed(
            f"{CLASSIFIER_DIR}/model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()})
        ),
        "config.json": store.write_hashed(f"{CLASSIFIER_DIR}/config.json", json.dumps(info, indent=2).encode()),
    }
    store.commit(CLASSIFIER_DIR, list(known), known=known)
    return model, info


# --- FID (optional, pinned library) ---------------------------------------------------------


def load_state_dict_safely(path: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the torch-saved state dict at ``path``, read by torch's restricted unpickler
    (``weights_only=True``: tensors, numbers and plain containers; a file that asks for anything
    else, code included, is refused before it runs). With ``sha256``, the file's digest is checked
    first. ValueError naming the file otherwise."""
    if sha256 is not None:
        got = file_digest(path)["sha256"]
        if got != sha256:
            raise ValueError(
                f"{path}: sha256 {got[:12]}… but expected {sha256[:12]}… (not the published file, or damaged): "
                "delete it and fetch it again"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler names what the file holds beyond tensors
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} is not a plain state dict of tensors; refusing to unpickle the rest ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; refusing it")
    return state


def fid_state_dict(url: str, *_, **__) -> dict[str, torch.Tensor]:
    """pytorch-fid's Inception weights, in place of its ``load_state_dict_from_url`` (which unpickles
    with torch's unrestricted unpickler): the file from torch.hub's cache (``$TORCH_HOME/hub/checkpoints/``),
    downloaded there first if missing, checked against ``FID_WEIGHTS_SHA256``, read without
    unpickling code (``load_state_dict_safely``)."""
    if url != FID_WEIGHTS_URL:
        raise ValueError(
            f"pytorch-fid asked for {url}, not the weights ddm pins ({FID_WEIGHTS_URL}): check {FID_REQUIREMENT}"
        )
    folder = f"{torch.hub.get_dir()}/checkpoints"  # where torch.hub (so pytorch-fid) keeps downloaded weights
    path = os.path.join(folder, FID_WEIGHTS)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        try:  # to a temporary name next to it, renamed when its digest is right
            torch.hub.download_url_to_file(url, path, hash_prefix=FID_WEIGHTS_SHA256, progress=False)
        except Exception as e:  # noqa: BLE001 - urllib / socket errors, a wrong digest
            raise ValueError(
                f"FID needs the Inception-v3 FID weights ({FID_WEIGHTS}), which are downloaded on first use, and "
                f"they could not be fetched ({type(e).__name__}: {e}). Put the file in {folder}/ (torch.hub's cache, "
                "$TORCH_HOME/hub/checkpoints) on an offline machine, or use metric=fd_classifier"
            ) from e
    return load_state_dict_safely(path, FID_WEIGHTS_SHA256)


@contextlib.contextmanager
def _safe_fid_weights():
    """pytorch-fid builds its Inception with ``fid_state_dict`` as its weight loader."""
    import pytorch_fid.inception as inception

    own = getattr(inception, "load_state_dict_from_url", None)
    inception.load_state_dict_from_url = fid_state_dict
    try:
        yield
    finally:
        if own is None:
            del inception.load_state_dict_from_url
        else:
            inception.load_state_dict_from_url = own


class InceptionFeatures:
    """Inception-v3 pool3 features from ``pytorch-fid`` (the pinned FID implementation), its weights
    read by ``fid_state_dict`` (checked, never unpickled as code)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)  # the evaluation's device: a GPU when it samples on one
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError as e:
            raise ValueError(
                f"metric=fid needs {FID_REQUIREMENT}: pip install 'ddm[fid]' (or use metric=fd_classifier, which "
                "works offline)"
            ) from e
        with _safe_fid_weights():
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 100) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch_size):
            xb = (x[i : i + batch_size].to(self.device).float().clamp(-1, 1) + 1) / 2  # pytorch-fid wants [0, 1]
            if xb.shape[1] == 1:
                xb = xb.repeat(1, 3, 1, 1)
            out.append(self.model(xb)[0].flatten(1))
        return torch.cat(out).cpu().numpy()
