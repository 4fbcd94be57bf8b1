"""The settings of ``ddm ingest`` and ``ddm partition``, apart from their code: no numpy, pyarrow or
PIL here, so ``ddm --help`` and run specs load them at once. ``ddm.data.ingest`` and
``ddm.data.partition`` re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ddm.core.config import to_dict
from ddm.core.secrets import redact_url
from ddm.data.pipeline import check_runner

# How an ingest runs, not what it makes: left out when a re-run is compared with the dataset.
INGEST_EXECUTION = ("runner", "workers", "encode_batch_size", "encode_actors", "actors_per_gpu")


@dataclass(frozen=True)
class IngestConfig:
    """How a source becomes shards.

    resolution: output side in pixels (0 keeps the source's own, which must then be uniform).
    channels: 1 (grayscale) or 3 (RGB); 0 picks the source's natural choice (digits: 1, else 3).
    shard_size: samples per Parquet shard; readers and partitioning stream shard by shard.
    """

    source: str = "digits"
    resolution: int = 0
    channels: int = 0
    shard_size: int = 4096
    encoder: str = "identity"
    image_column: str = "image"  # Parquet sources
    label_column: str = "label"  # Parquet column / WebDataset json key; "" for Parquet: unlabeled (class 0)
    # Captions into the shards (CAPTION_FORMS): "" none; Parquet: a column; WebDataset: a member's
    # extension (txt) or json:<key>; image folder: txt (a sidecar <image stem>.txt); glyphs:
    # describe (what the renderer drew); auto: the source's usual place. Partitioning ignores them.
    caption: str = ""
    # Caption embeddings computed once here and stored in the shards (a text job with
    # model.text.embeddings=store reads them instead of running the encoder each step): the frozen
    # encoder (as model.text.encoder), tokens per caption (0: the encoder's own) and the stored dtype.
    text_encoder: str = ""
    text_length: int = 0
    text_dtype: str = "float16"
    seed: int = 0  # synthetic and glyph sources
    fonts: list[str] = field(default_factory=list)  # glyphs: font folders/files (empty: matplotlib's own)
    charset: str = ""  # glyphs: the characters, one class each (empty: 0-9, A-Z, a-z)
    # How it runs (see INGEST_EXECUTION): none of these changes the shards.
    runner: str = "auto"  # ray (Ray Data), local (this process) or auto (ray for files and encoders)
    workers: int = 0  # read/decode tasks at once (0: as many as the cluster's CPUs allow)
    encode_batch_size: int = 64  # images per encoder forward
    encode_actors: int = 0  # encoder actors (0: actors_per_gpu per GPU of the cluster, else 1 on CPU)
    actors_per_gpu: int = 1  # encoder actors sharing one GPU

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source is empty: give digits, glyphs:N, synthetic:N, an image folder or a Parquet path")
        if self.resolution < 0:
            raise ValueError(f"resolution must be >= 0, got {self.resolution}")
        if self.channels not in (0, 1, 3):
            raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or 0 (source default), got {self.channels}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.encoder != "identity" and self.encoder != "vae" and not self.encoder.startswith("vae:"):
            raise ValueError(f"encoder {self.encoder!r} is unknown; use identity, vae or vae:<hub id>")
        check_runner(self.runner)
        if self.text_encoder and not self.caption:
            raise ValueError("text_encoder embeds captions: set caption=... too (where the captions come from)")
        if self.text_dtype not in ("float16", "float32") or self.text_length < 0:
            raise ValueError(f"text_dtype must be float16 or float32 (got {self.text_dtype!r}), text_length >= 0")
        if self.caption.startswith("json:") and not self.caption[5:]:
            raise ValueError("caption=json: names no key; give caption=json:<key>, e.g. json:caption")
        if self.workers < 0 or self.encode_actors < 0 or self.encode_batch_size < 1 or self.actors_per_gpu < 1:
            raise ValueError("workers and encode_actors must be >= 0, encode_batch_size and actors_per_gpu >= 1")

    def identity(self) -> dict:
        """What the dataset is made from and how (the fields a re-run must match); the source as the
        manifest records it, without credentials (a re-signed URL is the same source)."""
        fields = {k: v for k, v in to_dict(self).items() if k not in INGEST_EXECUTION}
        return {**fields, "source": redact_url(self.source)}


# How a partitioning runs, not what it makes: left out when a re-run is compared with the partitions.
PARTITION_EXECUTION = ("runner", "workers", "embed_batch_size", "embed_actors", "actors_per_gpu")


@dataclass(frozen=True)
class PartitionConfig:
    num_partitions: int = 4  # K, the number of experts (paper: 8 on ImageNet)
    # kmeans: semantic clusters (the paper's); random: a seeded, exactly balanced random split of the
    # samples (the paper's ablation: every expert then models the whole distribution)
    method: str = "kmeans"
    features: str = "pca"  # pca (offline) or dinov2[:<hub id>] (the paper's)
    pca_dim: int = 32
    pca_fit_samples: int = 10_000
    num_fine: int = 1024  # fine centroids (paper: 1024); capped at num_samples / 4
    fine_epochs: int = 2  # mini-batch passes over the shards for the fine k-means
    batch_size: int = 4096
    balance: bool = True  # cap partition sizes at (1 + balance_tolerance) * N / K
    balance_tolerance: float = 0.1
    seed: int = 0
    # How it runs (see PARTITION_EXECUTION): none of these changes the partitions.
    runner: str = "auto"  # ray (Ray Data), local (this process) or auto (ray for DINOv2 or with --address)
    workers: int = 0  # feature/assignment tasks at once (0: as many as the cluster's CPUs allow)
    embed_batch_size: int = 64  # images per DINOv2 forward
    embed_actors: int = 0  # DINOv2 actors (0: actors_per_gpu per GPU of the cluster, else 1 on CPU)
    actors_per_gpu: int = 1

    def __post_init__(self) -> None:
        if self.num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {self.num_partitions}")
        if self.num_fine < 1 or self.fine_epochs < 1 or self.batch_size < 1 or self.pca_dim < 1:
            raise ValueError("num_fine, fine_epochs, batch_size and pca_dim must be >= 1")
        if self.balance_tolerance < 0:
            raise ValueError(f"balance_tolerance must be >= 0, got {self.balance_tolerance}")
        check_runner(self.runner)
        if self.method not in ("kmeans", "random"):
            raise ValueError(f"method must be kmeans or random, got {self.method!r}")
        if self.workers < 0 or self.embed_actors < 0 or self.embed_batch_size < 1 or self.actors_per_gpu < 1:
            raise ValueError("workers and embed_actors must be >= 0, embed_batch_size and actors_per_gpu >= 1")

    def identity(self) -> dict:
        """What the partitions are made with (the fields a re-run must match)."""
        return {k: v for k, v in to_dict(self).items() if k not in PARTITION_EXECUTION}
