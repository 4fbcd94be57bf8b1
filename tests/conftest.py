"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1) and store URLs on three backends."""

import os
import uuid

import pytest
import torch

# Hub models (SD-VAE, DINOv2): the tests run offline and check that the real loaders say so clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: skip the accelerator probe on CPU machines

# Under xdist the test processes share the machine's CPUs: each takes its share of threads, and so
# does what it starts (OMP_NUM_THREADS; `python -m ddm.train` runs get it as `threads`, run_cli).
# Two processes of 2 threads each on 2 cores made CPU-bound tests several times slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
if _WORKERS > 1:
    _share = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

BUCKET = "ddm-test"
SECRET = f"ddm-test-secret-{uuid.uuid4().hex[:12]}"  # moto accepts any key


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server in a thread on 127.0.0.1 (a real HTTP endpoint; s3fs and pyarrow talk to it)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY=SECRET,  # distinctive: tests assert it never shows up where it must not
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["file", "memory", "s3"])
def store_url(request, tmp_path):
    """A fresh, empty store root on each backend."""
    run = uuid.uuid4().hex[:10]
    if request.param == "file":
        return f"file://{tmp_path}/store-{run}"
    if request.param == "memory":
        return f"memory://ddm-tests/{run}"
    request.getfixturevalue("s3_endpoint")
    return f"s3://{BUCKET}/{run}"


# The longest files first (measured: `./scripts/test.sh --durations=0`). Under xdist (`-n`, workers
# take whole files: --dist loadfile) this order decides only ties: xdist hands out files by their
# number of tests, most first, which interleaves the long Ray files with many short tests. Keeping
# this order instead (`--no-loadscope-reorder`) measured slower on 2 cores (628 s and 639 s against
# 600-621 s on 2026-12-06): the Ray-heavy files then run side by side.
LONGEST_FIRST = [
    "test_train.py",
    "test_pipeline.py",
    "test_islands.py",
    "test_data_pipeline.py",
    "test_multinode.py",
    "test_lease.py",
    "test_assemble.py",
    "test_precision.py",
    "test_data.py",
    "test_demo.py",
    "test_metrics.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
