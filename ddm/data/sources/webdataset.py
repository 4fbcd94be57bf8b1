"""WebDataset sources: tar shards of ``<key>.<ext>`` samples (an image, a ``.cls`` or ``.json``
label), from any fsspec URL; brace patterns name many shards (``train-{0000..1023}.tar``)."""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import fsspec

from ddm.data.config import IngestConfig
from ddm.data.sources.base import Item, Source, pieces, url_of
from ddm.data.sources.files import check_member_caption, text_member

log = logging.getLogger("ddm.ingest")

WDS_IMAGE = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm")


def _wds_samples(tf: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """A WebDataset tar's samples in order: (key, {extension: member}); a sample's files are
    consecutive members that share the key (the path up to the first dot of the file name)."""
    key, members = None, {}
    for m in tf:
        if not m.isfile():
            continue
        d, base = os.path.split(m.name)
        if base.startswith(".") or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        k = f"{d}/{stem}" if d else stem
        if k != key and key is not None:
            yield key, members
            members = {}
        key = k
        members[ext.lower()] = m
    if key is not None:
        yield key, members


def _wds_label(tf: tarfile.TarFile, members: dict, json_key: str) -> int | None:
    if "cls" in members:
        return int(tf.extractfile(members["cls"]).read().decode().strip())
    if "json" in members:
        value = json.loads(tf.extractfile(members["json"]).read()).get(json_key)
        return None if value is None else int(value)
    return None


def _scan_tar(url: str, json_key: str) -> dict:
    """One tar's sample count and label histogram (read once, before any work)."""
    counts: dict[int, int] = {}
    n = unlabeled = 0
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for _, members in _wds_samples(tf):
            n += 1
            label = _wds_label(tf, members, json_key)
            if label is None:
                unlabeled += 1
            else:
                counts[label] = counts.get(label, 0) + 1
    return {"samples": n, "labels": counts, "unlabeled": unlabeled}


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: ``a-{000..099}.tar`` (zero-padded ranges) and ``{x,y}``."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        options = [str(i).zfill(len(a)) for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in expand_braces(head + o + tail)]


class WebDatasetSource(Source):
    """WebDataset tar shards: samples of ``<key>.jpg|png|webp|...`` with a ``<key>.cls`` label (an
    integer) or a ``<key>.json`` holding one under ``label_column``. Captions, with ``caption=txt``
    (or another extension) or ``json:<key>``, come from that member of each sample (``auto``: txt);
    a sample without one gets "" (counted). Without any label in the whole dataset every sample is
    class 0 (unconditional)."""

    kind = "tar"
    what = "WebDataset source"

    def __init__(self, cfg: IngestConfig, spec: str):
        if "{" in spec:
            tars = expand_braces(spec)
        else:
            fs, path = fsspec.core.url_to_fs(spec)
            if not fs.exists(path):
                raise ValueError(f"WebDataset source {spec!r} does not exist")
            found = sorted(f for f in fs.find(path) if f.endswith(".tar")) if fs.isdir(path) else [path]
            tars = [url_of(fs, f) for f in found]
        if not tars:
            raise ValueError(f"WebDataset source {spec!r} holds no .tar shards")
        self.label_key = cfg.label_column
        self.caption = check_member_caption(cfg, self.what, "a sample's member")
        self._check_first_tar(tars[0])
        with ThreadPoolExecutor(16) as pool:  # headers and labels only: I/O bound
            scans = list(pool.map(lambda t: _scan_tar(t, self.label_key), tars))
        self.tars = tars
        self.counts = [s["samples"] for s in scans]
        labels: dict[int, int] = {}
        for s in scans:
            for k, v in s["labels"].items():
                labels[k] = labels.get(k, 0) + v
        self.labeled = bool(labels)
        if labels and min(labels) < 0:
            raise ValueError(f"WebDataset source {spec!r} has a negative class label ({min(labels)})")
        self.class_names = [str(i) for i in range(max(labels) + 1)] if labels else ["unlabeled"]
        self.info = {"tars": len(tars), "unlabeled_samples": sum(s["unlabeled"] for s in scans) if labels else 0}
        if not self.labeled:
            log.info("WebDataset %s has no .cls or .json labels: every sample is class 0 (unconditional)", spec)
        if sum(self.counts) == 0:
            raise ValueError(f"WebDataset source {spec!r} holds no samples (files named <key>.<ext>)")

    def _check_first_tar(self, url: str) -> None:
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for i, (key, members) in enumerate(_wds_samples(tf)):
                    if not any(e in members for e in WDS_IMAGE):
                        raise ValueError(
                            f"WebDataset shard {url!r}: sample {key!r} has no image file (found "
                            f"{sorted(members)}; expected one of {', '.join(WDS_IMAGE)})"
                        )
                    if i == 8:
                        break
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"WebDataset shard {url!r} is not a readable tar file ({e})") from e

    def __len__(self) -> int:
        return sum(self.counts)

    def _unit(self, start: int, stop: int) -> dict:
        return {
            "kind": self.kind,
            "label_key": self.label_key,
            "labeled": self.labeled,
            "caption": self.caption,
            "pieces": pieces(self.tars, self.counts, start, stop),
        }

    @staticmethod
    def items(unit: dict) -> Iterator[Item]:
        pos = unit["start"]
        for url, lo, hi in unit["pieces"]:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for k, (key, members) in enumerate(_wds_samples(tf)):
                    if k >= hi:
                        break
                    if k < lo:
                        continue
                    where = f"{url}:{key}"
                    ext = next((e for e in WDS_IMAGE if e in members), None)
                    raw = tf.extractfile(members[ext]).read() if ext else None
                    try:
                        label = _wds_label(tf, members, unit["label_key"]) if unit["labeled"] else 0
                    except (ValueError, UnicodeDecodeError):
                        label = None
                    caption = None
                    if unit["caption"]:
                        caption = text_member(
                            unit["caption"], lambda e: tf.extractfile(members[e]).read() if e in members else None
                        )
                    yield pos, label, raw, where, caption
                    pos += 1
