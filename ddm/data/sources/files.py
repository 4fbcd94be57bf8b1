"""File sources: an image folder (one sub-folder per class, or images at its top for an unlabeled
dataset; captions in sidecar files) and Parquet with an encoded-image column (and a caption column),
from any fsspec URL. The driver lists them; ``items`` reads one unit's files or rows anywhere."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ddm.data.config import IngestConfig
from ddm.data.sources.base import Item, Source, is_local, pieces, url_of
from ddm.data.sources.images import IMAGE_EXTENSIONS
from ddm.store.retries import refusal


def _read(url: str) -> bytes:
    """A whole file's bytes (local paths without fsspec's per-call overhead)."""
    if "://" not in url:
        with open(url, "rb") as f:
            return f.read()
    with fsspec.open(url, "rb") as f:
        return f.read()


def text_member(spec: str, read) -> str | None:
    """A caption from a sample's text member: ``spec`` is an extension (its whole text) or
    ``json:<key>`` (a key of its .json member); ``read(ext)`` returns a member's bytes or None."""
    ext, key = ("json", spec[5:]) if spec.startswith("json:") else (spec, None)
    raw = read(ext)
    if raw is None:
        return None
    if key is None:
        return raw.decode("utf-8", errors="replace")
    try:
        value = json.loads(raw).get(key)
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


def _sidecar(path: str, spec: str) -> str | None:
    stem = path.rsplit(".", 1)[0]

    def read(ext: str) -> bytes | None:
        try:
            return _read(f"{stem}.{ext}")
        except OSError:  # no sidecar (FileNotFoundError is one)
            return None

    return text_member(spec, read)


def check_member_caption(cfg: IngestConfig, what: str, where: str) -> str:
    """``cfg.caption`` for a source whose captions are member or sidecar files: ``auto`` -> txt."""
    spec = "txt" if cfg.caption == "auto" else cfg.caption
    ext = "json" if spec.startswith("json:") else spec
    if spec and not (ext.isalnum() and ext.lower() == ext):
        raise ValueError(
            f"caption={cfg.caption!r} does not name {where} for a {what}: use txt (the text of <key>.txt), another "
            "lowercase extension, json:<key> (a key of <key>.json) or auto"
        )
    return spec


