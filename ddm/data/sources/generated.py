"""Generated sources: made in order by one process from one random stream (``generate``), cut into
the same units as files. ``digits`` (scikit-learn's 8x8 handwriting), ``synthetic:N`` (class-dependent
blobs) and ``glyphs:N`` (characters rendered from fonts, ``ddm.data.glyphs``); all offline."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from ddm.data import glyphs
from ddm.data.config import IngestConfig
from ddm.data.glyphs import describe, render_drawn
from ddm.data.sources.base import Source, no_captions
from ddm.data.sources.images import to_chw

log = logging.getLogger("ddm.ingest")


class DigitsSource(Source):
    """scikit-learn's 8x8 digits: real handwriting that ships with the package (no network)."""

    generated = True

    def __init__(self, cfg: IngestConfig):
        from sklearn.datasets import load_digits  # scikit-learn takes 1.5 s to import: only where used

        no_captions(cfg, "scikit-learn's handwritten digits")
        digits = load_digits()
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
        self.labels = digits.target.astype(np.int64)
        self.class_names = [str(i) for i in range(10)]
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.labels)

    def generate(self):
        res, ch = self.cfg.resolution, self.cfg.channels or 1
        for img, label in zip(self.images, self.labels):
            if (res in (0, 8)) and ch == 1:
                yield int(label), img[None]
            else:
                yield int(label), to_chw(Image.fromarray(img), res or 8, ch)


class SyntheticSource(Source):
    """N small images of class-dependent Gaussian blobs plus noise, generated deterministically."""

    generated = True

    def __init__(self, cfg: IngestConfig, n: int, num_classes: int = 10):
        if n < 1:
            raise ValueError(f"synthetic source needs N >= 1, got {n}")
        no_captions(cfg, "Gaussian blobs")
        self.n, self.cfg, self.num_classes = n, cfg, num_classes
        self.class_names = [f"blob{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def generate(self):
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
    weight (``ddm.data.glyphs``); classes are the characters of ``charset``; deterministic in ``seed``.
    With ``caption=describe`` (or auto) each image carries a caption of what was drawn
    (``glyphs.describe``); the images are the same with or without."""

    generated = True

    def __init__(self, cfg: IngestConfig, n: int):
        if n < 1:
            raise ValueError(f"glyphs source needs N >= 1, got {n}")
        self.charset = cfg.charset or glyphs.DEFAULT_CHARSET
        if len(set(self.charset)) != len(self.charset):
            raise ValueError(f"ingest.charset {self.charset!r} repeats a character; each character is one class")
        self.font_digests = glyphs.find_fonts(list(cfg.fonts), self.charset)
        self.fonts = list(self.font_digests)
        if cfg.caption not in ("", "auto", "describe"):
            raise ValueError(
                f"caption={cfg.caption!r}: glyph captions are made from what was drawn; use caption=describe (or auto)"
            )
        self.caption = "describe" if cfg.caption else ""
        self.n, self.cfg = n, cfg
        self.class_names = list(self.charset)
        log.info("glyphs: %d samples of %d characters from %d font faces", n, len(self.charset), len(self.fonts))

    @property
    def info(self) -> dict:
        """What the dataset was made from (the manifest keeps it): each face's file name and sha256."""
        return {"fonts": [{"file": os.path.basename(f), "sha256": d} for f, d in self.font_digests.items()]}

    def __len__(self) -> int:
        return self.n

    def generate(self):
        res, ch = self.cfg.resolution or 16, self.cfg.channels or 1
        rng = np.random.default_rng(self.cfg.seed)
        for _ in range(self.n):
            label = int(rng.integers(len(self.charset)))
            font, char = self.fonts[int(rng.integers(len(self.fonts)))], self.charset[label]
            img, drawn = render_drawn(font, char, res, rng)
            sample = (label, np.repeat(img[None], ch, axis=0))
            yield (*sample, describe(font, char, drawn)) if self.caption else sample
