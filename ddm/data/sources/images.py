"""Images as a source hands them on: any PIL image (or encoded bytes) -> 8-bit, center-cropped,
resized uint8 (C, H, W); and what a decoder may raise on a bad one."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# What a decoder may raise on a bad image (truncated, not an image, too large, bad mode).
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError)


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


def to_chw(img, resolution: int, channels: int) -> np.ndarray:
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


def decode(raw: bytes, resolution: int, channels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W), 8-bit converted, center-cropped and resized."""
    with Image.open(io.BytesIO(raw)) as img:
        return to_chw(img, resolution, channels)
