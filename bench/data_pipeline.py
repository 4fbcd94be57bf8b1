"""Ingest + partition throughput and peak memory at two dataset sizes, side by side in one run.

Each size runs in a fresh subprocess (so peak RSS is its own): ingest ``synthetic:N`` 16x16
grayscale images into a local store, then partition them into K=8 with 1024 fine centroids.
Peak memory is reported as the growth of the process's max RSS over its level after imports;
streaming means that growth should not scale with N.

    .venv/bin/python bench/data_pipeline.py [--sizes 50000 200000]

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time, logging
logging.disable(logging.INFO)
import numpy as np, torch, sklearn.cluster  # imports first: their memory is the baseline
from ddm.data.ingest import IngestConfig, ingest
from ddm.data.partition import PartitionConfig, partition
from ddm.store import Store
n, root = int(sys.argv[1]), sys.argv[2]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
base = rss()
store = Store(root)
t0 = time.perf_counter()
ingest(IngestConfig(source=f"synthetic:{n}", resolution=16, shard_size=4096), store)
t1 = time.perf_counter()
after_ingest = rss()
m = partition(PartitionConfig(num_partitions=8, num_fine=1024, fine_epochs=2), store)
t2 = time.perf_counter()
print(json.dumps({"samples": n, "ingest_samples_per_s": n / (t1 - t0), "partition_samples_per_s": n / (t2 - t1),
                  "ingest_s": t1 - t0, "partition_s": t2 - t1, "baseline_rss_mib": base,
                  "ingest_peak_growth_mib": after_ingest - base, "total_peak_growth_mib": rss() - base,
                  "partition_sizes": m["counts"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    args = parser.parse_args()
    results = {}
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), f"{tmp}/store"], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"size {n} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
        results[f"n_{n}"] = r
        print(
            f"N={n:>7}: ingest {r['ingest_samples_per_s']:8.0f} samples/s, partition "
            f"{r['partition_samples_per_s']:8.0f} "
            f"samples/s, peak RSS growth {r['total_peak_growth_mib']:.0f} MiB (baseline {r['baseline_rss_mib']:.0f} "
            "MiB)"
        )
    sizes = sorted(args.sizes)
    if len(sizes) >= 2:
        small, large = results[f"n_{sizes[0]}"], results[f"n_{sizes[-1]}"]
        results["size_ratio"] = sizes[-1] / sizes[0]
        results["peak_growth_ratio"] = large["total_peak_growth_mib"] / max(small["total_peak_growth_mib"], 1e-9)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
