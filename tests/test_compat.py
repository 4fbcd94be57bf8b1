"""Stores and specs written by ddm 0.1 keep working, and the layout keeps its promises.

``fixtures/store_v0.1.tar.gz`` was written by ddm 0.1 (commit 3a51a69): digits in 2 partitions, two
DiT-Tiny/2 experts and a router (4 steps each, flat config.json files, the old output-layer
parameter names), expert 0's step-4 checkpoint, and the assembled ensemble.json.
``fixtures/store_v0.1_expert00_step6.safetensors`` is the export that ddm 0.1 itself wrote when it
resumed that expert from step 4 to step 6.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddm.core.config import from_dict, load, to_dict
from ddm.ensemble.assemble import assemble, load_ensemble
from ddm.models.dit import upgrade_state_dict
from ddm.models.flow import FlowMatching
from ddm.store import Store
from ddm.train.job import JobConfig, config_changes, is_finished
from tests.helpers import child_env, digits_store

FIXTURES = Path(__file__).parent / "fixtures"
OLD_EXPERT = [
    "model.arch=DiT-Tiny/2", "model.data_shape=[1,8,8]", "model.num_classes=10", "global_batch_size=16",
    "log_every=2", "checkpoint.every=2", "checkpoint.keep=2", "engine.zero_stage=1", "partition=0",
]  # fmt: skip


@pytest.fixture
def old_store(tmp_path) -> str:
    return digits_store(str(tmp_path))


def test_old_ensemble_loads_and_samples(old_store):
    store = Store(old_store)
    ens = load_ensemble(store)  # ensemble.json and exports of ddm 0.1, old parameter names
    assert ens.num_experts == 2 and str(ens.rule) == "top-1"
    x = FlowMatching().sample(ens.velocity_fn(y=torch.arange(6)), torch.randn(6, 1, 8, 8), 3)
    assert x.shape == (6, 1, 8, 8) and torch.isfinite(x).all()
    assert assemble(store) == store.read_json("ensemble.json")  # re-assembling finds the same ensemble


def test_old_job_config_is_understood(old_store):
    old = json.loads(Path(old_store, "experts/00/config.json").read_text())
    assert "checkpoint_every" in old and "ray" not in old  # really the flat format
    cfg = from_dict(JobConfig, old)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.engine.zero_stage, cfg.ray.num_workers) == (2, 2, 1, 1)
    # The fixture's own store field names the folder it was made in (/tmp/oldstore on that machine).
    assert is_finished(dataclasses.replace(cfg, store=old_store))
    resumed = load(JobConfig, None, [f"store={old_store}", *OLD_EXPERT, "steps=6"])
    assert config_changes(old, to_dict(resumed)) == ""  # more steps: the same job
    other = load(JobConfig, None, [f"store={old_store}", *OLD_EXPERT, "lr=0.001"])
    assert config_changes(old, to_dict(other)) == "lr: 0.0001 -> 0.001"


def test_old_expert_resumes_to_the_weights_ddm_0_1_reaches(old_store):
    """The step-4 checkpoint of ddm 0.1 (DeepSpeed files, EMA under the old names) resumes to step 6
    to the weights ddm 0.1 itself produced from the same checkpoint: to float32 rounding, as the
    fixture was made on another CPU (bitwise equality holds only on one machine; on an AMD EPYC
    30 of 31 tensors differ by at most 1.5e-8). Every tensor of the EMA export moves by more than 1e-4
    from step 4 to step 6, a hundred times the tolerance."""
    cmd = [sys.executable, "-m", "ddm.train", f"store={old_store}", *OLD_EXPERT, "steps=6"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["startup"]["resumed_from"] == 4
    expected = upgrade_state_dict(load_file(FIXTURES / "store_v0.1_expert00_step6.safetensors"))
    got = load_file(Path(old_store, "experts/00/export/model.safetensors"))
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_old_router_checkpoint_is_refused_not_misread(old_store, tmp_path):
    """A router's optimizer state from ddm 0.1 follows another parameter order: restoring it would
    silently mix moments of different tensors, so the job says what to do instead."""
    from ddm.checkpoint.manager import CheckpointManager

    store = Store(old_store)
    run = store.child("experts/00")
    manager = CheckpointManager(run, rank=0, world_size=1, min_format=2)
    with pytest.raises(ValueError, match="written by ddm 0.1"):
        manager.load_latest(engine=None)  # refused before anything is deserialised
    manager.close()


def test_job_spec_imports_no_torch():
    code = "import sys, ddm.train.job, ddm.store.layout; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=child_env())
    assert out.stdout.strip() == "False", out.stderr


def test_run_folder_names_are_spelled_in_one_place():
    """No module but ddm/store/layout.py spells a run-folder name as a string literal."""
    import re

    names = r'f?"(experts/|distilled/|ensemble\.json|islands/|eval/|samples/|checkpoints"|export"'
    names += r"|summary\.json|progress\.json)"
    offenders = []
    for path in Path(__file__).parents[1].joinpath("ddm").rglob("*.py"):
        if path.name == "layout.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(names, code):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders
