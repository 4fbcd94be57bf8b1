"""What every source is: its class names, its length, its units of work (one per output shard),
and how a unit's items become samples (``load_items``: decoded, unreadable ones skipped and listed)."""

from __future__ import annotations

import abc
import logging
from typing import Iterator

import numpy as np

from ddm.data.config import IngestConfig
from ddm.data.pipeline import even_units
from ddm.data.sources.images import UNREADABLE, decode

log = logging.getLogger("ddm.ingest")

# (position, label, encoded image or None, where, caption: None where the source reads none or
# the sample has none)
Item = tuple[int, int | None, bytes | None, str, str | None]


class Source(abc.ABC):
    """Knows its class names and how many items it has; cuts them into units of work."""

    class_names: list[str]
    info: dict = {}
    generated = False  # True: made in order by this process (``generate``), not loaded per unit
    kind = ""  # file sources: the kind of their units, which says who reads them (``items``)
    what = "source"  # how errors name a file source
    caption = ""  # where this source's captions come from (the ingest setting, ``auto`` resolved)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def units(self, shard_size: int) -> list[dict]:
        """One dict per output shard: its index, its first item's position and what to load."""
        return [
            {"index": i, "start": a, "stop": b, **self._unit(a, b)}
            for i, (a, b) in enumerate(even_units(len(self), shard_size))
        ]

    def _unit(self, start: int, stop: int) -> dict:
        return {}

    @staticmethod
    def items(unit: dict) -> Iterator[Item]:
        """The items of one of a file source's units, read anywhere (a Ray task on any node)."""
        raise NotImplementedError

    def validate(self, cfg: IngestConfig) -> None:
        """Decode the first few items (before any cluster work) so a wrong source fails at once.
        Generated sources have nothing to check; they have ``generate()`` instead of units to load."""
        if self.generated:
            return
        unit = self.units(min(len(self), 16))[0]
        part = load_items(unit, self.items(unit), cfg.resolution, cfg.channels)
        if len(part["ids"]) == 0:
            raise ValueError(
                f"{self.what} {cfg.source!r} produced no readable samples among its first "
                f"{unit['stop'] - unit['start']} ({', '.join(part['skipped'][:3])}); check the files, their format and "
                "the image/label columns"
            )


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def url_of(fs, path: str) -> str:
    """A path of ``fs`` as a URL any process can open (local paths stay paths)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def pieces(files: list[str], counts: list[int], start: int, stop: int) -> list[list]:
    """[file, first, stop) pieces of the global item range [start, stop) over files of ``counts`` items."""
    out, offset = [], 0
    for f, n in zip(files, counts):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append([f, lo - offset, hi - offset])
        offset += n
    return out


def load_items(unit: dict, items: Iterator[Item], resolution: int, channels: int) -> dict:
    """Decode, convert and resize one unit's ``items`` (an unreadable or unlabeled one is skipped
    and listed); every sample of a unit must come out with the same shape."""
    ids, arrays, labels, captions, skipped = [], [], [], [], []
    for pos, label, raw, where, caption in items:
        if label is None:
            skipped.append(where)
            log.warning("skipping %s: it has no label", where)
            continue
        try:
            if raw is None:
                raise OSError("no image bytes")
            arr = decode(raw, resolution, channels or 3)
        except UNREADABLE as e:
            skipped.append(where)
            log.warning("skipping unreadable image %s (%s)", where, type(e).__name__)
            continue
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(
                f"{where} has shape {arr.shape} but earlier samples have {arrays[0].shape}; "
                "set resolution=<side> so every image is resized to one size"
            )
        ids.append(pos), arrays.append(arr), labels.append(int(label)), captions.append(clean_caption(caption))
    part = {
        "index": unit["index"],
        "ids": np.asarray(ids, dtype=np.int64),
        "arrays": np.stack(arrays) if arrays else np.zeros((0,), np.uint8),
        "labels": np.asarray(labels, dtype=np.int32),
        "skipped": skipped,
    }
    if unit.get("caption"):
        part["captions"] = captions
    return part


def clean_caption(text: str | bytes | None) -> str:
    """A caption as stored: text with its surrounding whitespace stripped; "" for none."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return str(text).strip()


def no_captions(cfg: IngestConfig, what: str) -> None:
    """Refuse ``caption`` for a source that has none."""
    if cfg.caption:
        raise ValueError(
            f"source {cfg.source!r} ({what}) has no captions; leave ingest.caption empty, or ingest a captioned "
            "source (glyphs:N with caption=describe, Parquet with a text column, WebDataset with .txt members, an "
            "image folder with .txt sidecars)"
        )
