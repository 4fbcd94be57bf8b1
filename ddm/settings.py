"""The settings of the commands that need torch to run (``ddm sample``, ``ddm evaluate``, ``ddm demo``),
kept apart from their code: this module imports no torch, so ``ddm --help``, run specs and islands
plans load them at once. ``SampleConfig``, ``EvalConfig`` and ``DemoConfig`` are importable from their
commands' modules too. The demo's ``flow`` is a ``FlowConfig``, as a job's is (``FlowMatching.of``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

from ddm.models.config import SAMPLERS, FlowConfig, ModelConfig
from ddm.rules import Rule


@dataclass(frozen=True)
class SamplingConfig:
    """How samples are drawn: ``ddm sample`` and ``ddm evaluate`` share these settings."""

    num_samples: int = 64
    steps: int = 50
    sampler: str = "heun"
    guidance: float = 1.0  # classifier-free guidance scale (1 = none)
    seed: int | None = None  # None: the run's seed under `ddm run`, else 0
    batch_size: int = 64
    device: str = "auto"  # auto: a CUDA GPU when there is one, else the CPU; or cpu, cuda, cuda:1, ...
    precision: str = "fp32"  # bf16: the networks run under bf16 autocast; the ODE state stays fp32

    def __post_init__(self) -> None:
        for name in ("num_samples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is unknown; choose one of {list(SAMPLERS)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")

    def seeded(self: C, default: int = 0) -> C:
        """This config with its seed set (``default`` where it is None)."""
        return self if self.seed is not None else dataclasses.replace(self, seed=default)

    @property
    def evals_per_sample(self) -> int:
        """Velocity evaluations per sample: one per Euler step, two per Heun step."""
        return self.steps * (2 if self.sampler == "heun" else 1)


C = TypeVar("C", bound=SamplingConfig)


@dataclass(frozen=True)
class SampleConfig(SamplingConfig):
    rule: str = ""  # empty: the ensemble's default rule (top-1 unless assembled otherwise)
    name: str = ""  # output folder under samples/; empty: <rule>-s<seed>-<ensemble id>-<settings digest>
    # A text-conditioned ensemble samples from prompts, cycled over num_samples: listed here, or one
    # per line of prompts_file (a line "<guidance><TAB><prompt>" gives that prompt its own guidance).
    prompts: list[str] = field(default_factory=list)
    prompts_file: str = ""


@dataclass(frozen=True)
class EvalConfig(SamplingConfig):
    num_samples: int = 1000
    steps: int = 30
    batch_size: int = 500
    rules: list[str] = field(default_factory=lambda: ["monolith", "top1", "top2", "full", "oracle"])
    metric: str = "fd_classifier"  # fd_classifier (offline) | fid (Inception, pytorch-fid)
    router_t: list[float] = field(default_factory=lambda: [round(0.05 + 0.1 * i, 2) for i in range(10)])
    router_samples: int = 10000  # data samples the router's accuracy against t is measured on (at most)
    name: str = ""  # output folder under eval/; empty: s<seed>-<ensemble id>-<settings digest>
    # Text ensembles: prompts from held-out data instead of the captions of a draw of the training
    # images: a source ddm ingests (glyphs:N, Parquet, WebDataset, a folder), read with the data's
    # caption, label and glyph settings (a generated source drawn with held_out_seed). Its captions
    # are the prompts, its labels what prompt adherence checks; the oracle rule needs partitions
    # and is refused with it.
    held_out: str = ""
    held_out_seed: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.held_out and any(not r.startswith("monolith") and r != "distilled" and Rule.parse(r).name == "oracle"
                                 for r in self.rules):  # fmt: skip
            raise ValueError(
                "the oracle rule routes each sample to its image's partition, and held-out prompts have none: drop "
                "oracle from rules, or leave held_out empty (prompts from the training data's captions)"
            )
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (a Fréchet distance needs two samples), got {self.num_samples}")
        if self.metric not in ("fd_classifier", "fid"):
            raise ValueError(f"metric must be fd_classifier or fid, got {self.metric!r}")
        if not self.rules:
            raise ValueError("rules is empty; list at least one of monolith, top1, top2, full, oracle, sample, ...")
        if any(not 0.0 <= t <= 1.0 for t in self.router_t):
            raise ValueError(f"router_t values must lie in [0, 1], got {self.router_t}")
        if self.router_samples < 1:
            raise ValueError(f"router_samples must be >= 1, got {self.router_samples}")


@dataclass(frozen=True)
class MixtureConfig:
    """Equal-weight isotropic Gaussians evenly spaced on a circle."""

    num_components: int = 16  # many narrow modes: hard enough that a small monolith smears them
    dim: int = 2
    radius: float = 4.0
    std: float = 0.12
    num_train: int = 20_000
    num_eval: int = 2_000  # held-out samples the distances are measured against

    def __post_init__(self) -> None:
        if self.num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {self.num_components}")
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2 (a ring needs two coordinates), got {self.dim}")
        if self.std <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.num_train < 2 or self.num_eval < 2:
            raise ValueError("num_train and num_eval must be >= 2")


@dataclass(frozen=True)
class DemoConfig:
    data: MixtureConfig = field(default_factory=MixtureConfig)
    num_partitions: int = 4  # K experts (the paper finds 8 best on ImageNet)
    expert: ModelConfig = field(default_factory=lambda: ModelConfig("MLP-S", (2,), class_dropout_prob=0.0))
    # The router is far smaller than an expert (paper: DiT-B/2 routing DiT-XL/2 experts), so
    # top-1 sampling costs about one expert forward.
    router: ModelConfig = field(default_factory=lambda: ModelConfig("MLP-XS", (2,), class_dropout_prob=0.0))
    flow: FlowConfig = field(default_factory=lambda: FlowConfig(time_sampling="uniform"))  # FlowMatching.of(flow)
    steps_per_expert: int = 1_000
    router_steps: int = 1_000
    batch_size: int = 256
    lr: float = 1e-3  # the paper's 1e-4 is for DiT-XL; small MLPs on 2-D data train well at 1e-3
    ema_decay: float = 0.995  # short runs: the paper's 0.9999 would average over 10k steps
    sample_steps: int = 40
    sampler: str = "heun"
    num_samples: int = 2_000
    rules: list[str] = field(default_factory=lambda: ["top1", "top2", "full", "oracle", "sample"])
    seed: int = 0
    output_dir: str = "outputs/demo"

    def __post_init__(self) -> None:
        if not 1 <= self.num_partitions <= self.data.num_train:
            raise ValueError(
                f"num_partitions must be between 1 and data.num_train={self.data.num_train}, got {self.num_partitions}"
            )
        for name, model in (("expert", self.expert), ("router", self.router)):
            if model.data_shape != (self.data.dim,):
                raise ValueError(
                    f"{name}.data_shape {model.data_shape} does not match the data: samples have shape "
                    f"({self.data.dim},)"
                )
            if model.num_classes:
                raise ValueError(f"{name}.num_classes must be 0: the mixture demo is unconditional")
        for name in ("steps_per_expert", "router_steps", "batch_size", "sample_steps", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is unknown; choose one of {list(SAMPLERS)}")
        if not self.rules:
            raise ValueError("rules must name at least one ensemble rule, e.g. [top1]")
        for rule in self.rules:
            Rule.parse(rule)  # raises a ValueError naming the bad rule
