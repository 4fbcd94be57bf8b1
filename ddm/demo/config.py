"""``ddm demo``'s settings, kept apart from its code: no torch here, so ``ddm --help`` loads them at
once. The demo's ``flow`` is a ``FlowConfig``, as a job's is (``FlowMatching.of``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ddm.ensemble.rules import Rule
from ddm.models.config import SAMPLERS, FlowConfig, ModelConfig


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