class FolderSource(Source):
    """root/<class name>/<image files>; classes sorted by name, files sorted within a class. A
    folder with images at its top and no class folders is one unlabeled class. Captions (``caption=txt``
    or ``json:<key>``) come from a sidecar file beside each image: ``cat.png`` -> ``cat.txt``."""

    kind = "files"
    what = "image folder"

    def __init__(self, cfg: IngestConfig, root: str):
        self.caption = check_member_caption(cfg, self.what, "a sidecar file")
        fs, path = fsspec.core.url_to_fs(root)
        local = is_local(fs)
        path = path.rstrip("/")

        def listing(folder: str) -> list[tuple[str, bool]]:  # (name, is a folder); os.scandir: no stat per file
            if local:
                with os.scandir(folder) as it:
                    return [(e.name, e.is_dir()) for e in it]
            return [(os.path.basename(e["name"].rstrip("/")), e["type"] == "directory") for e in fs.ls(folder)]

        def images(folder: str) -> list[str]:
            return sorted(f for f, is_dir in listing(folder) if not is_dir and f.lower().endswith(IMAGE_EXTENSIONS))

        classes = sorted(name for name, is_dir in listing(path) if is_dir and not name.startswith("."))
        self.files: list[tuple[str, int]] = []
        if not classes:
            self.files = [(url_of(fs, f"{path}/{f}"), 0) for f in images(path)]
            if not self.files:
                raise ValueError(
                    f"image folder {root!r} has no class sub-folders and no images; expected {root}/<class>/<images> "
                    f"or, unlabeled, {root}/<images> ({', '.join(IMAGE_EXTENSIONS)})"
                )
            self.class_names = ["unlabeled"]
            return
        for idx, name in enumerate(classes):
            self.files += [(url_of(fs, f"{path}/{name}/{f}"), idx) for f in images(f"{path}/{name}")]
        if not self.files:
            raise ValueError(f"image folder {root!r} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.class_names = classes

    def __len__(self) -> int:
        return len(self.files)

    def _unit(self, start: int, stop: int) -> dict:
        return {"kind": self.kind, "files": self.files[start:stop], "caption": self.caption}

    @staticmethod
    def items(unit: dict) -> Iterator[Item]:
        pos = unit["start"]
        for path, label in unit["files"]:
            try:
                raw = _read(path)
            except OSError:
                raw = None
            yield pos, label, raw, path, _sidecar(path, unit["caption"]) if unit["caption"] else None
            pos += 1


class ParquetSource(Source):
    """Parquet file(s) with an encoded image column (bytes, or the dataset hubs' {bytes, path}
    struct), an integer label column (``label_column=""``: unlabeled, every sample class 0) and, with
    ``caption=<column>``, a text column; class names from the hub's metadata when it has them."""

    CAPTION_COLUMNS = ("caption", "text", "TEXT", "prompt")  # what caption=auto looks for, in this order

    kind = "parquet"
    what = "Parquet source"

    def __init__(self, cfg: IngestConfig, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise ValueError(f"Parquet source {url!r} does not exist")
        files = sorted(f for f in fs.find(path) if data_file(f, ".parquet")) if fs.isdir(path) else [path]
        if not files:
            raise ValueError(f"Parquet source {url!r} holds no .parquet files")
        self.files, self.rows = [], []
        names: list[str] | None = None
        label_max = -1
        for f in files:
            with fs.open(f, "rb") as fh, parquet_errors(url_of(fs, f)):
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
                if cfg.caption == "auto" and not self.caption:
                    found = [c for c in self.CAPTION_COLUMNS if c in schema.names]
                    if not found:
                        raise ValueError(
                            f"Parquet source {url_of(fs, f)!r} has none of the caption columns caption=auto looks for "
                            f"({', '.join(self.CAPTION_COLUMNS)}); its columns are {schema.names}: set "
                            "caption=<the text column>"
                        )
                    self.caption = found[0]
                elif cfg.caption != "auto":
                    self.caption = cfg.caption
                wanted = {"image": cfg.image_column, "label": cfg.label_column, "caption": self.caption}
                for what, col in wanted.items():
                    if col and col not in schema.names:
                        raise ValueError(
                            f"Parquet source {url_of(fs, f)!r} has no {what} column {col!r}; its columns are "
                            f"{schema.names}: set {'caption' if what == 'caption' else what + '_column'}=<column>"
                        )
                if not cfg.label_column:
                    self.files.append(url_of(fs, f))
                    self.rows.append(pf.metadata.num_rows)
                    continue
                labels = pf.read(columns=[cfg.label_column], use_threads=False).column(0)
                if not (labels.type.id in range(2, 10) or str(labels.type).startswith(("int", "uint"))):
                    raise ValueError(
                        f"Parquet source {url_of(fs, f)!r}: label column {cfg.label_column!r} holds {labels.type}, "
                        "not integer class ids; set label_column=<the integer column>"
                    )
                lo, hi = pc.min_max(labels).values()  # nulls (unlabeled rows) left out
                if lo.as_py() is not None and lo.as_py() < 0:
                    raise ValueError(
                        f"Parquet source {url_of(fs, f)!r}: label column {cfg.label_column!r} holds a negative class "
                        f"id ({lo.as_py()}); class ids are 0, 1, 2, ...: fix the labels or set label_column=<another>"
                    )
                if hi.as_py() is not None:
                    label_max = max(label_max, int(hi.as_py()))
                names = names or _hub_class_names(schema, cfg.label_column)
                self.files.append(url_of(fs, f))
                self.rows.append(pf.metadata.num_rows)
        self.n = sum(self.rows)
        if self.n == 0:
            raise ValueError(f"Parquet source {url!r} has no rows")
        if not cfg.label_column:
            self.class_names = ["unlabeled"]
        else:
            self.class_names = names if names and len(names) > label_max else [str(i) for i in range(label_max + 1)]
        self.columns = [cfg.image_column, cfg.label_column, self.caption]

    def __len__(self) -> int:
        return self.n

    def _unit(self, start: int, stop: int) -> dict:
        return {
            "kind": self.kind,
            "columns": self.columns,
            "caption": self.caption,
            "pieces": pieces(self.files, self.rows, start, stop),
        }

    @staticmethod
    def items(unit: dict) -> Iterator[Item]:
        pos = unit["start"]
        image_col, label_col, caption_col = unit["columns"]
        columns = [c for c in (image_col, label_col, caption_col) if c]
        for url, lo, hi in unit["pieces"]:
            with fsspec.open(url, "rb") as f, parquet_errors(url):
                pf = pq.ParquetFile(f)
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                groups = [g for g in range(pf.num_row_groups) if starts[g] < hi and starts[g + 1] > lo]
                # use_threads=False: see ddm.data.shards.read_parquet_bytes (pyarrow exit aborts).
                table = pf.read_row_groups(groups, columns=columns, use_threads=False)
                table = table.slice(lo - starts[groups[0]], hi - lo)
            n = table.num_rows
            images = table.column(image_col).to_pylist()
            labels = table.column(label_col).to_pylist() if label_col else [0] * n
            captions = table.column(caption_col).to_pylist() if caption_col else [None] * n
            for r, (img, label, caption) in enumerate(zip(images, labels, captions)):
                raw = img.get("bytes") if isinstance(img, dict) else img
                yield pos, label, raw, f"{url} row {lo + r}", caption
                pos += 1


def data_file(path: str, ext: str) -> bool:
    """A file of a source folder that holds data: its extension, and not hidden (a killed writer's
    ``.tmp-*`` file, an editor's or an OS's hidden files)."""
    return path.endswith(ext) and not os.path.basename(path).startswith(".")


@contextlib.contextmanager
def parquet_errors(url: str) -> Iterator[None]:
    """pyarrow's errors on a file that is not Parquet (or is cut short) as one line naming the file."""
    try:
        yield
    except pa.ArrowException as e:
        if refusal(e) is not None:  # credentials, permissions, disk: the environment's, said as such
            raise
        raise ValueError(
            f"Parquet file {url!r} is not readable Parquet ({str(e).splitlines()[0] if str(e) else type(e).__name__}):"
            " it is corrupt or cut short; replace it, or move it out of the source folder"
        ) from e


def _hub_class_names(schema, label_column: str) -> list[str] | None:
    """Class names from a Hugging Face dataset's Parquet metadata (its ClassLabel feature)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
        return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None
    except (TypeError, KeyError, ValueError):
        return None
