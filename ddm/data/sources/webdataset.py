"""WebDataset sources: tar shards of ``<key>.<ext>`` samples (an image, a ``.cls`` or ``.json``
label), from any fsspec URL; brace patterns name many shards (``train-{0000..1023}.tar``)."""

from __future__ import annotations

import contextlib
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
from ddm.data.sources.files import check_member_caption, data_file, text_member
from ddm.store.retries import refusal

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


def _wds_label(tf: tarfile.TarFile, members: dict, json_key: str, url: str) -> int | None:
    """A sample's class id from its ``.cls`` member (an integer) or its ``.json`` member's ``json_key``;
    None where it has neither. Anything else (text, a fraction, a negative number, broken JSON) is an
    error naming the member and the tar: a label that cannot be read is not silently dropped."""
    if "cls" in members:
        raw = tf.extractfile(members["cls"]).read()
        text = raw.decode("utf-8", errors="replace").strip()
        return _class_id(text, text if re.fullmatch(r"[+-]?\d+", text) else None, members["cls"].name, url)
    if "json" in members:
        name = members["json"].name
        try:
            doc = json.loads(tf.extractfile(members["json"]).read())
        except ValueError as e:
            raise ValueError(
                f"WebDataset shard {url!r}: {name} is not valid JSON ({e}); fix or remove the sample"
            ) from e
        value = doc.get(json_key) if isinstance(doc, dict) else None
        if value is None:
            return None
        whole = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            whole = value
        return _class_id(value, whole, f"{name} (key {json_key!r})", url)
    return None


def _class_id(value, whole, member: str, url: str) -> int:
    if whole is None:
        raise ValueError(
            f"WebDataset shard {url!r}: {member} holds {value!r}, not an integer class id (0, 1, 2, ...); fix the "
            "label, or set label_column=<the json key> for labels in .json members"
        )
    label = int(whole)
    if label < 0:
        raise ValueError(
            f"WebDataset shard {url!r}: {member} holds a negative class id ({label}); class ids are 0, 1, 2, ..."
        )
    return label


@contextlib.contextmanager
def tar_errors(url: str) -> Iterator[None]:
    """tarfile's errors as one line naming the shard (a tar cut short raises "unexpected end of data")."""
    try:
        yield
    except (tarfile.TarError, EOFError) as e:
        cut = "unexpected end of data" in str(e)
        raise ValueError(
            f"WebDataset shard {url!r} is {'truncated' if cut else 'not a readable tar file'} ({e}): "
            "copy it again or remove it from the source"
        ) from e


def _check_complete(tf: tarfile.TarFile, url: str) -> None:
    """A tar read to its end must end with the end-of-archive block (512 zero bytes): Python's tarfile
    stops without a word at a file cut between two members, or at a header cut short or overwritten,
    which would drop the samples after it."""
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if block != tarfile.NUL * tarfile.BLOCKSIZE:
        why = "the file ends" if len(block) < tarfile.BLOCKSIZE else "a member header is not valid"
        raise ValueError(
            f"WebDataset shard {url!r} is truncated or corrupt: after {len(tf.members)} members (byte {tf.offset}) "
            f"{why} where more members or the end-of-archive block should be; copy it again or remove it"
        )


def _scan_tar(url: str, json_key: str) -> dict:
    """One tar's sample count and label histogram (read once, before any work), the whole tar
    checked to be complete."""
    counts: dict[int, int] = {}
    n = unlabeled = 0
    with fsspec.open(url, "rb") as f, tar_errors(url), tarfile.open(fileobj=f, mode="r:") as tf:
        for _, members in _wds_samples(tf):
            n += 1
            label = _wds_label(tf, members, json_key, url)
            if label is None:
                unlabeled += 1
            else:
                counts[label] = counts.get(label, 0) + 1
        _check_complete(tf, url)
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
            found = sorted(f for f in fs.find(path) if data_file(f, ".tar")) if fs.isdir(path) else [path]
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
            if refusal(e) is not None:  # credentials, permissions: the environment's, said as such
                raise
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
            with fsspec.open(url, "rb") as f, tar_errors(url), tarfile.open(fileobj=f, mode="r:") as tf:
                for k, (key, members) in enumerate(_wds_samples(tf)):
                    if k >= hi:
                        break
                    if k < lo:
                        continue
                    where = f"{url}:{key}"
                    ext = next((e for e in WDS_IMAGE if e in members), None)
                    raw = tf.extractfile(members[ext]).read() if ext else None
                    label = _wds_label(tf, members, unit["label_key"], url) if unit["labeled"] else 0
                    caption = None
                    if unit["caption"]:
                        caption = text_member(
                            unit["caption"], lambda e: tf.extractfile(members[e]).read() if e in members else None
                        )
                    yield pos, label, raw, where, caption
                    pos += 1
