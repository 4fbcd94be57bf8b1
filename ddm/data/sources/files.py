"""File sources: an image folder (one sub-folder per class) and Parquet with an encoded-image column,
from any fsspec URL. The driver lists them; ``items`` reads one unit's files or rows anywhere."""

from __future__ import annotations

import json
import os
from typing import Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq

from ddm.data.config import IngestConfig
from ddm.data.sources.base import Item, Source, is_local, pieces, url_of
from ddm.data.sources.images import IMAGE_EXTENSIONS


def _read(url: str) -> bytes:
    """A whole file's bytes (local paths without fsspec's per-call overhead)."""
    if "://" not in url:
        with open(url, "rb") as f:
            return f.read()
    with fsspec.open(url, "rb") as f:
        return f.read()


class FolderSource(Source):
    """root/<class name>/<image files>; classes sorted by name, files sorted within a class."""

    kind = "files"
    what = "image folder"

    def __init__(self, cfg: IngestConfig, root: str):
        fs, path = fsspec.core.url_to_fs(root)
        local = is_local(fs)
        path = path.rstrip("/")

        def listing(folder: str) -> list[tuple[str, bool]]:  # (name, is a folder); os.scandir: no stat per file
            if local:
                with os.scandir(folder) as it:
                    return [(e.name, e.is_dir()) for e in it]
            return [(os.path.basename(e["name"].rstrip("/")), e["type"] == "directory") for e in fs.ls(folder)]

        classes = sorted(name for name, is_dir in listing(path) if is_dir and not name.startswith("."))
        if not classes:
            raise ValueError(f"image folder {root!r} has no class sub-folders; expected {root}/<class>/<images>")
        self.files: list[tuple[str, int]] = []
        for idx, name in enumerate(classes):
            found = sorted(
                f for f, is_dir in listing(f"{path}/{name}") if not is_dir and f.lower().endswith(IMAGE_EXTENSIONS)
            )
            self.files += [(url_of(fs, f"{path}/{name}/{f}"), idx) for f in found]
        if not self.files:
            raise ValueError(f"image folder {root!r} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.class_names = classes

    def __len__(self) -> int:
        return len(self.files)

    def _unit(self, start: int, stop: int) -> dict:
        return {"kind": self.kind, "files": self.files[start:stop]}

    @staticmethod
    def items(unit: dict) -> Iterator[Item]:
        pos = unit["start"]
        for path, label in unit["files"]:
            try:
                raw = _read(path)
            except OSError:
                raw = None
            yield pos, label, raw, path
            pos += 1


class ParquetSource(Source):
    """Parquet file(s) with an encoded image column (bytes, or the dataset hubs' {bytes, path}
    struct) and an integer label column; class names from the hub's metadata when it has them."""

    kind = "parquet"
    what = "Parquet source"

    def __init__(self, cfg: IngestConfig, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise ValueError(f"Parquet source {url!r} does not exist")
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet")) if fs.isdir(path) else [path]
        if not files:
            raise ValueError(f"Parquet source {url!r} holds no .parquet files")
        self.files, self.rows = [], []
        names: list[str] | None = None
        label_max = -1
        for f in files:
            with fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
                for col in (cfg.image_column, cfg.label_column):
                    if col not in schema.names:
                        raise ValueError(
                            f"Parquet source {url_of(fs, f)!r} has no column {col!r}; its columns are {schema.names}"
                        )
                labels = pf.read(columns=[cfg.label_column], use_threads=False).column(0)
                if not (labels.type.id in range(2, 10) or str(labels.type).startswith(("int", "uint"))):
                    raise ValueError(
                        f"Parquet source {url_of(fs, f)!r}: label column {cfg.label_column!r} holds {labels.type}, "
                        "not integer class ids; set label_column=<the integer column>"
                    )
                if len(labels):
                    label_max = max(label_max, int(np.max(labels.to_numpy(zero_copy_only=False))))
                names = names or _hub_class_names(schema, cfg.label_column)
                self.files.append(url_of(fs, f))
                self.rows.append(pf.metadata.num_rows)
        self.n = sum(self.rows)
        if self.n == 0:
            raise ValueError(f"Parquet source {url!r} has no rows")
        self.class_names = names if names and len(names) > label_max else [str(i) for i in range(label_max + 1)]
        self.columns = [cfg.image_column, cfg.label_column]

    def __len__(self) -> int:
        return self.n

    def _unit(self, start: int, stop: int) -> dict:
        return {"kind": self.kind, "columns": self.columns, "pieces": pieces(self.files, self.rows, start, stop)}

    @staticmethod
    def items(unit: dict) -> Iterator[Item]:
        pos = unit["start"]
        image_col, label_col = unit["columns"]
        for url, lo, hi in unit["pieces"]:
            with fsspec.open(url, "rb") as f:
                pf = pq.ParquetFile(f)
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                groups = [g for g in range(pf.num_row_groups) if starts[g] < hi and starts[g + 1] > lo]
                # use_threads=False: see ddm.data.shards.read_parquet_bytes (pyarrow exit aborts).
                table = pf.read_row_groups(groups, columns=[image_col, label_col], use_threads=False)
                table = table.slice(lo - starts[groups[0]], hi - lo)
            images, labels = table.column(0).to_pylist(), table.column(1).to_pylist()
            for r, (img, label) in enumerate(zip(images, labels)):
                raw = img.get("bytes") if isinstance(img, dict) else img
                yield pos, label, raw, f"{url} row {lo + r}"
                pos += 1


def _hub_class_names(schema, label_column: str) -> list[str] | None:
    """Class names from a Hugging Face dataset's Parquet metadata (its ClassLabel feature)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
        return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None
    except (TypeError, KeyError, ValueError):
        return None
