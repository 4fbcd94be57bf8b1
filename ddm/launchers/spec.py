"""The spec of a whole run, which ``ddm run`` and ``ddm submit`` share, and the jobs it makes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ddm.core.config import apply_overrides, from_dict, to_dict
from ddm.core.secrets import check_forwarded
from ddm.data.config import IngestConfig, PartitionConfig
from ddm.ensemble.rules import Rule
from ddm.ensemble.settings import SampleConfig
from ddm.eval.settings import EvalConfig
from ddm.models.config import ModelConfig
from ddm.models.text_config import IN_STORE
from ddm.store import Store, absolute_url
from ddm.store.layout import TEXT_ENCODER_DIR
from ddm.train.budget import BudgetConfig, plan
from ddm.train.job import JobConfig

TINY_ENCODER = f"{IN_STORE}{TEXT_ENCODER_DIR}"  # the tiny encoder, named inside the run's store: it moves with it


@dataclass(frozen=True)
class TinyTextEncoder:
    """A small randomly initialised text encoder that ``ddm run`` makes from the source's captions
    (a word-level tokenizer trained on them) and keeps in the store (``text_encoder/``): text
    experts offline, where no hub encoder can be fetched. Off while ``kind`` is empty; set, every
    job's ``model.text.encoder``, ``dim`` and ``length`` (and ingest's ``text_encoder``, for
    ``model.text.embeddings=store``) come from it."""

    kind: str = ""  # clip | t5
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 32  # tokens per caption (the experts' model.text.length)
    captions: int = 4096  # the source's first captions, read to build the vocabulary
    # The experts' model.text.embeddings: store (computed once at ingest) or job (in each step).
    embeddings: str = "store"

    def __post_init__(self) -> None:
        if self.kind not in ("", "clip", "t5"):
            raise ValueError(f"tiny_text_encoder.kind must be clip or t5 (or empty: off), got {self.kind!r}")
        if self.embeddings not in ("store", "job"):
            raise ValueError(f"tiny_text_encoder.embeddings must be store or job, got {self.embeddings!r}")
        if min(self.hidden_size, self.layers, self.heads, self.max_length, self.captions) < 1:
            raise ValueError("tiny_text_encoder: hidden_size, layers, heads, max_length and captions must be >= 1")
        if self.hidden_size % self.heads:
            raise ValueError(f"tiny_text_encoder: hidden_size {self.hidden_size} is not a multiple of heads")

    def identity(self) -> dict:
        """What the encoder is made from (a store's encoder must match the spec's)."""
        return {k: v for k, v in to_dict(self).items() if k != "embeddings"}


@dataclass(frozen=True)
class RunSpec:
    """One experiment: where, what data, how many partitions, how each job trains, what to measure."""

    store: str = "runs/digits"
    seed: int = 0  # every training job's seed (data order, init, noise), and sampling's and evaluation's
    # unless sample.seed / evaluate.seed set them apart
    ingest: IngestConfig = field(default_factory=IngestConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    expert: JobConfig = field(default_factory=JobConfig)  # template for every expert (store, job, partition set here)
    # Experts unlike the others: partition -> overrides of the expert template for that expert alone,
    # e.g. {"2": ["model.arch=DiT-S/2"]} (an island with one small GPU), {"1": ["flow.path=vp",
    # "flow.prediction=epsilon"]} (a DDPM expert), {"0": ["init_from=monolith"]}. The budget sets
    # every expert's batch and steps. Each job's FLOPs are its own, in the budget (a monolith
    # matches their sum) and the cost tables.
    expert_overrides: dict[str, list[str]] = field(default_factory=dict)
    # The router: a DiT-Micro by default, ~5% of a DiT-Tiny expert's forward (the paper's is ~4%).
    router: JobConfig = field(default_factory=lambda: JobConfig(job="router", model=ModelConfig(arch="DiT-Micro/4")))
    monolith: bool = False  # also train one model on all data with the experts' + router's training FLOPs
    # How the ensemble and the monoliths share the budget (ddm.train.budget): by default, with a monolith,
    # the paper's split: expert.global_batch_size is the global batch B, each expert trains at B/K.
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    distill_steps: int = 0  # > 0: distil the ensemble into one expert-sized student for this many steps
    rule: str = "top1"  # the ensemble's default rule (ensemble.json)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    max_concurrent_jobs: int = 0  # 0: as many as the Ray cluster's CPUs hold at once
    # Jobs of one worker shape share Ray Train worker groups, one lane per slot, one job after
    # another in each (ddm.launchers.run.lanes): Ray Train's start is paid once per lane, not per job.
    reuse_workers: bool = True
    # Text-conditioned experts (expert.model.text) without a hub encoder: one made from the data's captions.
    tiny_text_encoder: TinyTextEncoder = field(default_factory=TinyTextEncoder)

    def __post_init__(self) -> None:
        # None, the tiny one (a resolved spec), or the tiny one as stores of the first text runs name it.
        made = ("", TINY_ENCODER, f"{absolute_url(self.store)}/{TEXT_ENCODER_DIR}")
        if self.tiny_text_encoder.kind and self.expert.model.text.encoder not in made:
            raise ValueError(
                f"expert.model.text.encoder={self.expert.model.text.encoder!r} and tiny_text_encoder.kind="
                f"{self.tiny_text_encoder.kind} both name the experts' text encoder: keep one"
            )
        if self.texts and not self.ingest.caption:
            raise ValueError(
                "the experts are text-conditioned but ingest reads no captions: set ingest.caption (describe for "
                "glyphs, a column for Parquet, txt or json:<key> for WebDataset)"
            )
        if self.texts and not (self.sample.prompts or self.sample.prompts_file):
            raise ValueError(
                "the experts are text-conditioned: give the sample stage its prompts (sample.prompts=[...] or "
                "sample.prompts_file=<one per line>)"
            )
        if (
            self.evaluate.held_out
            and self.budget.curve_points
            and any(Rule.parse(r).name == "oracle" for r in self.budget.curve_rules)
        ):
            raise ValueError(
                "budget.curve_rules has the oracle rule, which needs each prompt's partition, and evaluate.held_out "
                "prompts have none: drop oracle from budget.curve_rules"
            )
        if self.distill_steps < 0:
            raise ValueError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if self.max_concurrent_jobs < 0:
            raise ValueError(f"max_concurrent_jobs must be >= 0, got {self.max_concurrent_jobs}")

    @property
    def texts(self) -> bool:
        """Whether the experts are text-conditioned."""
        return self.expert.model.text.enabled or bool(self.tiny_text_encoder.kind)

    def resolved(self, store: str | None = None) -> "RunSpec":
        """The spec with an absolute store URL (``store`` replaces the spec's own), the run's seed
        in sampling and evaluation where they do not set their own and, for text experts, one text
        encoder for every job (``_with_text``)."""
        url = absolute_url(store or self.store)
        spec = dataclasses.replace(
            self, store=url, sample=self.sample.seeded(self.seed), evaluate=self.evaluate.seeded(self.seed)
        )
        return spec._with_text() if spec.texts else spec

    def _with_text(self) -> "RunSpec":
        """The tiny encoder's folder in every job's ``model.text``; a router without text of its own
        reads the experts' captions (p(k | x_t, t, c)); ingest stores the embeddings the experts read
        from the store."""
        tiny, text = self.tiny_text_encoder, self.expert.model.text
        if tiny.kind:
            encoder = text.encoder or TINY_ENCODER  # a store of the first text runs keeps its own spelling
            text = dataclasses.replace(
                text, encoder=encoder, dim=tiny.hidden_size, length=tiny.max_length, embeddings=tiny.embeddings
            )
        with_text = lambda job, t: dataclasses.replace(job, model=dataclasses.replace(job.model, text=t))  # noqa: E731
        router = self.router if self.router.model.text.enabled else with_text(self.router, text)
        ingest = self.ingest
        if text.embeddings == "store" and not ingest.text_encoder:
            ingest = dataclasses.replace(ingest, text_encoder=text.encoder, text_length=text.length)
        return dataclasses.replace(self, expert=with_text(self.expert, text), router=router, ingest=ingest)


def jobs(spec: RunSpec, num_partitions: int, expert_steps: list[int] | None = None) -> list[JobConfig]:
    """The training jobs of the spec, experts first (``expert_steps``: each expert's steps, default
    the spec's), then the router, then the monoliths the budget trains (``ddm.train.budget.plan``)."""
    base = {"store": spec.store, "seed": spec.seed}
    expert = dataclasses.replace(spec.expert, **base)
    router = dataclasses.replace(spec.router, **base)
    own = {}
    for key, overrides in spec.expert_overrides.items():
        if not key.isdigit() or int(key) >= num_partitions:
            raise ValueError(
                f"expert_overrides names partition {key!r}; the partitions are 0..{num_partitions - 1} "
                "(e.g. expert_overrides.2=[model.arch=DiT-S/2])"
            )
        fixed = [o for o in overrides if o.split("=", 1)[0] in PLANNED]
        if fixed:
            raise ValueError(
                f"expert_overrides.{key} sets {', '.join(fixed)}: the run's budget sets each expert's "
                f"{', '.join(PLANNED)}; change them for every expert in the spec"
            )
        try:
            own[int(key)] = from_dict(JobConfig, apply_overrides(to_dict(expert), list(overrides)))
        except ValueError as e:
            raise ValueError(f"expert_overrides.{key}: {e}") from e
    return plan(expert, router, num_partitions, spec.budget, spec.monolith, expert_steps, own)


PLANNED = ("store", "seed", "job", "partition", "folder", "global_batch_size", "steps")


def check_no_secrets(spec: RunSpec) -> None:
    """What the spec's job configs are made of carries no secret (``ddm.core.secrets.check_forwarded``):
    Ray keeps each job's config with its run, on whatever cluster runs it, and every checkpoint and
    the islands' plan store it."""
    check_forwarded(
        {"store": spec.store, "expert": to_dict(spec.expert), "router": to_dict(spec.router),
         "expert_overrides": spec.expert_overrides},
        "the spec",
    )  # fmt: skip


def student(spec: RunSpec) -> JobConfig | None:
    """The distillation job of the spec (an expert-sized student), or None without ``distill_steps``."""
    if not spec.distill_steps:
        return None
    return dataclasses.replace(
        spec.expert, store=spec.store, seed=spec.seed, job="distill", partition=-1, steps=spec.distill_steps
    )


def make_text_encoder(spec: RunSpec, store: Store) -> None:
    """The spec's tiny text encoder in the store (``text_encoder/``, committed), made from the
    first ``captions`` captions of the ingest source unless the store holds it already; one made
    with other settings is an error (the shards' stored embeddings and the exports name it)."""
    tiny = spec.tiny_text_encoder
    if not tiny.kind:
        return
    if store.is_committed(TEXT_ENCODER_DIR):
        made = store.manifest(TEXT_ENCODER_DIR).get("tiny_text_encoder")
        if made != tiny.identity():
            raise ValueError(
                f"{store.url}/{TEXT_ENCODER_DIR} holds a text encoder made with {made}, but the spec's "
                f"tiny_text_encoder is {tiny.identity()}: use the store's settings or another store"
            )
        return
    import logging
    import os
    import tempfile

    from ddm.data.sources import (
        first_captions,
    )  # torch and pyarrow: only where a tiny encoder is made, not where a spec loads
    from ddm.models.text_encoder import (
        make_tiny,
    )  # torch and pyarrow: only where a tiny encoder is made, not where a spec loads

    logging.getLogger("ddm.run").info("making a tiny %s text encoder from %d captions", tiny.kind, tiny.captions)
    captions = first_captions(spec.ingest, tiny.captions)
    with tempfile.TemporaryDirectory(prefix="ddm-tiny-encoder-") as tmp:
        make_tiny(tmp, captions, tiny.kind, tiny.hidden_size, tiny.layers, tiny.heads, tiny.max_length, spec.seed)
        known = {n: store.put_file(os.path.join(tmp, n), f"{TEXT_ENCODER_DIR}/{n}") for n in sorted(os.listdir(tmp))}
    store.commit(TEXT_ENCODER_DIR, list(known), {"tiny_text_encoder": tiny.identity()}, known=known)
