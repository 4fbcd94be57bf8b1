"""The ensemble's combine rules as settings: which experts a router's posterior keeps, and how they
are written ("top1", "top-2", "threshold:0.2", ...). No torch here, so configs that name rules (the
demo's, evaluation's) load without it; ``ddm.ensemble.combine`` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

RULES = ("top1", "topk", "full", "threshold", "nucleus", "sample", "oracle")


@dataclass(frozen=True)
class Rule:
    """How router posteriors become expert weights.

    top1: the most probable expert, weight 1 (ties go to the lower index).
    topk: the k most probable, weights renormalised over them; k >= K is the full rule.
    full: every expert, weighted by the posterior (exact with an exact router).
    threshold: experts with p >= threshold, renormalised; top-1 when none reaches it.
    nucleus: the smallest most-probable set whose mass reaches top_p, renormalised.
    sample: one expert drawn from the posterior per sample and step ("Sample-1").
    oracle: the given partition of each sample (no router), weight 1.
    """

    name: str = "top1"
    k: int = 1
    threshold: float = 0.1
    top_p: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"ensemble rule {self.name!r} is unknown; choose one of {list(RULES)}")
        if self.k < 1:
            raise ValueError(f"top-k needs k >= 1, got k={self.k}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"nucleus top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def parse(cls, text: str) -> "Rule":
        """Parse "top1", "top-2", "full", "threshold:0.2", "nucleus:0.9", "sample" or "oracle"."""
        name, _, arg = text.strip().lower().replace("_", "-").partition(":")
        if name in ("top1", "top-1"):
            return cls("top1")
        if name.startswith("top") and name != "top":
            digits = name[3:].lstrip("-")
            if not digits.isdigit():
                raise ValueError(f"cannot parse ensemble rule {text!r}: expected top-<k> with an integer k")
            return cls("topk", k=int(digits))
        try:
            if name == "threshold":
                return cls("threshold", threshold=float(arg)) if arg else cls("threshold")
            if name == "nucleus":
                return cls("nucleus", top_p=float(arg)) if arg else cls("nucleus")
        except ValueError as e:
            if "could not convert" in str(e):
                raise ValueError(f"cannot parse ensemble rule {text!r}: {arg!r} is not a number") from e
            raise
        if arg:
            raise ValueError(f"ensemble rule {name!r} takes no argument, got {text!r}")
        return cls(name)

    def __str__(self) -> str:
        return {
            "topk": f"top-{self.k}",
            "top1": "top-1",
            "threshold": f"threshold:{self.threshold:g}",
            "nucleus": f"nucleus:{self.top_p:g}",
        }.get(self.name, self.name)
