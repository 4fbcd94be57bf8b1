"""What a job checks of itself before it writes: that its losses and weights are finite, that
every rank shares one attempt id and lease, and that its text encoder is the one its sources
recorded. Each check raises before anything is committed or exported."""

from __future__ import annotations

import uuid

import torch
import torch.distributed as dist

from ddm.ensemble.assemble import encoder_records, export_record, read_ensemble
from ddm.models.pretrained import source_kind
from ddm.models.pretrained_io import split
from ddm.models.text_encoder import check_encoder
from ddm.store import Store, layout
from ddm.store.lease import Token
from ddm.train.job import JobConfig


def check_encoders(cfg: JobConfig, store: Store, text_encoder, export_extra: dict) -> None:
    """The text encoder this job trains with (``text_encoder``: loaded, or ``"store"`` for the
    dataset's stored embeddings, whose encoder ``export_extra`` names) is the one recorded by the
    export it starts from (``init_from``) and by every export of the ensemble it distills."""
    if text_encoder is None:
        return
    mine = export_extra["text_encoder"] if text_encoder == "store" else text_encoder
    if cfg.init_from and source_kind(cfg.init_from, store) == "ddm":
        parent, run_dir = split(cfg.init_from)
        check_encoder(export_record(Store(parent) if parent else store, run_dir), mine, f"init_from={cfg.init_from}")
    if cfg.job == "distill":
        for where, record in encoder_records(store, read_ensemble(store)):
            check_encoder(record, mine, where)


class Diverged(ValueError):
    """The loss or the weights stopped being finite: the job stops before committing them."""


def stop_if_diverged(first_bad: torch.Tensor, tensors: list[torch.Tensor], step: int, cfg: JobConfig, ckpt) -> None:
    """Raise ``Diverged``, on every rank alike, when a loss since the start (``first_bad``: its step)
    or one of ``tensors`` (weights, EMA) is not finite; one host sync and one small collective."""
    bad_weights = torch.zeros((), dtype=torch.bool, device=first_bad.device)
    for t in tensors:
        bad_weights |= ~torch.isfinite(t).all()
    flags = torch.stack([first_bad.double(), bad_weights.double()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_step, bad_weights = (int(v) for v in flags.tolist())
    if not bad_step and not bad_weights:
        return
    what = f"the loss was not finite at step {bad_step}" if bad_step else f"the weights are not finite at step {step}"
    ckpt.wait()  # the upload in flight holds a good checkpoint (checked before it was taken): let it commit
    commits = ckpt.committed_steps()
    kept = (
        f"the last good commit, {ckpt.store.url}/{layout.step_dir(commits[-1])}, and those before it are kept"
        if commits
        else "no checkpoint was committed"
    )
    raise Diverged(
        f"{cfg.run_dir} diverged ({what}, lr={cfg.lr}); it stopped before committing or exporting anything "
        f"non-finite: {kept}. Lower lr (or check the data) and train the job again"
    )


def from_rank0(lease: Token | None, share_lease: bool) -> tuple[Token | None, str]:
    """A new attempt id, and with ``share_lease`` the lease token, as rank 0 has them, on every rank
    (one small broadcast at the start; alone, no collective)."""
    mine = [lease, uuid.uuid4().hex]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(mine, src=0)
    token, attempt = mine
    return (token if share_lease else lease), attempt
