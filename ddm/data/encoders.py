"""Networks the data stage runs over images: the SD-VAE encoder (``ingest.encoder=vae``) and the
DINOv2 feature extractor (``partition.features=dinov2``).

Both load pretrained weights from the Hugging Face hub (diffusers' AutoencoderKL, transformers'
Dinov2Model) and say what to do when the package or the weights are missing. The weights load as
safetensors only (never a pickle) and at a pinned revision: the default models' commits below (a
hub repository's main branch can change under a name), or the one a spec names
(``vae:<hub id>@<revision>``, ``dinov2:<hub id>@<revision>``; another id without one: the hub's
current main, with a warning). ``describe()`` is what the data stage records of the weights it
used: the model and its revision. ``vae:random`` and
``dinov2:random`` build the same architectures (SD-VAE's, DINOv2-small's) with seeded random
weights: for tests and throughput benchmarks offline, never for a dataset someone trains on (the
latents and features carry no meaning, and a warning says so).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("ddm.data")

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_DINOV2 = "facebook/dinov2-small"
# The hub commits the default models load at (the snapshot folders that downloads of these repositories
# make, each holding the model's safetensors weights); a spec's own @<revision> replaces them.
VAE_REVISION = "f04b2c4b98319346dad8c65879f680b1997b204a"
DINOV2_REVISION = "ed25f3a31f01632728cabb09d1542f84ab7b0056"
PINNED = {DEFAULT_VAE: VAE_REVISION, DEFAULT_DINOV2: DINOV2_REVISION}
RANDOM = "random"


def device() -> torch.device:
    """The GPU Ray gave this worker (CUDA_VISIBLE_DEVICES names it), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hub_error(what: str, model_id: str, revision: str | None, e: Exception, fallback: str) -> ValueError:
    at = f" at revision {revision}" if revision else ""
    rev = f" --revision {revision}" if revision else ""
    return ValueError(
        f"could not load the {what} weights {model_id!r}{at} as safetensors ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200] if str(e) else ''}); they come from the Hugging Face hub: make them "
        f"reachable (network, or HF_HOME with a cached copy: huggingface-cli download {model_id}{rev}) or use "
        f"{fallback}"
    )


def hub_model(spec: str, default: str) -> tuple[str, str | None]:
    """(hub id, revision) of ``spec``: ``vae`` -> the default id at its pinned commit;
    ``vae:<hub id>[@<revision>]`` -> that id at that revision (a default id without one: its pinned
    commit; another: None, the hub's main); ``vae:random`` -> (``random``, None)."""
    name = spec.split(":", 1)[1] if ":" in spec else default
    repo, _, revision = name.partition("@")
    return repo, revision or PINNED.get(repo)


def model_id(spec: str, default: str) -> str:
    """``vae`` -> the default hub id; ``vae:<hub id>[@<revision>]`` -> that id; ``vae:random`` -> ``random``."""
    return hub_model(spec, default)[0]


def _pretrained(cls, what: str, repo: str, revision: str | None, fallback: str, cache_dir: str | None):
    """``cls.from_pretrained`` of the hub weights, safetensors only, at ``revision``."""
    if revision is None:
        log.warning(
            "the %s weights %r load at the hub's current main (no revision named): name one to pin them, "
            "e.g. %s@<commit>",
            what, repo, repo,
        )  # fmt: skip
    try:
        return cls.from_pretrained(repo, revision=revision, use_safetensors=True, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - hub/network/cache errors come in many types
        raise _hub_error(what, repo, revision, e, fallback) from e


class VAEEncoder:
    """SD-VAE latents (paper: 256px images -> 4 x 32 x 32) via diffusers' AutoencoderKL, in batches
    on this worker's GPU when it has one. Latents are stored as float16, scaled by the VAE's
    scaling factor."""

    def __init__(self, spec: str, batch_size: int = 64, seed: int = 0, cache_dir: str | None = None):
        (self.model_id, self.revision), self.batch_size = hub_model(spec, DEFAULT_VAE), batch_size
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ValueError(
                "encoder=vae needs the diffusers package (pip install diffusers); or use encoder=identity for pixels"
            ) from e
        if self.model_id == RANDOM:
            log.warning("encoder vae:random: SD-VAE's architecture with random weights (tests, benchmarks only)")
            torch.manual_seed(seed)
            self.vae = AutoencoderKL(  # the SD-VAE (kl-f8) configuration
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                sample_size=256,
            )
        else:
            self.vae = _pretrained(AutoencoderKL, "VAE", self.model_id, self.revision, "encoder=identity", cache_dir)
        self.device = device()
        self.vae = self.vae.eval().to(self.device)
        self.scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def describe(self) -> dict:
        """What the data stage records of the weights: the hub id and the revision they loaded at."""
        return {"model": self.model_id, "revision": self.revision}

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> float16 latents (N, 4, H/8, W/8)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[i : i + self.batch_size]).to(self.device).float() / 127.5 - 1.0
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            # The latent distribution's mean: a deterministic encoding (the same image, the same latent).
            out.append((self.vae.encode(x).latent_dist.mean * self.scale).half().cpu().numpy())
        return np.concatenate(out)


class DINOv2Model:
    """Pooled, L2-normalised DINOv2 features (the paper's extractor) of uint8 images resized to
    ``resolution`` (224), in batches on this worker's GPU when it has one."""

    def __init__(
        self, spec: str, batch_size: int = 64, resolution: int = 224, seed: int = 0, cache_dir: str | None = None
    ):
        (self.model_id, self.revision), self.batch_size = hub_model(spec, DEFAULT_DINOV2), batch_size
        self.resolution = resolution
        try:
            from transformers import Dinov2Config, Dinov2Model
        except ImportError as e:
            raise ValueError(
                "features=dinov2 needs the transformers package (pip install transformers) and the DINOv2 "
                "weights; use features=pca to partition offline"
            ) from e
        if self.model_id == RANDOM:
            log.warning("features dinov2:random: DINOv2-small's architecture with random weights (tests only)")
            torch.manual_seed(seed)
            self.model = Dinov2Model(Dinov2Config(hidden_size=384, num_attention_heads=6, num_hidden_layers=12))
        else:
            self.model = _pretrained(Dinov2Model, "DINOv2", self.model_id, self.revision, "features=pca", cache_dir)
        self.device = device()
        self.model = self.model.eval().to(self.device)
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)

    def describe(self) -> dict:
        """What the features' manifest records of the weights: the hub id and their revision."""
        return {"model": self.model_id, "revision": self.revision}

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[i : i + self.batch_size]).to(self.device).float() / 255.0
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = torch.nn.functional.interpolate(x, size=self.resolution, mode="bicubic", align_corners=False)
            pooled = self.model(pixel_values=(x - self.mean) / self.std).pooler_output
            out.append(torch.nn.functional.normalize(pooled, dim=1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)
