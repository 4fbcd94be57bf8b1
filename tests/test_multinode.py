"""One expert across two Ray nodes on this machine (ray.cluster_utils.Cluster): lose a node
mid-run, add one back, and the job resumes from the store to the weights of an uninterrupted run."""

import threading
import time

import pytest

from tests.helpers import assert_same_weights, exported, free_port
from tests.test_train import TRAIN, fresh, on_ranks, prepared, ray_train  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # The driver's node runs no workers; its dashboard (the state API below) on a port of its own:
    # Ray's default 8265 may be taken by another test's cluster, and the state API then fails.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": free_port()})
    nodes = [c.add_node(num_cpus=1), c.add_node(num_cpus=1)]  # one training worker per node
    ray.init(address=c.address, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def cfg_for(store):
    from ddm.core.config import load
    from ddm.train.job import JobConfig

    return load(
        JobConfig,
        None,
        [f"store={store}", *TRAIN, "ray.num_workers=2", "ray.max_failures=3", "steps=6", "checkpoint.every=2"],
    )


def test_node_lost_and_replaced_mid_run(prepared, tmp_path, cluster):  # noqa: F811
    import ray

    c, nodes = cluster
    # The uninterrupted run, on 2 ranks as torchrun starts them (one thread each, as these 1-CPU
    # workers have): the same training function and weights, without a second job on the cluster.
    reference = fresh(prepared, tmp_path, "reference")
    on_ranks("ddm.train", reference, 2, "steps=6", "checkpoint.every=2")

    store = fresh(prepared, tmp_path, "faulted")
    marker = tmp_path / "paused"
    env = {"DDM_FAULT": "step:5:0", "DDM_FAULT_ACTION": "pause", "DDM_FAULT_ONCE": str(marker)}
    result = {}
    thread = threading.Thread(target=lambda: result.update(s=ray_train(cfg_for(store), env=env)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert thread.is_alive() and time.monotonic() < deadline, "the run never reached step 5"
        time.sleep(0.1)
    c.remove_node(nodes[1])  # a node of the island goes away with its worker
    (tmp_path / "paused.go").touch()
    time.sleep(3)
    c.add_node(num_cpus=1)  # a replacement joins; Ray Train restarts the worker group on it
    thread.join(timeout=300)
    assert not thread.is_alive() and "s" in result
    placed = {
        a["node_id"] for a in ray.util.state.list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100)
    }
    assert len({n.node_id for n in nodes} & placed) == 2  # the workers really ran on both first nodes
    s = result["s"]
    assert s["startup"]["resumed_from"] == 4 and s["step"] == 6
    assert_same_weights(exported(reference), exported(store))
