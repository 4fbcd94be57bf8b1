"""The data stage's networks on one GPU: SD-VAE encode images/s at 256 px and DINOv2-small feature
images/s at 224 px, with the real architectures (``vae:random``, ``dinov2:random``: the same
layers as the pretrained weights, so the same speed) exactly as ``ddm ingest encoder=vae`` and
``ddm partition features=dinov2`` run them (fp32, batches of ``--batch``, uint8 in, numpy out).

    python bench/gpu_encoders.py [--batch 64] [--images 1024]

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def throughput(fn, images: np.ndarray, warmup: int) -> float:
    fn(images[:warmup])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(images)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024)
    args = parser.parse_args()
    from ddm.data.encoders import DINOv2Model, VAEEncoder

    rng = np.random.default_rng(0)
    out = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "batch": args.batch,
        "images": args.images,
    }
    vae = VAEEncoder("vae:random", args.batch)
    x = rng.integers(0, 255, (args.images, 3, 256, 256), dtype=np.uint8)
    out["vae_encode_256px_images_per_s"] = throughput(vae, x, args.batch)
    del vae
    dino = DINOv2Model("dinov2:random", args.batch)
    x = rng.integers(0, 255, (args.images, 3, 64, 64), dtype=np.uint8)  # resized to 224 inside, as in partition
    out["dinov2_small_224px_images_per_s"] = throughput(lambda a: dino(a), x, args.batch)
    print(
        f"{out['device']}: SD-VAE encode {out['vae_encode_256px_images_per_s']:.0f} img/s at 256 px, "
        f"DINOv2-small {out['dinov2_small_224px_images_per_s']:.0f} img/s at 224 px (batch {args.batch})"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
