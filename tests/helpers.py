"""Helpers for tests that run jobs in subprocesses; light imports only (the GPU tier imports this
on machines without Ray, scikit-learn or an S3 client)."""

import json
import os
import socket
import subprocess

import torch
from safetensors.torch import load_file

from ddm.store import Store

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")


def child_env(extra: dict | None = None) -> dict:
    """This process's environment without launcher variables: each run is its own world."""
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}, **(extra or {})}


def summary(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def exported(store: str, run_dir: str = "experts/00") -> dict[str, torch.Tensor]:
    Store(store).child(run_dir).verify("export")
    return load_file(os.path.join(store, run_dir, "export", "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def digits_store(root: str, with_jobs: bool = True) -> str:
    """The store of ``fixtures/store_v0.1.tar.gz`` (ddm 0.1: digits in 2 partitions; with its two
    experts, router and ensemble, or with ``with_jobs=False`` only its data and partitions),
    extracted under ``root``; made without scikit-learn on the machine that runs the test."""
    import shutil
    import tarfile

    with tarfile.open(os.path.join(FIXTURES, "store_v0.1.tar.gz")) as tar:
        tar.extractall(root, filter="data")
    store = os.path.join(root, "store")
    if not with_jobs:
        for name in ("experts", "router", "ensemble.json"):
            path = os.path.join(store, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return store


_HANDED_OUT: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n free ports never handed out before in this process: every socket stays bound until all are
    chosen (ports picked one at a time can repeat, and Ray refuses two components on one port)."""
    socks = []
    try:
        while len(socks) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    if _HANDED_OUT & set(ports):
        return free_ports(n)
    _HANDED_OUT.update(ports)
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def diffusers_dit(folder, norm_eps: float = 1e-5, out_channels: int = 2, same_embeddings: bool = True,
                  in_channels: int = 1, heads: int = 2, **save):  # fmt: skip
    """A diffusers DiTTransformer2DModel of DiT-Tiny/2's size (hidden 64) on in_channels x 8 x 8
    inputs and 10 classes, random weights (the zero-initialised ones too), saved with
    save_pretrained(``folder``, ``**save``); every block's timestep and class embedding a copy of
    block 0's, as in diffusers' converted DiT checkpoints. Returns the model, in eval mode."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=64 // heads, num_layers=2, patch_size=2, in_channels=in_channels,
        out_channels=out_channels, sample_size=8, num_embeds_ada_norm=10, norm_eps=norm_eps,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if same_embeddings:
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    model.save_pretrained(str(folder), **save)
    return model.eval()


def partitioned_digits(root) -> str:
    """Digits ingested into a local store at ``root`` and split into 2 partitions (a tiny, real
    dataset for training jobs)."""
    from ddm.data.ingest import IngestConfig, ingest  # here: this module stays light (its docstring)
    from ddm.data.partition import PartitionConfig, partition
    from ddm.store import Store

    store = Store(str(root))
    ingest(IngestConfig(shard_size=1000), store)
    partition(PartitionConfig(num_partitions=2, num_fine=64), store)
    return root
