"""The next micro-batches, read while the current step runs.

A background thread takes batches from the reader (shards read from the store, decoded, pinned on
a GPU) and, on a GPU, copies them to the device on a stream of its own, ``depth`` batches ahead;
the step takes the next one ready, and waits only when the reader is slower than the step
(``wait_s``: the loop's total wait, reported in the job's summary). The reader's position that a
checkpoint saves is the one after the last batch the step took (``state_dict``), not after the
batches read ahead, so a resumed run continues exactly.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from ddm.models.text_encoder import TextEmbedding


def to_device(batch: dict, device: torch.device, num_classes: int, text_encoder=None) -> dict:
    """A reader's micro-batch on the job's device (labels only for a class-conditional model), its
    labels range-checked on the host first (for free there: on a GPU the model's own check would
    make the step wait), and its partitions also kept on the host (distillation's teacher routes
    by them without reading the device). A text-conditioned job passes its frozen ``text_encoder``
    (on the device), or "store" for embeddings computed at ingest: ``y`` is then the captions'
    embeddings (``TextEmbedding``)."""
    if text_encoder is not None:
        if text_encoder == "store":  # computed at ingest
            y = TextEmbedding(
                *(batch[k].to(device, non_blocking=True) for k in ("text_tokens", "text_mask", "text_pooled"))
            )
        elif "caption" not in batch:
            raise ValueError("a text-conditioned job needs captions: ingest the dataset with caption=...")
        else:
            y = text_encoder.encode(batch["caption"])
        return {
            "x": batch["x"].to(device, non_blocking=True),
            "y": y,
            "partition": batch["partition"].to(device, non_blocking=True),
            "partition_host": batch["partition"],
        }
    y = batch["y"]
    if num_classes and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"the data's class labels lie in [{int(y.min())}, {int(y.max())}] but the model has "
            f"num_classes={num_classes}: set model.num_classes to the dataset's"
        )
    return {
        "x": batch["x"].to(device, non_blocking=True),
        "y": y.to(device, non_blocking=True) if num_classes else None,
        "partition": batch["partition"].to(device, non_blocking=True),
        "partition_host": batch["partition"],
    }


def tensors(batch: dict):
    """Every tensor of a micro-batch (a caption embedding's fields too)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif value is not None and hasattr(value, "__dataclass_fields__"):  # unset fields (drop) are None
            fields = (getattr(value, f) for f in value.__dataclass_fields__)
            yield from (t for t in fields if isinstance(t, torch.Tensor))


class Prefetcher:
    def __init__(self, reader, device: torch.device, num_classes: int, depth: int = 2, text_encoder=None):
        self.reader, self.device, self.num_classes, self.text_encoder = reader, device, num_classes, text_encoder
        self.wait_s = 0.0
        self._state = reader.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="ddm-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)  # a new thread starts on cuda:0
            while not self._stop.is_set():
                batch = self.reader.next_batch()
                state = self.reader.state_dict()
                ready = None
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        batch = to_device(batch, self.device, self.num_classes, self.text_encoder)
                        ready = torch.cuda.Event()
                        ready.record(self._stream)
                else:
                    batch = to_device(batch, self.device, self.num_classes, self.text_encoder)
                self._put((batch, state, ready))
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by next()
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> dict:
        """The next micro-batch on the job's device."""
        t = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t
        if isinstance(item, BaseException):
            raise item
        batch, self._state, ready = item
        if ready is not None:  # the copy ran on the prefetch stream: the step's stream waits for it
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in tensors(batch):
                if t.device.type == "cuda":
                    t.record_stream(stream)
        return batch

    def state_dict(self) -> dict:
        """The reader's position after the last batch ``next`` returned."""
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a put waiting for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
