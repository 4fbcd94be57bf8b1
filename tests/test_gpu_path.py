"""One device per rank, chosen once and told to DeepSpeed (``ddm.distributed.parallel.rank_device``), and the
GPU settings that cannot work refused before a job starts. CUDA itself is not needed: the choice is
made from the launcher's environment and Ray's assignment, which these tests give."""

from __future__ import annotations

import os

import pytest
import torch

from ddm.distributed.parallel import cuda_index, rank_device, use_accelerator
from ddm.train.job import RayConfig

# What Ray Train shows every worker on a 12-GPU node: the job's GPUs, ordered as strings.
TWELVE = {"CUDA_VISIBLE_DEVICES": "0,1,10,11,2,3,4,5,6,7,8,9"}


def test_a_ray_worker_uses_the_gpu_ray_assigned_not_its_local_rank():
    # Ray gave this worker GPU 2 (local rank 2): it is the 5th visible device, cuda:4, not cuda:2.
    assert cuda_index({**TWELVE, "LOCAL_RANK": "2"}, [2], 12) == 4
    assert cuda_index({**TWELVE, "LOCAL_RANK": "11"}, ["11"], 12) == 3
    assert cuda_index({"CUDA_VISIBLE_DEVICES": "3,5"}, [5], 2) == 1
    assert cuda_index({}, [1], 2) == 1  # every device visible: the id is the index
    # Two GPUs given to one worker: one of them, the same for DeepSpeed and the batches.
    assert cuda_index(TWELVE, ["10", "3"], 12) == 2
    with pytest.raises(ValueError, match="Ray assigned GPU 7 but CUDA_VISIBLE_DEVICES=0,1"):
        cuda_index({"CUDA_VISIBLE_DEVICES": "0,1"}, [7], 2)


