"""How samples are drawn (``SamplingConfig``, shared with evaluation) and ``ddm sample``'s settings,
kept apart from their code: this module imports no torch, so ``ddm --help``, run specs and islands
plans load them at once. ``SampleConfig`` is importable from ``ddm.ensemble.sample`` too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

from ddm.models.config import SAMPLERS


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
