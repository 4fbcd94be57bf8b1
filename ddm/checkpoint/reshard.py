"""Training state that does not depend on the worker count: what lets a job resume on M workers
from a checkpoint written by N.

DeepSpeed's own checkpoint files shard the optimizer by rank (ZeRO 1-3 flatten, pad and split the
parameters per data-parallel rank), so they load only into the world size that wrote them. Beside
them every rank writes ``portable/rank{r:03d}.safetensors``: for each parameter (by name; MoE
experts by their global index), the pieces of its fp32 master weights and of Adam's two moments
that this rank owns, each as a flat slice at an offset of the flattened parameter, plus the
optimizer's step in the metadata. Every element of every parameter is owned by exactly one rank
(ZeRO's partitions tile each parameter; without ZeRO, rank 0 writes the dense parameters and the
ranks of the first data-parallel replica write the experts), so the files tile the whole state.

Restoring on any world size (ZeRO 0-3; MoE with the same ``ep_size``): the engine takes one step
with learning rate 0 so that every optimizer state exists in the new layout (weights unchanged),
then each rank assembles every whole parameter from the pieces and hands it to DeepSpeed's
tensor-fragment API (``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``), which keeps
the part this rank owns now; the module's weights are set from the fp32 masters.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ddm.distributed.parallel import ParallelState, load_deepspeed, shift_expert

log = logging.getLogger("ddm.checkpoint.reshard")

PORTABLE_DIR = "portable"
KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # the master weights and AdamW's moments


def portable_name(rank: int) -> str:
    return f"{PORTABLE_DIR}/rank{rank:03d}.safetensors"


def _global_names(module: torch.nn.Module, ps: ParallelState, num_experts: int) -> dict[str, str]:
    """Each parameter's name, with a local MoE expert index replaced by its global one."""
    first = ps.ep_rank * max(num_experts // ps.ep_size, 1)
    return {name: shift_expert(name, first) for name, _ in module.named_parameters()}


def _is_expert(p: torch.nn.Parameter) -> bool:
    from deepspeed.moe.utils import is_moe_param

    return is_moe_param(p)


def _optimizer_step(engine) -> float:
    """Adam's step count (the same for every parameter: all take every step)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    for state in opt.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _torch_state(engine, p: torch.nn.Parameter) -> dict:
    """Without ZeRO the torch optimizer keeps each parameter's state as it is."""
    return engine.optimizer.state[p]


def _link_optimizer_states(engine, zero_stage: int) -> None:
    """ZeRO 1/2 link each parameter's fragment to the optimizer states once, after the first
    step of the first parameter group, before a second group (MoE experts) has any state: link
    every group again (its states exist once the engine has stepped)."""
    if zero_stage not in (1, 2):
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    for i in range(len(zero.optimizer.param_groups)):
        lazy_init_hp_params_optimizer_state(
            zero.bit16_groups[i], zero.single_partition_of_fp32_groups[i], zero.optimizer.state
        )


def _pieces(engine, p: torch.nn.Parameter, zero_stage: int, ps: ParallelState):
    """(start, {key: flat tensor}) pieces of ``p``'s fp32 state that this rank owns."""
    if zero_stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = safe_get_local_fp32_param(p).flatten()  # this rank's partition (the last one padded)
        start = p._z3_optimizer._get_param_partition_rank(p) * local.numel()
        numel = min(local.numel(), p.ds_numel - start)
        if numel <= 0:
            return []
        values = {"fp32": local}
        for key in KEYS[1:]:
            values[key] = safe_get_local_optimizer_state(p, key)
        return [(start, {k: v.flatten()[:numel] for k, v in values.items()})]
    if zero_stage in (1, 2):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return []
        address = mapping.lp_fragment_address
        values = {"fp32": mapping.get_hp_fragment()}
        for key in KEYS[1:]:
            values[key] = mapping.get_hp_fragment(key)
        return [(address.start, {k: v.flatten() for k, v in values.items()})]
    # No ZeRO: every rank holds everything; one rank per distinct parameter writes it.
    writer = ps.rank < ps.ep_size if _is_expert(p) else ps.rank == 0
    if not writer:
        return []
    state = _torch_state(engine, p)
    values = {"fp32": p.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
    return [(0, {k: v.flatten() for k, v in values.items()})]


def save_portable(engine, path: str, zero_stage: int, ps: ParallelState, num_experts: int, ema=None) -> None:
    """Write this rank's pieces of the training state to the local file ``path``; a sharded ``ema``'s
    shards (ZeRO-3) too, as pieces of key ``ema`` at the same offsets."""
    load_deepspeed()
    _link_optimizer_states(engine, zero_stage)
    names = _global_names(engine.module, ps, num_experts)
    tensors, shapes = {}, {}
    for name, p in engine.module.named_parameters():
        g = names[name]
        shapes[g] = list(p.ds_shape if zero_stage == 3 else p.shape)
        for start, values in _pieces(engine, p, zero_stage, ps):
            if ema is not None and name in ema.spans:
                ema_start, n, _ = ema.spans[name]
                assert ema_start == start, f"{name}: the EMA's shard starts at {ema_start}, ZeRO's at {start}"
                values = {**values, "ema": ema.shadow[name][:n]}
            for key, v in values.items():
                tensors[f"{g}|{key}|{start}"] = v.detach().float().cpu().contiguous()
    meta = {"shapes": json.dumps(shapes), "step": repr(_optimizer_step(engine)), "world_size": str(ps.world_size)}
    save_file(tensors, path, metadata=meta)


def check_portable(path: str) -> None:
    """A portable file that can be assembled: its metadata parses (shapes, a finite step) and every
    piece names a parameter it lists, a known key and a span inside the parameter. ValueError
    otherwise, raised while a commit is staged so that the one before is tried."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        try:
            shapes, step = json.loads(meta["shapes"]), float(meta["step"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: no readable shapes and step in its metadata ({e})") from None
        if not isinstance(shapes, dict) or not math.isfinite(step) or step < 0:
            raise ValueError(f"{path}: its metadata holds no shapes or no finite step")
        sizes = {}
        for name, shape in shapes.items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**40 for d in shape):
                raise ValueError(f"{path}: the shape of {name!r} is {shape!r}")
            sizes[name] = math.prod(shape)
        for k in f.keys():
            name, key, start = k.rsplit("|", 2) if k.count("|") >= 2 else (k, "", "x")
            numel = math.prod(f.get_slice(k).get_shape())
            if name not in sizes or key not in (*KEYS, "ema") or not start.isdigit():
                raise ValueError(f"{path}: {k!r} is not a piece of a listed parameter")
            if int(start) + numel > sizes[name]:
                raise ValueError(f"{path}: {k!r} reaches past the end of {name!r}")


def _assemble(paths: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """Whole flat tensors {param: {key: tensor}} from every rank's pieces; checks they tile."""
    shapes: dict[str, list[int]] = {}
    pieces: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    steps = set()
    for path in paths:
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            shapes.update(json.loads(meta["shapes"]))
            steps.add(float(meta["step"]))
            for k in f.keys():
                g, key, start = k.rsplit("|", 2)
                pieces[(g, key)].append((int(start), f.get_tensor(k)))
    if len(steps) != 1:
        raise ValueError(f"the ranks' optimizer steps differ ({sorted(steps)}): the checkpoint is inconsistent")
    out: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for g, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        for key in (*KEYS, "ema") if (g, "ema") in pieces else KEYS:
            flat, covered = torch.zeros(numel), 0
            for start, t in sorted(pieces.get((g, key), []), key=lambda x: x[0]):
                if start != covered:
                    raise ValueError(f"{g} {key}: pieces leave a gap or overlap at element {covered} (next at {start})")
                flat[start : start + t.numel()] = t
                covered = start + t.numel()
            if covered != numel:
                raise ValueError(f"{g} {key}: the pieces cover {covered} of {numel} elements")
            out[g][key] = flat.reshape(shape)
    return out, steps.pop()


@torch.no_grad()
def load_portable(engine, paths: list[str], zero_stage: int, ps: ParallelState, num_experts: int, ema=None) -> float:
    """Set weights, fp32 masters, moments and step from the portable pieces in ``paths`` (local
    files of every rank that wrote the checkpoint), and a sharded ``ema``'s shards where the
    pieces hold them. The engine must have taken one step (any learning rate 0 step) so that its
    optimizer state exists. Returns the optimizer step."""
    deepspeed = load_deepspeed()
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    state, step = _assemble(paths)
    _link_optimizer_states(engine, zero_stage)
    names = _global_names(engine.module, ps, num_experts)
    params = dict(engine.module.named_parameters())
    missing = [n for n, g in names.items() if g not in state]
    if missing:
        raise ValueError(f"the checkpoint has no state for {len(missing)} parameters, e.g. {missing[:3]}")
    device = next(iter(params.values())).device
    if ema is not None and all("ema" in state[g] for g in names.values()):
        for name, g in names.items():
            ema.load_whole(name, state[g]["ema"])
        ema.from_portable = True
    for name, p in params.items():
        whole = {k: v.to(device) for k, v in state[names[name]].items() if k != "ema"}
        if zero_stage in (1, 2, 3):
            safe_set_full_fp32_param(p, whole["fp32"])
            for key in KEYS[1:]:
                safe_set_full_optimizer_state(p, whole[key], key)
            if zero_stage != 3:
                p.data.copy_(whole["fp32"].to(p.dtype))
        else:
            p.data.copy_(whole["fp32"].to(p.dtype))
            st = _torch_state(engine, p)
            for key in KEYS[1:]:
                st[key].copy_(whole[key])
    if zero_stage == 3:  # the module's partitions of the weights, from the whole fp32 masters
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if ps.rank == 0:
                for name, p in params.items():
                    p.data.copy_(state[names[name]]["fp32"].to(p.device, p.dtype))
    _set_step(engine, step)
    return step


def _set_step(engine, step: float) -> None:
    """Adam's step on every parameter, and DeepSpeed's own counters as its checkpoint would have
    restored them (every step is taken)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for st in opt.state.values():
        if "step" in st:
            if torch.is_tensor(st["step"]):
                st["step"].fill_(step)
            else:
                st["step"] = step
    engine.global_steps = int(step)
    engine.global_samples = int(step) * engine.train_batch_size()


@torch.no_grad()
def load_own_portable(engine, path: str, zero_stage: int, ps: ParallelState, num_experts: int) -> float:
    """The same workers and the same split (ZeRO 1/2, ``ep_size``) as the writer: each of this rank's
    pieces goes back into the optimizer state it was taken from (``_pieces`` gives views of them),
    then the module's weights follow the fp32 masters. No rank fetches or assembles another's state:
    host memory and store traffic stay one rank's share. Returns the optimizer step."""
    assert zero_stage in (1, 2), "ZeRO 0 and 3 restore through load_portable"
    load_deepspeed()
    _link_optimizer_states(engine, zero_stage)
    names = _global_names(engine.module, ps, num_experts)
    with safe_open(path, "pt") as f:
        step, stored = float(f.metadata()["step"]), set(f.keys())
        for name, p in engine.module.named_parameters():
            for start, values in _pieces(engine, p, zero_stage, ps):
                for key, dst in values.items():
                    piece = f"{names[name]}|{key}|{start}"
                    if piece not in stored:
                        raise ValueError(f"{path} lacks {piece}: it was not written with this job's split")
                    src = f.get_tensor(piece)
                    if src.numel() != dst.numel():
                        raise ValueError(f"{path}: {piece} has {src.numel()} elements, this rank holds {dst.numel()}")
                    dst.copy_(src.view(dst.shape))
    engine.optimizer.update_lp_params()  # each rank's fp32 partition into the weights, all-gathered
    _set_step(engine, step)
    return step
