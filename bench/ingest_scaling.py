"""Ingest as a Ray Data pipeline: decode + resize + write of 64x64 JPEGs at 1 and 2 CPU workers
(the scaling ratio), against the in-process path, and peak memory per worker at two dataset sizes.

An image folder of N random-texture 64x64 JPEGs (10 classes) is made once per size; each run
ingests it into a fresh local store at resolution 32 with ``shard_size`` images per shard (4096,
ddm's default). "Ray, k workers" is a local Ray runtime of k CPUs (started before the timing, with a
warm-up ingest) running ``runner=ray`` as users run it (``workers=0``: as many tasks as CPUs). Each
figure is the best of ``--repeats`` runs, taken in alternation so every configuration sees the same
machine state. Beside them, the same per-unit work (decode + resize + shard bytes, no store) in a
plain process pool of 1 and 2 processes: the machine's own scaling, the ceiling for any scheduler.
Peak RSS per worker: the largest resident set of any Ray worker process while the pipeline ran,
sampled every 20 ms; streaming means it should not grow with N (only with ``shard_size``).

    .venv/bin/python bench/ingest_scaling.py [--sizes 32768 98304] [--cpus 2]

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
import time

import numpy as np


def make_folder(root: str, n: int, side: int = 64, classes: int = 10, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for c in range(classes):
        os.makedirs(f"{root}/c{c}", exist_ok=True)
    for i in range(n):
        c = i % classes
        f = rng.uniform(2, 12, 3)
        img = np.stack([np.sin(2 * np.pi * (f[k] * xx + (c + k) * yy)) for k in range(3)], -1)
        img = np.clip((img * 0.5 + 0.5) * 255 + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(f"{root}/c{c}/{i:07d}.jpg", quality=90)


class PeakWorkerRSS:
    """The largest RSS (MiB) of any Ray worker process while the block runs (sampled every 50 ms;
    the list of worker processes is refreshed every second, to keep the sampler's own CPU small)."""

    def __enter__(self):
        import psutil

        self.peak, self.stop = 0.0, threading.Event()

        def workers() -> list:
            return [
                p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith("ray::")
            ]

        def poll():
            procs, listed = workers(), time.monotonic()
            while not self.stop.is_set():
                if time.monotonic() - listed > 1.0:
                    procs, listed = workers(), time.monotonic()
                for p in procs:
                    try:
                        self.peak = max(self.peak, p.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
                time.sleep(0.05)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _decode_and_encode(unit: dict) -> int:
    from ddm.data.shards import encode_shard
    from ddm.data.sources import load_unit

    part = load_unit(unit, 32, 0)
    return len(encode_shard(part["ids"], part["arrays"], part["labels"]))


def ceiling(source: str, processes: int, shard_size: int) -> float:
    """The same per-unit work (decode + resize + shard bytes, no store, no Ray) in a plain
    process pool: what this machine's cores give, the ceiling for any scheduler."""
    import multiprocessing as mp

    from ddm.data.ingest import IngestConfig
    from ddm.data.sources import open_source

    units = open_source(IngestConfig(source=source)).units(shard_size)
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_decode_and_encode, units[:processes])  # start-up and imports, untimed
        t0 = time.perf_counter()
        pool.map(_decode_and_encode, units, chunksize=1)
        return time.perf_counter() - t0


def run(source: str, workdir: str, runner: str, workers: int, shard_size: int) -> tuple[float, float, int]:
    from ddm.data.ingest import IngestConfig, ingest
    from ddm.store import Store

    root = tempfile.mkdtemp(dir=workdir)
    cfg = IngestConfig(source=source, resolution=32, shard_size=shard_size, runner=runner, workers=workers)
    with PeakWorkerRSS() as mem:
        t0 = time.perf_counter()
        m = ingest(cfg, Store(root))
        seconds = time.perf_counter() - t0
    shutil.rmtree(root)
    return seconds, mem.peak, int(m["num_samples"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32_768, 98_304])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    work = tempfile.mkdtemp(prefix="ddm-bench-")
    results: dict = {"cpus": args.cpus, "shard_size": args.shard_size, "image": "64x64 JPEG -> 32x32", "sizes": {}}
    warm = f"{work}/warm"
    make_folder(warm, 2 * args.shard_size)
    try:
        sources = {}
        for n in sorted(args.sizes):
            sources[n] = f"{work}/src-{n}"
            t0 = time.perf_counter()
            make_folder(sources[n], n)
            print(f"N={n}: made {n} JPEGs in {time.perf_counter() - t0:.0f} s")
        best: dict = {n: {} for n in sources}
        peak: dict = {n: {} for n in sources}
        for _ in range(args.repeats):
            for name, runner, cpus in (("local", "local", 0), ("ray_1", "ray", 1), ("ray_2", "ray", args.cpus)):
                if cpus:
                    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
                    run(warm, work, "ray", 0, args.shard_size)  # worker start-up and imports, untimed
                try:
                    for n, src in sources.items():
                        s, rss, got = run(src, work, runner, 0, args.shard_size)
                        assert got == n, (got, n)
                        best[n][name] = min(best[n].get(name, float("inf")), s)
                        peak[n][name] = max(peak[n].get(name, 0.0), rss)
                finally:
                    if cpus:
                        ray.shutdown()
            for n, src in sources.items():
                for p in (1, 2):
                    best[n][f"pool_{p}"] = min(best[n].get(f"pool_{p}", float("inf")), ceiling(src, p, args.shard_size))
        for n in sources:
            b = best[n]
            r = {f"{k}_images_per_s": n / v for k, v in b.items()}
            r["scaling_2_over_1"] = b["ray_1"] / b["ray_2"]
            r["process_pool_scaling_2_over_1"] = b["pool_1"] / b["pool_2"]
            r["ray_2_over_local"] = b["local"] / b["ray_2"]
            r["peak_worker_rss_mib"] = peak[n]["ray_2"]
            results["sizes"][str(n)] = r
            print(
                f"N={n}: in-process {r['local_images_per_s']:.0f} img/s, Ray 1 worker {r['ray_1_images_per_s']:.0f}, "
                f"2 workers {r['ray_2_images_per_s']:.0f} (x{r['scaling_2_over_1']:.2f}; a plain process pool: "
                f"x{r['process_pool_scaling_2_over_1']:.2f}); peak worker RSS {r['peak_worker_rss_mib']:.0f} MiB"
            )
        sizes = sorted(args.sizes)
        small, large = results["sizes"][str(sizes[0])], results["sizes"][str(sizes[-1])]
        results["scaling_2_over_1"] = large["scaling_2_over_1"]
        results["process_pool_scaling_2_over_1"] = large["process_pool_scaling_2_over_1"]
        results["peak_rss_ratio_large_over_small"] = large["peak_worker_rss_mib"] / small["peak_worker_rss_mib"]
        results["size_ratio"] = sizes[-1] / sizes[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
