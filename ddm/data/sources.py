"""What ``ddm ingest`` reads and how it encodes: sources (each yields (label, uint8 (C, H, W)) and
knows its class names; unreadable images are skipped and listed) and the SD-VAE encoder."""

from __future__ import annotations

import abc
import io
import logging
import os
from typing import TYPE_CHECKING, Iterator

import fsspec
import numpy as np
import pyarrow.dataset as pads
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # the config belongs to the ingest stage, which imports this module
    from ddm.data.ingest import IngestConfig

log = logging.getLogger("ddm.ingest")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


class Source(abc.ABC):
    """Yields (label, uint8 array (C, H, W)); knows its class names and what it had to skip."""

    class_names: list[str]
    skipped: list[str]

    @abc.abstractmethod
    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


def to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL image as 8-bit grayscale (``channels=1``) or RGB, its pixel values scaled, never clipped.

    Applied in order: the EXIF orientation (a phone photo stored sideways comes out upright); 16-bit
    and 32-bit integer grayscale scaled to 8 bits (v / 257: PIL's own ``convert`` clips them at 255,
    which saturates a 16-bit PNG); transparency composited over white (PIL's ``convert`` would keep
    whatever colour the transparent pixels happen to hold); palette and CMYK through PIL's
    conversions.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:  # "I" holding 8-bit values stays as it is
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _to_chw(img, resolution: int, channels: int) -> np.ndarray:
    """PIL image -> 8-bit (``to_8bit``), center-cropped, resized uint8 (C, H, W)."""
    img = to_8bit(img, channels)
    if resolution:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != resolution:
            img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class DigitsSource(Source):
    """scikit-learn's 8x8 digits: real handwriting that ships with the package (no network)."""

    def __init__(self, cfg: IngestConfig):
        from sklearn.datasets import load_digits  # scikit-learn takes 1.5 s to import: only where used

        digits = load_digits()
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
        self.labels = digits.target.astype(np.int64)
        self.class_names = [str(i) for i in range(10)]
        self.skipped = []
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        res, ch = self.cfg.resolution, self.cfg.channels or 1
        for img, label in zip(self.images, self.labels):
            if (res in (0, 8)) and ch == 1:
                yield int(label), img[None]
            else:
                yield int(label), _to_chw(Image.fromarray(img), res or 8, ch)


class SyntheticSource(Source):
    """N small images of class-dependent Gaussian blobs plus noise, generated deterministically."""

    def __init__(self, cfg: IngestConfig, n: int, num_classes: int = 10):
        if n < 1:
            raise ValueError(f"synthetic source needs N >= 1, got {n}")
        self.n, self.cfg, self.num_classes = n, cfg, num_classes
        self.class_names = [f"blob{i}" for i in range(num_classes)]
        self.skipped = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        res, ch = self.cfg.resolution or 16, self.cfg.channels or 1
        rng = np.random.default_rng(self.cfg.seed)
        yy, xx = np.mgrid[0:res, 0:res] / res
        centers = np.random.default_rng(1234).uniform(0.2, 0.8, size=(self.num_classes, 2))
        chunk = 1024
        for start in range(0, self.n, chunk):
            m = min(chunk, self.n - start)
            labels = rng.integers(0, self.num_classes, m)
            jitter = rng.normal(0, 0.05, size=(m, 2))
            c = centers[labels] + jitter
            d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
            img = np.exp(-d2 / 0.02) + rng.normal(0, 0.05, size=(m, res, res))
            img = np.clip(img * 255, 0, 255).astype(np.uint8)
            for i in range(m):
                yield int(labels[i]), np.repeat(img[i][None], ch, axis=0)


class GlyphSource(Source):
    """``glyphs:N``: N characters rendered from fonts with random size, position, rotation, shear and
    weight (``ddm.data.glyphs``); classes are the characters of ``charset``; deterministic in ``seed``."""

    def __init__(self, cfg: IngestConfig, n: int):
        from ddm.data import glyphs

        if n < 1:
            raise ValueError(f"glyphs source needs N >= 1, got {n}")
        self.charset = cfg.charset or glyphs.DEFAULT_CHARSET
        if len(set(self.charset)) != len(self.charset):
            raise ValueError(f"ingest.charset {self.charset!r} repeats a character; each character is one class")
        self.font_digests = glyphs.find_fonts(list(cfg.fonts), self.charset)
        self.fonts = list(self.font_digests)
        self.n, self.cfg = n, cfg
        self.class_names = list(self.charset)
        self.skipped = []
        log.info("glyphs: %d samples of %d characters from %d font faces", n, len(self.charset), len(self.fonts))

    @property
    def info(self) -> dict:
        """What the dataset was made from (the manifest keeps it): each face's file name and sha256."""
        return {"fonts": [{"file": os.path.basename(f), "sha256": d} for f, d in self.font_digests.items()]}

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from ddm.data.glyphs import render

        res, ch = self.cfg.resolution or 16, self.cfg.channels or 1
        rng = np.random.default_rng(self.cfg.seed)
        for _ in range(self.n):
            label = int(rng.integers(len(self.charset)))
            img = render(self.fonts[int(rng.integers(len(self.fonts)))], self.charset[label], res, rng)
            yield label, np.repeat(img[None], ch, axis=0)


