"""An ensemble from object storage: load time from S3 (cold and warm) and top-1 sampling speed
against one expert, measured side by side in one run.

A real S3 endpoint (moto's server on 127.0.0.1, the one the tests use) holds K expert exports and a
router exported in ddm's format and put together by ``assemble``. Figures:

- load_cold_s: ``load_ensemble`` + every expert loaded, empty local cache (all weights over S3,
  each checked against its manifest's sha256);
- load_warm_s: the same with the content-addressed cache filled by the cold load (only the small
  JSON files come from S3);
- load_nocache_s: the same with caching off (what every load costs without the cache);
- top1_over_one_expert: time of top-1 sampling with the store-loaded ensemble over one expert's
  sampling with the same steps and batch (median of interleaved pairs).

    .venv/bin/python bench/store_ensemble.py [--arch DiT-S/2] [--experts 4] [--batch 64] [--steps 10]

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir("bench")
    return server, endpoint


def write_export(store, run_dir: str, model: torch.nn.Module, config: dict) -> None:
    """The layout ``ddm.models.exports.write_export`` writes: safetensors + config.json + manifest."""
    from safetensors.torch import save

    run = store.child(run_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    known = {
        "model.safetensors": run.write_hashed("export/model.safetensors", save(state)),
        "config.json": run.write_hashed("export/config.json", json.dumps(config).encode()),
    }
    run.commit("export", list(known), meta={"step": config["step"]}, known=known)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="DiT-S/2")
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 16, 16])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from ddm.core.config import to_dict
    from ddm.ensemble.assemble import assemble, load_ensemble
    from ddm.models import ModelConfig
    from ddm.models.build import build_model, build_router
    from ddm.models.flow import FlowMatching
    from ddm.store import Store

    server, endpoint = start_s3()
    try:
        store = Store("s3://bench/run")
        k = args.experts
        model_cfg = ModelConfig(args.arch, tuple(args.shape), num_classes=10)
        flow = FlowMatching()
        store.commit("partitions", [], meta={"num_partitions": k})
        t0 = time.perf_counter()
        for i in range(k):
            model = build_model(model_cfg)
            for p in model.parameters():  # non-zero outputs: a trained-looking expert, not the zero init
                p.data.normal_(0, 0.02)
            cfg = {"job": "expert", "model": to_dict(model_cfg), "flow": to_dict(flow), "step": 1, "partition": i}
            write_export(store, f"experts/{i:02d}", model, cfg)
        router_cfg = ModelConfig("DiT-Tiny/2", tuple(args.shape), num_classes=10)
        router = build_router(router_cfg, k)
        write_export(
            store,
            "router",
            router,
            {
                "job": "router",
                "model": to_dict(router_cfg),
                "flow": to_dict(flow),
                "step": 1,
                "partition": None,
                "num_partitions": k,
            },
        )
        assemble(store, "top1")
        upload_s = time.perf_counter() - t0
        size_mb = sum(store.size(f"experts/{i:02d}/export/model.safetensors") for i in range(k)) / 2**20

        def load_all(cache_dir):
            t = time.perf_counter()
            ens = load_ensemble(Store("s3://bench/run"), cache_dir=cache_dir)
            for e in ens.experts:
                e.load()
            return ens, time.perf_counter() - t

        with tempfile.TemporaryDirectory() as cache:
            ens, cold = load_all(cache)
            _, warm = load_all(cache)
            warm2 = load_all(cache)[1]
        nocache = load_all(None)[1]

        expert = ens.experts[0].module
        y = torch.arange(args.batch) % 10
        noise = torch.randn(args.batch, *args.shape)
        one = lambda: flow.sample(lambda x, t: expert(x, t, y), noise, args.steps, "euler")  # noqa: E731
        top1 = lambda: flow.sample(ens.velocity_fn(y=y), noise, args.steps, "euler")  # noqa: E731
        ratios, t_one, t_top1 = [], [], []
        with torch.no_grad():
            one(), top1()  # warm-up
            for _ in range(args.repeats):
                a = time.perf_counter()
                one()
                b = time.perf_counter()
                top1()
                c = time.perf_counter()  # noqa: E702
                t_one.append(b - a)
                t_top1.append(c - b)
                ratios.append((c - b) / (b - a))
        figures = {
            "arch": args.arch,
            "shape": args.shape,
            "experts": k,
            "expert_weights_mb_total": round(size_mb, 1),
            "upload_s": round(upload_s, 2),
            "load_cold_s": round(cold, 3),
            "load_warm_s": round(min(warm, warm2), 3),
            "load_nocache_s": round(nocache, 3),
            "cold_over_warm": round(cold / min(warm, warm2), 2),
            "batch": args.batch,
            "steps": args.steps,
            "one_expert_s": round(statistics.median(t_one), 3),
            "top1_store_ensemble_s": round(statistics.median(t_top1), 3),
            "top1_over_one_expert": round(statistics.median(ratios), 3),
            "router": "DiT-Tiny/2",
            "threads": args.threads,
        }
    finally:
        server.stop()
    print(
        f"load from S3 ({k} x {args.arch}, {size_mb:.0f} MB): cold {cold:.2f} s, warm {figures['load_warm_s']:.2f} "
        f"s, no cache {nocache:.2f} s"
    )
    print(
        f"top-1 sampling vs one expert (batch {args.batch}, {args.steps} steps): {figures['top1_over_one_expert']:.3f}x"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
