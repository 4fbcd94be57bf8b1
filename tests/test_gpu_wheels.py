"""The GPU check's wheel list (``scripts/gpu-wheels.txt``) holds every distribution a job imports
that a bare GPU machine lacks, and a job trains without TensorBoard's writer, saying so once.

The list is not guessed: a real job (``python -m ddm.train``, as ``scripts/gpu-check.sh`` runs jobs)
runs in a copy of the bare machine's Python: only the distributions it has (torch, pytest, pyarrow,
fsspec, safetensors, with their own requirements) and the list's "train" rows are importable. A
distribution the list lacks fails the job with its ImportError; a row no job imports fails too.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import re
import subprocess
import sys

from packaging.requirements import Requirement

from ddm.data.ingest import IngestConfig, ingest
from ddm.data.partition import PartitionConfig, partition
from ddm.store import Store
from tests.helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BARE_GPU_MACHINE = ("torch", "pytest", "pyarrow", "fsspec", "safetensors")
# A job in the bare machine's Python: site-packages leaves sys.path, and a finder serves from it
# only the top-level modules of the allowed distributions (others are not found, as there; torch's
# "is pandas installed?" checks then answer no). On exit, what was imported.
RECORD = """
import importlib.machinery, importlib.metadata as md, json, re, runpy, sys
allowed, out = set(json.loads(sys.argv.pop(1))), sys.argv.pop(1)
owners = md.packages_distributions()
site = [p for p in sys.path if p.endswith("site-packages")]
sys.path[:] = [p for p in sys.path if p not in site]

class BareMachine:
    def find_spec(self, name, path=None, target=None):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(name, [])}
        if path is None and (not dists or dists & allowed):
            return importlib.machinery.PathFinder.find_spec(name, site)

sys.meta_path.append(BareMachine())
try:
    runpy.run_module("ddm.train", run_name="__main__", alter_sys=True)
finally:
    open(out, "w").write("\\n".join(sorted(sys.modules)))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_list() -> dict[str, tuple[str, str]]:
    """``scripts/gpu-wheels.txt``: distribution -> (import name, part)."""
    rows = {}
    for line in open(os.path.join(ROOT, "scripts/gpu-wheels.txt")):
        if line.strip() and not line.startswith("#"):
            dist, module, part = line.split()
            rows[canonical(dist)] = (module, part)
    return rows


def with_requirements(names) -> set[str]:
    """The distributions and everything they require (markers evaluated here, no extras)."""
    seen, todo = set(), [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(canonical(r.name))
    return seen


def test_a_job_runs_on_the_bare_gpu_machine_with_the_listed_wheels_only(tmp_path):
    store = tmp_path / "store"
    ingest(IngestConfig(shard_size=1000), Store(str(store)))
    partition(PartitionConfig(num_partitions=2, num_fine=64), Store(str(store)))
    listed = wheel_list()
    train = {d for d, (_, part) in listed.items() if part == "train"}
    bare = with_requirements(BARE_GPU_MACHINE)
    modules_file = tmp_path / "modules.txt"
    job = [f"store={store}", "partition=-1", "global_batch_size=8", "steps=5", "log_every=1", "checkpoint.every=2"]
    # DS_ACCELERATOR=cuda, as the GPU image once set for every process: a CPU job still trains.
    allowed = json.dumps(sorted(bare | with_requirements(train)))
    cmd = [sys.executable, "-c", RECORD, allowed, str(modules_file), *job]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env({"DS_ACCELERATOR": "cuda"}), cwd=ROOT)
    assert out.returncode == 0, f"a job on the bare machine + scripts/gpu-wheels.txt failed:\n{out.stderr[-3000:]}"
    assert Store(str(store)).child("monolith").exists("tensorboard")  # tensorboardX wrote the job's events
    # Steps 2, 4 and 5 were saved: bench/gpu_mfu.py divides the stall by this count (it assumed two).
    assert json.loads(out.stdout.strip().splitlines()[-1])["checkpoints_saved"] == 3
    imported = {m.split(".")[0] for m in modules_file.read_text().split()}
    assert "ray" not in imported and "s3fs" not in imported  # the job ran in the bare machine's Python
    # Every "train" row is needed: a row that neither a job imports nor an imported row requires is dead weight.
    owners = md.packages_distributions()
    used = {canonical(d) for m in imported for d in owners.get(m, [])} & train
    unused = train - with_requirements(used)
    assert not unused, f"scripts/gpu-wheels.txt lists {sorted(unused)} for training, which no job imports"


def test_the_gpu_check_probes_the_listed_modules():
    """The script's own probe line (run here) names the list's "train" and "check" modules, and they import."""
    [line] = [x for x in open(os.path.join(ROOT, "scripts/gpu-check.sh")) if x.startswith("TRAIN_MODULES=")]
    probe = subprocess.run(["bash", "-c", f"{line}\necho $TRAIN_MODULES"], capture_output=True, text=True, cwd=ROOT)
    modules = probe.stdout.strip().split(",")
    assert modules == [module for module, part in wheel_list().values() if part in ("train", "check")]
    subprocess.run([sys.executable, "-c", f"import {','.join(modules)}"], check=True)


def test_without_tensorboardx_a_job_has_no_board_and_says_so_once(tmp_path, monkeypatch, caplog):
    from ddm.train.board import open_board

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as on a machine without it: ImportError
    with caplog.at_level(logging.WARNING, logger="ddm.train"):
        assert open_board(Store(str(tmp_path)), None) is None
    [warning] = [r.getMessage() for r in caplog.records if "tensorboardX" in r.getMessage()]
    assert "pip install tensorboardX protobuf" in warning