class FolderSource(Source):
    """root/<class name>/<image files>; classes sorted by name, files sorted within a class."""

    def __init__(self, cfg: IngestConfig, root: str):
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        if not classes:
            raise ValueError(f"image folder {root!r} has no class sub-folders; expected {root}/<class>/<images>")
        self.files: list[tuple[str, int]] = []
        for idx, name in enumerate(classes):
            folder = os.path.join(root, name)
            for f in sorted(os.listdir(folder)):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    self.files.append((os.path.join(folder, f), idx))
        if not self.files:
            raise ValueError(f"image folder {root!r} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.class_names = classes
        self.cfg = cfg
        self.skipped = []

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        for path, label in self.files:
            try:
                with Image.open(path) as img:
                    arr = _to_chw(img, self.cfg.resolution, self.cfg.channels or 3)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                self.skipped.append(path)
                log.warning("skipping unreadable image %s (%s)", path, type(e).__name__)
                continue
            yield label, arr


class ParquetSource(Source):
    """Parquet file(s) with an encoded image column (bytes, or a {bytes, path} struct) and labels."""

    def __init__(self, cfg: IngestConfig, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise ValueError(f"Parquet source {url!r} does not exist")
        self.dataset = pads.dataset(path, filesystem=fs, format="parquet")
        names = self.dataset.schema.names
        for col in (cfg.image_column, cfg.label_column):
            if col not in names:
                raise ValueError(f"Parquet source {url!r} has no column {col!r}; its columns are {names}")
        self.n = self.dataset.count_rows()
        if self.n == 0:
            raise ValueError(f"Parquet source {url!r} has no rows")
        labels = self.dataset.to_table(columns=[cfg.label_column], use_threads=False).column(0).to_numpy()
        self.class_names = [str(i) for i in range(int(labels.max()) + 1)]
        self.cfg = cfg
        self.skipped = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        cfg = self.cfg
        row = 0
        # use_threads=False: see ddm.data.shards.read_parquet_bytes (pyarrow exit aborts).
        for batch in self.dataset.to_batches(columns=[cfg.image_column, cfg.label_column], use_threads=False):
            images, labels = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            for img, label in zip(images, labels):
                raw = img["bytes"] if isinstance(img, dict) else img
                try:
                    with Image.open(io.BytesIO(raw)) as im:
                        arr = _to_chw(im, cfg.resolution, cfg.channels or 3)
                except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
                    self.skipped.append(f"row {row}")
                    log.warning("skipping unreadable image in row %d (%s)", row, type(e).__name__)
                    row += 1
                    continue
                row += 1
                yield int(label), arr


def open_source(cfg: IngestConfig) -> Source:
    src = cfg.source
    if src == "digits":
        return DigitsSource(cfg)
    for kind, cls in (("synthetic", SyntheticSource), ("glyphs", GlyphSource)):
        if src.startswith(f"{kind}:"):
            try:
                n = int(src.split(":", 1)[1])
            except ValueError as e:
                raise ValueError(f"source {src!r}: expected {kind}:<number of samples>") from e
            return cls(cfg, n)
    if "://" not in src and os.path.isdir(src) and not any(f.endswith(".parquet") for f in os.listdir(src)):
        return FolderSource(cfg, src)
    if src.endswith(".parquet") or "://" in src or os.path.isdir(src):
        return ParquetSource(cfg, src)
    raise ValueError(
        f"source {src!r} does not exist; use digits, glyphs:N, synthetic:N, an image folder or a Parquet path"
    )


# --- encoders ---------------------------------------------------------------------------------


class VAEEncoder:
    """SD-VAE latents (paper: 256px images -> 32x32x4) via diffusers' AutoencoderKL."""

    def __init__(self, spec: str):
        self.model_id = spec.split(":", 1)[1] if ":" in spec else DEFAULT_VAE
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ValueError(
                "encoder=vae needs the diffusers package (pip install diffusers); or use encoder=identity for pixels"
            ) from e
        try:
            self.vae = AutoencoderKL.from_pretrained(self.model_id).eval()
        except Exception as e:  # noqa: BLE001 - hub/network/cache errors come in many types
            raise ValueError(
                f"could not load the VAE weights {self.model_id!r} ({type(e).__name__}); they come from the "
                "Hugging Face hub: make them reachable (network, or HF_HOME with a cached copy) or use encoder=identity"
            ) from e
        self.scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(images).float() / 127.5 - 1.0
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            return (self.vae.encode(x).latent_dist.sample() * self.scale).numpy().astype(np.float16)
