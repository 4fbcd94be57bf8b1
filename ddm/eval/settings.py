"""``ddm evaluate``'s settings, kept apart from its code: no torch here, so ``ddm --help``, run specs
and islands plans load them at once. ``EvalConfig`` is importable from ``ddm.eval.evaluate`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ddm.ensemble.rules import Rule
from ddm.ensemble.settings import SamplingConfig


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
