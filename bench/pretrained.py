"""Experts from anywhere, measured (issue: experts from pretrained weights, mixed DDPM and
flow-matching experts): on glyphs, K = 2 experts per ensemble, several seeds.

Arms, each an ensemble of K experts and the same router (top-1), each expert at B/K for S steps
(the paper's split) unless said:

- ``scratch``: flow-matching experts from random weights (ddm's default);
- ``init``: experts fine-tuned from a monolith pretrained on all the data for P steps at batch B
  (``init_from=monolith``), for the same S steps: equal fine-tuning FLOPs, the pretraining's FLOPs
  on top (both stated);
- ``init_equal_total``: the same start, fine-tuned for S - P steps, so pretraining + fine-tuning
  equals ``scratch``'s training FLOPs;
- ``mixed``: expert 0 the flow-matching expert of ``scratch``, expert 1 a DDPM expert (epsilon on
  the VP path) trained from random weights for the same steps (Heterogeneous DDM's mix; the
  ensemble converts it at every step);
- ``pretrained_monolith``: the pretrained monolith alone (what the start is worth by itself).

Jobs run as ``python -m ddm.train`` (one process each, no Ray; 2 at once on 2 cores, one thread
each). The distance is the FD-classifier of ``ddm evaluate`` (lower is better), one classifier for
every arm and seed. Stores go under ``--root`` (default a temporary folder).

    .venv/bin/python bench/pretrained.py [--seeds 0 1 2] [--steps 1500] [--pretrain 750] [--images 16000]

Prints a markdown table (mean ± standard deviation over seeds) and, last, a JSON object. A re-run
with the same ``--root`` reuses the seeds it finished (``s<seed>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, K = 64, 2
MODEL = ["model.arch=DiT-Tiny/4", "model.data_shape=[1,16,16]", "model.num_classes=62", "model.class_dropout_prob=0.1"]
COMMON = ["lr=0.0003", "ema_decay=0.999", "log_every=100", "threads=1", *MODEL]
DDPM = ["flow.path=vp", "flow.prediction=epsilon", "flow.time_sampling=uniform"]
ROUTER = ["job=router", "model.arch=DiT-Micro/8", "flow.time_sampling=uniform", "steps=1000", f"global_batch_size={B}"]


def train(store: str, seed: int, *overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "RAY_ADDRESS")}
    cmd = [sys.executable, "-m", "ddm.train", f"store={store}", f"seed={seed}", *COMMON, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**env, "DS_ACCELERATOR": "cpu"}, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[3:])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_parallel(*calls) -> list:
    with ThreadPoolExecutor(2) as pool:
        return [f.result() for f in [pool.submit(*c) for c in calls]]


def copy(data: str, dst: str, other: str | None = None, *folders: str) -> str:
    """``dst``: the data store's data and partitions, and ``folders`` of the store ``other``."""
    shutil.copytree(data, dst)
    for f in folders:
        shutil.copytree(os.path.join(other, f), os.path.join(dst, f))
    return dst


def evaluate(store: str, seed: int, rules: list[str], classifier: str | None) -> dict[str, float]:
    from ddm.ensemble.assemble import assemble
    from ddm.eval.evaluate import evaluate as run_eval
    from ddm.eval.settings import EvalConfig
    from ddm.store import Store

    if classifier and not os.path.exists(os.path.join(store, "eval", "classifier")):
        shutil.copytree(classifier, os.path.join(store, "eval", "classifier"))  # one feature network for all
    s = Store(store)
    assemble(s, "top1", replace=True)
    cfg = EvalConfig(rules=rules, num_samples=1000, steps=20, sampler="heun", seed=seed, router_samples=1000)
    return {r["rule"]: r["distance"] for r in run_eval(s, cfg)["rules"]}


def run_seed(data: str, root: str, seed: int, steps: int, pretrain: int, classifier: str | None) -> dict:
    per_expert = [f"global_batch_size={B // K}", f"checkpoint.every={steps}"]
    scratch = copy(data, os.path.join(root, f"s{seed}-scratch"))
    t0 = time.time()
    # The router and the pretrained monolith first (the monolith is the others' start).
    in_parallel(
        (train, scratch, seed, *ROUTER, "checkpoint.every=1000"),
        (train, scratch, seed, "partition=-1", f"steps={pretrain}", f"global_batch_size={B}",
         f"checkpoint.every={pretrain}"),
    )  # fmt: skip
    init = copy(data, os.path.join(root, f"s{seed}-init"), scratch, "router")
    equal = copy(data, os.path.join(root, f"s{seed}-init-equal-total"), scratch, "router")
    mixed = copy(data, os.path.join(root, f"s{seed}-mixed"), scratch, "router")
    mono = f"init_from={scratch}/monolith"
    calls = [(train, scratch, seed, f"partition={k}", f"steps={steps}", *per_expert) for k in range(K)]
    calls += [(train, init, seed, f"partition={k}", f"steps={steps}", mono, *per_expert) for k in range(K)]
    rest = steps - pretrain  # pretraining at B for P steps costs as much as K experts at B/K for P steps
    calls += [(train, equal, seed, f"partition={k}", f"steps={rest}", mono, *per_expert[:1],
               f"checkpoint.every={rest}") for k in range(K)]  # fmt: skip
    calls += [(train, mixed, seed, "partition=1", f"steps={steps}", *DDPM, *per_expert)]
    in_parallel(*calls)
    shutil.copytree(os.path.join(scratch, "experts", "00"), os.path.join(mixed, "experts", "00"))
    train_s = time.time() - t0
    out = evaluate(scratch, seed, ["top1", "monolith"], classifier)
    classifier = classifier or os.path.join(scratch, "eval", "classifier")
    dist = {"scratch": out["top-1"], "pretrained_monolith": out["monolith"]}
    for arm, store in (("init", init), ("init_equal_total", equal), ("mixed", mixed)):
        dist[arm] = evaluate(store, seed, ["top1"], classifier)["top-1"]
    return {"distance": dist, "train_s": round(train_s, 1), "classifier": classifier, "jobs": len(calls) + 2}


