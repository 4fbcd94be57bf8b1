"""The dataset in the store: Parquet shards plus one committed manifest.

Layout under the run root::

    data/shards/part-00000.parquet   columns: id int64, data binary, label int32, shape list<int32>
                                     (+ caption string, for a dataset ingested with captions)
    data/MANIFEST.json               dataset facts + size and sha256 of every shard (written last)

``data`` holds one sample's raw array bytes (C-order) of ``manifest["dtype"]``; every sample of a
dataset has the same shape (``manifest["sample_shape"]``), so a whole shard decodes with one
``frombuffer``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddm import __version__
from ddm.store.layout import DATA_DIR, PARTITIONS_DIR, SHARDS_DIR, safe_relpath
from ddm.store.store import MANIFEST, Store

DATASET_FORMAT = 2  # data/MANIFEST.json: 2 lists its shards (format 1 numbered them)
PARTITIONS_FORMAT = 1  # partitions/MANIFEST.json
FEATURES_FORMAT = 1  # features/<extractor>-<settings>/MANIFEST.json
TEXT_COLUMNS = ("text_tokens", "text_lengths", "text_pooled")  # caption embeddings stored at ingest
_VERSION_RE = re.compile(r"^[0-9A-Za-z.+-]{1,32}$")
SCHEMA = pa.schema([("id", pa.int64()), ("data", pa.binary()), ("label", pa.int32()), ("shape", pa.list_(pa.int32()))])


def check_format(manifest: dict, known: int, where: str) -> dict:
    """``manifest`` if this ddm reads its ``format_version`` (at most ``known``; none recorded: 1), else a
    ``ValueError`` saying which ddm wrote it ("written by ddm X.Y; this is ddm Z") and to upgrade.
    ``where`` names the file."""
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(
            f"{where}: format_version {str(version)[:40]!r} is not a format number; it was not written by ddm"
        )
    if version > known:
        by = manifest.get("ddm_version")
        by = by if isinstance(by, str) and _VERSION_RE.match(by) else None  # shown on a terminal: plain text only
        who = f"was written by ddm {by}" if by else f"is format {version}, written by a newer ddm"
        raise ValueError(
            f"{where} {who}; this is ddm {__version__}, which reads format {known} at most"
            f"{f' (this is format {version})' if by else ''}: upgrade ddm here to read it"
        )
    return manifest


def partitions_manifest(store: Store) -> dict:
    """The committed ``partitions/MANIFEST.json``, refused if a newer ddm wrote it (``check_format``)."""
    return check_format(store.manifest(PARTITIONS_DIR), PARTITIONS_FORMAT, f"{store.url}/{PARTITIONS_DIR}/{MANIFEST}")


def read_parquet_bytes(raw: bytes, columns: list[str] | None = None) -> pa.Table:
    """Parquet bytes -> Table, single-threaded from a native buffer.

    pyarrow's threaded reads from Python file objects can abort the interpreter at exit
    (apache/arrow#33975, #34314: seen here with pyarrow 26 in ~20% of runs), which would turn a
    green test run red; shards are small, so one thread costs little.
    """
    return pq.read_table(pa.BufferReader(raw), columns=columns, use_threads=False)


def write_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def shard_name(index: int) -> str:
    return f"{SHARDS_DIR}/part-{index:05d}.parquet"


def encode_shard(
    ids: np.ndarray,
    arrays: np.ndarray,
    labels: np.ndarray,
    captions: list[str] | None = None,
    text: dict[str, np.ndarray] | None = None,
) -> bytes:
    """One Parquet shard from ids (N,), arrays (N, *shape), labels (N,) and, for a captioned
    dataset, captions (N strings; "" for a sample without one) and their stored embeddings
    ``text`` ({"text_tokens" (N, L, E), "text_lengths" (N,), "text_pooled" (N, E)}: raw bytes per
    sample, like ``data``)."""
    n = len(ids)
    assert arrays.shape[0] == n == len(labels) and (captions is None or len(captions) == n)
    flat = np.ascontiguousarray(arrays).reshape(n, -1)
    data = pa.array([row.tobytes() for row in flat], type=pa.binary())
    shape = pa.array([list(arrays.shape[1:])] * n, type=pa.list_(pa.int32()))
    columns = [pa.array(ids, pa.int64()), data, pa.array(labels, pa.int32()), shape]
    schema = SCHEMA
    if captions is not None:
        columns.append(pa.array(captions, pa.string()))
        schema = schema.append(pa.field("caption", pa.string()))
    for name, values in (text or {}).items():  # fixed-size rows: no 32-bit offsets to overflow (T5-XL: 1 MB a row)
        flat = np.ascontiguousarray(values).reshape(n, -1).view(np.uint8)
        kind = pa.binary(flat.shape[1])
        columns.append(pa.FixedSizeBinaryArray.from_buffers(kind, n, [None, pa.py_buffer(flat)]))
        schema = schema.append(pa.field(name, kind))
    return write_parquet_bytes(pa.Table.from_arrays(columns, schema=schema))


@dataclass
class Shard:
    ids: np.ndarray  # (N,) int64
    arrays: np.ndarray  # (N, *sample_shape)
    labels: np.ndarray  # (N,) int32
    captions: list[str] | None = None  # a captioned dataset's N captions
    text: dict[str, np.ndarray] | None = None  # stored caption embeddings (``encode_shard``'s ``text``)

    @property
    def nbytes(self) -> int:
        return self.arrays.nbytes + sum(a.nbytes for a in (self.text or {}).values())


def _fixed(table: pa.Table, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A binary column of same-size rows (binary, large_binary or fixed_size_binary) as one (N, *shape)
    array, without a copy per row."""
    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_binary(col.type):
        width = col.type.byte_width
        values = np.frombuffer(col.buffers()[1], dtype=np.uint8)[col.offset * width : (col.offset + len(col)) * width]
        return values.view(np.dtype(dtype)).reshape(len(col), *shape)
    wide = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    offsets = np.frombuffer(col.buffers()[1], dtype=wide)[col.offset : col.offset + len(col) + 1]
    values = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return values.view(np.dtype(dtype)).reshape(len(col), *shape)


def decode_shard(raw: bytes, sample_shape: tuple[int, ...], dtype: str, text: dict | None = None) -> Shard:
    """``text``: the manifest's ``text_embeddings`` (their dim, length and dtype), for stored embeddings;
    without it their columns are not even decompressed (what readers that do not use them pass)."""
    names = pq.read_schema(pa.BufferReader(raw)).names
    table = read_parquet_bytes(raw, None if text else [n for n in names if n not in TEXT_COLUMNS])
    embedded = None
    if text and "text_tokens" in table.column_names:
        d, length, dt = text["dim"], text["length"], text["dtype"]
        embedded = {
            "text_tokens": _fixed(table, "text_tokens", dt, (length, d)),
            "text_lengths": _fixed(table, "text_lengths", np.int16, ()),
            "text_pooled": _fixed(table, "text_pooled", dt, (d,)),
        }
    return Shard(
        ids=table.column("id").to_numpy(),
        arrays=_fixed(table, "data", dtype, sample_shape),
        labels=table.column("label").to_numpy().astype(np.int32),
        captions=table.column("caption").to_pylist() if "caption" in table.column_names else None,
        text=embedded,
    )


class Dataset:
    """Read access to a committed dataset in a store."""

    def __init__(self, store: Store):
        self.store = store
        if not store.is_committed(DATA_DIR):
            raise ValueError(
                f"no committed dataset in {store.url}/{DATA_DIR}: run `ddm ingest <source> {store.url}` first"
            )
        self.manifest = check_format(store.manifest(DATA_DIR), DATASET_FORMAT, f"{store.url}/{DATA_DIR}/{MANIFEST}")
        self.sample_shape = tuple(self.manifest["sample_shape"])
        self.dtype = self.manifest["dtype"]
        self.shard_rows: list[int] = list(self.manifest["shard_rows"])
        # Format 2 lists its shards (a unit with no readable sample has none); format 1 numbered them.
        self.shard_names: list[str] = [
            safe_relpath(name, f"{store.url}/{DATA_DIR}/{MANIFEST} (shards)")
            for name in self.manifest.get("shards") or [shard_name(i) for i in range(len(self.shard_rows))]
        ]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def num_shards(self) -> int:
        return len(self.shard_rows)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def has_captions(self) -> bool:
        return bool(self.manifest.get("captions"))

    def read_shard(self, index: int, embeddings: bool = False) -> Shard:
        """Shard ``index``, verified against the manifest's sha256; with ``embeddings`` its stored
        caption embeddings too (without, their columns are not even decoded: T5-XL's are 1 MB a row)."""
        raw = self.store.read_checked(DATA_DIR, self.shard_names[index], self.manifest)  # the manifest read once
        text = self.manifest.get("text_embeddings") if embeddings else None
        return decode_shard(raw, self.sample_shape, self.dtype, text)

    def iter_shards(self):
        for i in range(self.num_shards):
            yield i, self.read_shard(i)
