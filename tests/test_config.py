"""Tier 1: typed config loading, dotted overrides and errors that name the field."""

import json
from dataclasses import dataclass, field

import pytest

from ddm.core.config import apply_overrides, dump_yaml, from_dict, load, to_dict
from ddm.models import ModelConfig, MoEConfig
from ddm.models.flow import FlowMatching


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-4
    steps: int = 10
    name: str = "a"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    model: ModelConfig = field(default_factory=lambda: ModelConfig("MLP-S", (2,)))
    flow: FlowMatching = field(default_factory=FlowMatching)
    tags: list[str] = field(default_factory=list)
    verbose: bool = False
    seed: int | None = None


def test_defaults_and_round_trip(tmp_path):
    cfg = load(Outer)
    assert cfg == Outer()
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load(Outer, path) == cfg
    json.dumps(to_dict(cfg))  # JSON-ready for checkpoints


def test_overrides_are_typed_and_keep_sibling_defaults():
    cfg = load(
        Outer,
        None,
        ["inner.lr=3e-4", "inner.steps=5", "model.moe.num_experts=0", "tags=[a, b]", "verbose=true", "seed=7"],
    )
    assert cfg.inner == Inner(lr=3e-4, steps=5)
    assert cfg.model.arch == "MLP-S" and cfg.model.data_shape == (2,)  # the parent's default survives
    assert isinstance(cfg.model.moe, MoEConfig)
    assert cfg.tags == ["a", "b"] and cfg.verbose is True and cfg.seed == 7


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {steps: 3}\nmodel: {arch: DiT-Tiny/2, data_shape: [4, 8, 8]}\n")
    cfg = load(Outer, path, ["inner.steps=4"])
    assert cfg.inner.steps == 4 and cfg.model.data_shape == (4, 8, 8)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["inner.stepz=3"], "unknown config field 'inner.stepz'"),
        (["inner.steps=abc"], "'inner.steps' must be an integer"),
        (["inner.steps=1.5"], "'inner.steps' must be an integer"),
        (["inner.lr=fast"], "'inner.lr' must be a number"),
        (["verbose=3"], "'verbose' must be true or false"),
        (["inner.steps=0"], "config field 'inner': steps must be >= 1"),
        (["flow.path=ve"], "config field 'flow': path 've' is unknown"),
        (["flow.path=vp"], "path='vp' with prediction='velocity': a DDPM expert is path vp with prediction epsilon"),
        (["flow.prediction=x0"], "prediction 'x0' is unknown"),
        (["model.arch=DiT-Huge/2"], "config field 'model': arch 'DiT-Huge/2' is unknown"),
        (["tags=x"], "'tags' must be a list"),
        (["inner.lr.x=1"], "'inner.lr' must be a number"),
        (["inner.lr=1", "inner.lr.x=2"], "'inner.lr' is a value, not a section"),
        (["novalue"], "must look like dotted.field=value"),
    ],
)
def test_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        load(Outer, None, overrides)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load(Outer, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load(Outer, scalar)


def test_apply_overrides_does_not_mutate_input():
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2", "a.c=x"])
    assert data == {"a": {"b": 1}} and out == {"a": {"b": 2, "c": "x"}}


def test_from_dict_rejects_non_mapping_section():
    with pytest.raises(ValueError, match="'inner' must be a mapping"):
        from_dict(Outer, {"inner": 3})