def training_flops(steps: int, pretrain: int) -> dict:
    """Training FLOPs per arm from the job configs (3 x forward x batch x steps, ddm's accounting)."""
    from ddm.core.config import load
    from ddm.train.job import JobConfig

    def job(*o: str) -> float:
        cfg = load(JobConfig, None, ["store=/x", *COMMON, *o])
        return cfg.flops_per_step() * cfg.steps

    expert = job(f"steps={steps}", f"global_batch_size={B // K}")
    ddpm = job(f"steps={steps}", f"global_batch_size={B // K}", *DDPM)
    router = job(*ROUTER)
    pre = job("partition=-1", f"steps={pretrain}", f"global_batch_size={B}")
    short = job(f"steps={steps - pretrain}", f"global_batch_size={B // K}")
    return {
        "scratch": {"fine_tune_or_train": K * expert, "pretraining": 0.0, "router": router},
        "init": {"fine_tune_or_train": K * expert, "pretraining": pre, "router": router},
        "init_equal_total": {"fine_tune_or_train": K * short, "pretraining": pre, "router": router},
        "mixed": {"fine_tune_or_train": expert + ddpm, "pretraining": 0.0, "router": router},
        "pretrained_monolith": {"fine_tune_or_train": 0.0, "pretraining": pre, "router": 0.0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500, help="S: each expert's steps at B/K")
    ap.add_argument("--pretrain", type=int, default=750, help="P: the monolith's pretraining steps at B")
    ap.add_argument("--images", type=int, default=16000)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    if not 0 < args.pretrain < args.steps:
        raise SystemExit("--pretrain must lie between 0 and --steps (init_equal_total fine-tunes for S - P steps)")
    sys.path.insert(0, ROOT)
    from ddm.data.ingest import IngestConfig, ingest
    from ddm.data.partition import PartitionConfig, partition
    from ddm.store import Store

    root = args.root or tempfile.mkdtemp(prefix="ddm-bench-pretrained-")
    data = os.path.join(root, "data")
    if not os.path.exists(os.path.join(data, "partitions")):
        ingest(IngestConfig(source=f"glyphs:{args.images}", resolution=16, shard_size=4096), Store(data))
        partition(PartitionConfig(num_partitions=K, features="pca"), Store(data))
    per_seed, classifier = {}, None
    for seed in args.seeds:
        done = os.path.join(root, f"s{seed}.json")  # a re-run with the same --root reuses finished seeds
        if os.path.exists(done):
            per_seed[seed] = json.load(open(done))
        else:
            for arm in ("scratch", "init", "init-equal-total", "mixed"):  # an interrupted seed starts over
                shutil.rmtree(os.path.join(root, f"s{seed}-{arm}"), ignore_errors=True)
            per_seed[seed] = run_seed(data, root, seed, args.steps, args.pretrain, classifier)
            with open(done, "w") as f:
                json.dump(per_seed[seed], f)
        classifier = per_seed[seed]["classifier"]
        print(f"seed {seed}: {per_seed[seed]['distance']} (training {per_seed[seed]['train_s']} s)", flush=True)
    flops = training_flops(args.steps, args.pretrain)
    rows = {}
    for arm in flops:
        ds = [r["distance"][arm] for r in per_seed.values()]
        rows[arm] = {"mean": statistics.mean(ds), "std": statistics.stdev(ds) if len(ds) > 1 else 0.0, "per_seed": ds,
                     **{f"{k}_flops": v for k, v in flops[arm].items()}}  # fmt: skip
    print(f"\nglyphs:{args.images}, K={K}, B={B}, S={args.steps}, P={args.pretrain}; FD-classifier, lower is better\n")
    print("| arm | distance (mean ± std) | per seed | training FLOPs | pretraining FLOPs |")
    print("|---|---|---|---|---|")
    for arm, r in rows.items():
        train_flops = r["fine_tune_or_train_flops"] + r["router_flops"]
        print(f"| {arm} | {r['mean']:.3f} ± {r['std']:.3f} | {', '.join(f'{v:.3f}' for v in r['per_seed'])} | "
              f"{train_flops:.3g} | {r['pretraining_flops']:.3g} |")  # fmt: skip
    print(json.dumps({"images": args.images, "K": K, "B": B, "S": args.steps, "P": args.pretrain, "root": root,
                      "seeds": args.seeds, "arms": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