def test_without_ray_the_launchers_local_rank_or_a_clear_error():
    assert cuda_index({"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}, None, 8) == 1
    assert cuda_index({"RANK": "9", "SLURM_LOCALID": "1", "WORLD_SIZE": "16"}, None, 8) == 1
    assert cuda_index({"RANK": "3", "WORLD_SIZE": "4"}, None, 8) == 3  # one node: the rank is the local rank
    assert cuda_index({}, None, 1) == 0
    # Rank 9 of 16 on 8-GPU nodes without LOCAL_RANK: no guess (cuda:9 does not exist; 9 % 8 may be taken).
    with pytest.raises(ValueError, match="set LOCAL_RANK"):
        cuda_index({"RANK": "9", "WORLD_SIZE": "16"}, None, 8)
    with pytest.raises(ValueError, match="cuda:3 but the process sees 2 CUDA devices"):
        cuda_index({"LOCAL_RANK": "3"}, None, 2)


def test_the_chosen_gpu_is_what_deepspeed_reads(monkeypatch):
    set_to = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    for k, v in {**TWELVE, "LOCAL_RANK": "2"}.items():
        monkeypatch.setenv(k, v)
    device = rank_device(True, [2])
    assert device == torch.device("cuda", 4) and set_to == [4]
    assert os.environ["LOCAL_RANK"] == "4"  # DeepSpeed's set_device(LOCAL_RANK) and ZeRO-3 gathers: cuda:4 too
    assert rank_device(False) == torch.device("cpu")


def test_gpu_shares_that_cannot_work_are_refused():
    RayConfig(use_gpu=True, gpus_per_worker=0.5, num_workers=1)  # one worker sharing a GPU with other jobs
    RayConfig(use_gpu=True, gpus_per_worker=1, num_workers=8)
    with pytest.raises(ValueError, match="NCCL refuses.*gpus_per_worker=1"):
        RayConfig(use_gpu=True, gpus_per_worker=0.5, num_workers=2)
    with pytest.raises(ValueError, match="uses one GPU; for more GPUs raise num_workers"):
        RayConfig(use_gpu=True, gpus_per_worker=2, num_workers=2)


def test_deepspeeds_accelerator_follows_the_jobs_device(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # as the GPU image once set for every process
    use_accelerator(torch.device("cpu"))
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    from ddm.distributed.parallel import load_deepspeed

    assert load_deepspeed().accelerator.get_accelerator()._name == "cpu"
    with pytest.raises(ValueError, match="accelerator in this process is 'cpu' but the job runs on cuda:0"):
        use_accelerator(torch.device("cuda", 0))  # DeepSpeed chose once: a GPU job needs a process of its own


def test_moe_models_compile_only_when_asked():
    from ddm.models.config import ModelConfig, MoEConfig
    from ddm.train.engine import uses_compile
    from ddm.train.job import EngineConfig, JobConfig

    dense = JobConfig(store="/s")
    moe = JobConfig(store="/s", model=ModelConfig(moe=MoEConfig(num_experts=4)))
    assert uses_compile(dense, on_gpu=True) and not uses_compile(dense, on_gpu=False)
    assert not uses_compile(moe, on_gpu=True)  # DeepSpeed's gating and aux_loss: never compiled by any test
    assert uses_compile(JobConfig(store="/s", model=moe.model, engine=EngineConfig(compile=True)), on_gpu=True)


def test_moe_under_zero3_is_refused_before_the_job_starts():
    from ddm.models.config import ModelConfig, MoEConfig
    from ddm.train.job import EngineConfig, JobConfig

    with pytest.raises(ValueError, match="use engine.zero_stage=1 or 2"):
        JobConfig(store="/s", model=ModelConfig(moe=MoEConfig(num_experts=4)), engine=EngineConfig(zero_stage=3))


def test_rank0_uploads_run_in_the_background_newest_first_and_flush():
    import threading

    from ddm.store.lease import LeaseLost
    from ddm.train.uploads import Uploads

    started, release, done = threading.Event(), threading.Event(), []

    def slow(tag):
        def upload():
            started.set()
            release.wait(10)
            done.append(tag)

        return upload

    uploads = Uploads()
    uploads.submit("progress.json", slow("step 2"))  # the store is slow: the step goes on at once
    assert started.wait(10)
    for step in (4, 6, 8):  # while it uploads, newer windows replace each other: one waits, not three
        uploads.submit("progress.json", slow(f"step {step}"))
    assert done == []
    release.set()
    uploads.flush()  # at a checkpoint: every view as new as the last window
    assert done == ["step 2", "step 8"]

    def lost():
        raise LeaseLost("another writer holds the job folder")

    uploads.submit("progress.json", lost)
    with pytest.raises(LeaseLost, match="another writer"):  # raised in the training thread, not lost
        uploads.flush()
    uploads.submit("events", lambda: 1 / 0)  # any other failure only warns: the next window retries
    uploads.close()

    # A failed job cancels: what is pending is never written (the lease may be gone).
    started.clear()
    release.clear()
    uploads, done[:] = Uploads(), []
    uploads.submit("progress.json", slow("running"))
    assert started.wait(10)
    uploads.submit("progress.json", slow("pending"))
    threading.Timer(0.2, release.set).start()  # the running upload ends after cancel() dropped the pending one
    uploads.cancel()
    assert done == ["running"]


def test_a_shared_time_is_known_by_its_layout_not_its_values():
    """Samplers pass one time for the batch as an expanded tensor: embedded once, with no read of
    the values (a host sync on a GPU). Equal times in an ordinary tensor (training) are not read."""
    from ddm.models.layers import TimestepEmbedder

    emb = TimestepEmbedder(16)
    shared = torch.full((1,), 0.3).expand(8)
    assert emb(shared).shape == (1, 16)
    assert emb(torch.full((8,), 0.3)).shape == (8, 16)  # today's value check would have made this (1, 16)
    torch.testing.assert_close(emb(shared).expand(8, 16), emb(torch.full((8,), 0.3)))


class ListReader:
    """A reader over batches in memory, with the position PartitionReader's checkpoints hold."""

    def __init__(self, labels):
        self.labels, self.batch_index = labels, 0

    def next_batch(self):
        y = torch.tensor(self.labels[self.batch_index % len(self.labels)])
        self.batch_index += 1
        return {"x": torch.full((len(y), 2), float(self.batch_index)), "y": y, "partition": y % 2}

    def state_dict(self):
        return {"batch_index": self.batch_index}


def test_prefetched_batches_come_in_order_and_the_position_is_the_steps_not_the_readers():
    from ddm.train.prefetch import Prefetcher

    batches = Prefetcher(ListReader([[0, 1], [2, 3], [4, 5]]), torch.device("cpu"), num_classes=10, depth=2)
    for i in range(1, 4):
        b = batches.next()
        assert float(b["x"][0, 0]) == i and b["partition_host"].device.type == "cpu"
        assert batches.state_dict() == {"batch_index": i}  # the reader itself is up to 2 batches ahead
    batches.close()

    bad = Prefetcher(ListReader([[0, 12]]), torch.device("cpu"), num_classes=10)
    with pytest.raises(ValueError, match=r"labels lie in \[0, 12\] but the model has num_classes=10"):
        bad.next()  # checked on the host, raised in the training thread
    bad.close()
