"""``glyphs:N``: a real, offline image dataset richer than digits, in the spirit of notMNIST.

Each sample is one character of ``charset`` (the class) rendered from one of the TrueType/OpenType
fonts found, with a random size, position, rotation, shear and stroke weight, drawn at 4x the
resolution and box-filtered down (so edges keep their anti-aliasing), white on black. The fonts
give the semantic variety that partitioning finds (serif, sans, monospace, bold, italic, the
Computer Modern and STIX faces); the augmentations make every sample a new image, so a training
run of a few hundred thousand samples sees each image once.

Fonts: by default the ones matplotlib ships (DejaVu, STIX, Computer Modern: the same files on every
machine with the pinned matplotlib, so ``glyphs:N`` is the same dataset everywhere); ``fonts`` in
the ingest config adds folders or files (e.g. ``/usr/share/fonts`` after ``apt-get install
fonts-noto-core fonts-liberation2 fonts-urw-base35``). Only faces that have a glyph for every
character of ``charset`` are used; the manifest lists each face with its sha256.
"""

from __future__ import annotations

import hashlib
import os
import string
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_CHARSET = string.digits + string.ascii_uppercase + string.ascii_lowercase
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
# Faces without ordinary letters at ordinary code points (symbols, size variants, fallbacks).
_SYMBOL_FACES = ("cmsy", "cmex", "STIXSiz", "STIXNonUni", "LastResort", "Symbol", "Dingbat", "Emoji", "Math")
SUPERSAMPLE = 4


def matplotlib_fonts() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf")


def find_fonts(locations: list[str], charset: str) -> dict[str, str]:
    """Font files under ``locations`` (folders searched recursively, or files; "matplotlib" is
    matplotlib's bundled fonts) that cover every character of ``charset``, sorted, one per
    distinct file content, each with its sha256. A location that does not exist is an error."""
    from fontTools.ttLib import TTFont  # a matplotlib dependency

    files: list[str] = []
    for loc in locations or ["matplotlib"]:
        path = matplotlib_fonts() if loc == "matplotlib" else os.path.expanduser(loc)
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            files += [str(p) for p in sorted(Path(path).rglob("*")) if p.suffix.lower() in FONT_EXTENSIONS]
        else:
            raise ValueError(
                f"font location {loc!r} does not exist; give font folders or files in ingest.fonts (empty: the fonts "
                "matplotlib ships); on Debian, apt-get install fonts-noto-core puts more under /usr/share/fonts"
            )
    chosen: dict[str, str] = {}
    for f in sorted(set(files)):
        if any(s.lower() in os.path.basename(f).lower() for s in _SYMBOL_FACES):
            continue
        with open(f, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if digest in chosen.values():
            continue
        try:
            with TTFont(f, fontNumber=0, lazy=True) as font:
                cmap = font.getBestCmap() or {}
        except Exception:  # noqa: BLE001 - a broken font file is skipped, not fatal
            continue
        if all(ord(c) in cmap for c in charset):
            chosen[f] = digest
    if not chosen:
        raise ValueError(
            f"no font under {locations or ['matplotlib']} has glyphs for every character of {charset!r}; add font "
            "folders to ingest.fonts (e.g. /usr/share/fonts after apt-get install fonts-noto-core) or shorten "
            "ingest.charset"
        )
    return chosen


@lru_cache(maxsize=4096)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def render(font: str, char: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One augmented glyph as uint8 (resolution, resolution), white on black."""
    return render_drawn(font, char, resolution, rng)[0]


def render_drawn(font: str, char: str, resolution: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One augmented glyph and what was drawn: ``scale`` (the glyph's size over the image's, 0.55
    to 0.85), ``thick`` (drawn with a stroke), ``angle`` (degrees) and ``shear``. The random draws
    are ``render``'s, in its order, so a dataset is the same with or without its captions."""
    big = resolution * SUPERSAMPLE
    scale = rng.uniform(0.55, 0.85)
    size = int(round(big * scale))
    thick = int(rng.integers(0, 2))
    stroke = thick * max(1, big // 32)  # half the samples drawn bolder
    f = _font(font, size)
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=f, stroke_width=stroke)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    draw.text((big - cx, big - cy), char, fill=255, font=f, stroke_width=stroke, stroke_fill=255)
    angle = rng.uniform(-12, 12)
    shear = rng.uniform(-0.2, 0.2)
    dx, dy = rng.uniform(-0.08, 0.08, size=2) * big
    # Affine about the canvas centre: rotation, horizontal shear, then a shift (PIL maps output -> input).
    a = np.deg2rad(angle)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    inv = np.linalg.inv(m)
    # Only the centre big x big window of the canvas is produced: output pixel u is canvas point u + big/2.
    c = np.array([big, big], dtype=float)
    offset = c - inv @ (c + np.array([dx, dy]) - big // 2)
    out = canvas.transform(
        (big, big), Image.AFFINE, (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1]), Image.BILINEAR
    )
    drawn = {"scale": float(scale), "thick": bool(thick), "angle": float(angle), "shear": float(shear)}
    return np.asarray(out.reduce(SUPERSAMPLE), dtype=np.uint8), drawn


def lean(angle: float, shear: float) -> float:
    """How far the glyph's vertical leans, in degrees (> 0: its top to the right), after the
    rotation by ``angle`` and the horizontal ``shear`` that ``render`` applies (image y points down)."""
    a = np.deg2rad(angle)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    dx, dy = m @ np.array([0.0, -1.0])  # where "up" goes
    return float(np.degrees(np.arctan2(dx, -dy)))


# The terse family names of the Computer Modern faces matplotlib ships, in words.
_FAMILIES = {
    "cmr10": "computer modern roman",
    "cmb10": "computer modern bold",
    "cmss10": "computer modern sans",
    "cmtt10": "computer modern typewriter",
    "cmti10": "computer modern text italic",
    "cmmi10": "computer modern math italic",
}


@lru_cache(maxsize=256)
def face_name(path: str) -> tuple[str, str]:
    """(family, style) of a font file from its name table, lowercase: ("dejavu serif", "bold italic");
    "regular"/"book"/"roman" styles become ""."""
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=0, lazy=True) as font:
        names = font["name"]
        family = str(names.getDebugName(16) or names.getDebugName(1) or os.path.basename(path).rsplit(".", 1)[0])
        style = str(names.getDebugName(17) or names.getDebugName(2) or "")
    style = " ".join(
        w for w in style.lower().replace("oblique", "italic").split() if w not in ("regular", "book", "roman")
    )
    return _FAMILIES.get(family.lower(), family.lower()), style


def char_name(char: str) -> str:
    if char.isdigit():
        return f"digit {char}"
    if char.isalpha():
        return f"{'uppercase' if char.isupper() else 'lowercase'} {char}"
    return f"the character {char!r}"


def describe(font: str, char: str, drawn: dict) -> str:
    """A caption of what ``render_drawn`` drew, e.g. "uppercase R in bold italic dejavu serif,
    large, thick strokes, leaning left": the character, the face, the size (small < 0.65 <= medium
    <= 0.75 < large), the stroke and the lean (beyond 4 degrees)."""
    family, style = face_name(font)
    size = "small" if drawn["scale"] < 0.65 else "large" if drawn["scale"] > 0.75 else "medium"
    tilt = lean(drawn["angle"], drawn["shear"])
    leaning = "leaning right" if tilt > 4 else "leaning left" if tilt < -4 else "upright"
    stroke = "thick strokes" if drawn["thick"] else "thin strokes"
    return f"{char_name(char)} in {f'{style} ' if style else ''}{family}, {size}, {stroke}, {leaning}"
