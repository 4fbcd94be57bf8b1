"""A checkpoint-sized state to and from object storage: extra memory and throughput of the store's
streamed transfers, against reading each file whole (ddm before 0.3), measured side by side.

A real S3 endpoint (moto's server on 127.0.0.1, in this process) receives a state of ``--gb`` GB
(fp32 tensors, ``torch.save``d to local scratch as DeepSpeed does). Each transfer runs in a fresh
child process that holds the state in memory, as a training rank does, and samples its resident
memory every 5 ms; the figure is its peak above what it held before the transfer began:

- upload_stream: ``Store.put_file`` (one pass: SHA-256 while reading; multipart, parts in flight);
- upload_whole: the file read into memory, hashed, then written in one call (the old path);
- download_stream: ``Store.get_verified`` to local scratch (checked against the manifest).

    .venv/bin/python bench/store_checkpoint.py [--gb 2] [--part-mb 16]

The last line printed is a JSON object with the figures (target: upload_stream's extra memory at
most 256 MB).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time


def child(mode: str, path: str, url: str) -> None:
    """One transfer in this process, with the state in memory; prints {seconds, peak_extra_mb}."""
    import threading

    import psutil
    import torch

    from ddm.store import Store

    state = torch.load(path, weights_only=True)  # what the rank holds while its upload runs
    store = Store(url)
    store.write_bytes("warm-up", b"x")  # the S3 client and its imports, as a training rank has them
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if mode == "upload_stream":
        entry = store.put_file(path, "ckpt/state.pt")
        store.commit("ckpt", ["state.pt"], known={"state.pt": entry})
    elif mode == "upload_whole":
        with open(path, "rb") as f:
            entry = store.write_hashed("ckpt/state.pt", f.read())
        store.commit("ckpt", ["state.pt"], known={"state.pt": entry})
    else:
        store.get_verified("ckpt", "state.pt", path + ".back", store.manifest("ckpt"))
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    del state
    print(json.dumps({"seconds": seconds, "peak_extra_mb": (peak[0] - base) / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--part-mb", type=int, default=16)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import torch
    from store_ensemble import start_s3  # the S3 benchmarks' one moto server (bench/ is sys.path[0])

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs one line per request otherwise
    _, endpoint = start_s3()
    env = {**os.environ, "DDM_STORE_PART_MB": str(args.part_mb), "AWS_ENDPOINT_URL": endpoint}
    out: dict = {"gb": args.gb, "part_mb": args.part_mb}
    with tempfile.TemporaryDirectory(prefix="ddm-bench-ckpt-") as tmp:
        path = os.path.join(tmp, "state.pt")
        n = int(args.gb * 2**30 / 4)
        torch.save({f"layer{i}": torch.randn(n // 8) for i in range(8)}, path)
        size_mb = os.path.getsize(path) / 2**20
        out["state_mb"] = round(size_mb)
        for i, mode in enumerate(["upload_stream", "upload_whole", "download_stream"]):
            url = f"s3://bench/run{i if mode != 'download_stream' else 0}"
            res = subprocess.run(
                [sys.executable, __file__, "--child", mode, path, url], env=env, capture_output=True, text=True
            )
            if res.returncode:
                raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
            fig = json.loads(res.stdout.strip().splitlines()[-1])
            out[f"{mode}_extra_mb"] = round(fig["peak_extra_mb"], 1)
            out[f"{mode}_mb_per_s"] = round(size_mb / fig["seconds"], 1)
            print(
                f"{mode}: {fig['seconds']:.1f}s, {size_mb / fig['seconds']:.0f} MB/s, "
                f"peak extra memory {fig['peak_extra_mb']:.0f} MB",
                flush=True,
            )
    out["target_extra_mb"] = 256
    out["upload_stream_meets_target"] = out["upload_stream_extra_mb"] <= 256
    print(json.dumps(out))


if __name__ == "__main__":
    main()
