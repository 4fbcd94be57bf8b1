"""Ensembles in the store: ``assemble`` writes ``ensemble.json``; ``load_ensemble`` reads it back.

``ensemble.json`` names the exports (folder, step, sha256 of the weights) of the router and of
one expert per partition, the data shape, classes, flow and default rule. Loading checks every
weight file against the sha256 recorded at assembly, loads the router at once and each expert on
its first use (a top-1 ensemble that never routes to an expert never downloads it).
"""

from __future__ import annotations

from ddm import layout
from ddm.ensemble import Ensemble, Rule
from ddm.exports import LazyModel, check_weights, default_cache_dir, read_export, weights_sha256
from ddm.store import Store


def assemble(store: Store, rule: str = "top1", replace: bool = False) -> dict:
    """Check that the router and every expert fit together, then write ``ensemble.json``.

    Checked: one committed, checksum-verified export per partition and one for the router, whose
    tensors are those its config builds; every expert was trained on its own partition, on the same
    data shape and classes (its path and prediction may differ: DDPM and flow-matching experts mix);
    the router predicts as many partitions as there are experts.
    An existing, different ensemble.json is kept (renamed with a timestamp) only with ``replace``;
    otherwise it is an error.
    """
    parsed = Rule.parse(rule)
    k = int(store.manifest(layout.PARTITIONS_DIR)["num_partitions"])
    experts = []
    for i in range(k):
        run_dir = layout.expert_dir(i)
        cfg, manifest = read_export(store, run_dir)
        if cfg.get("job", "expert") != "expert" or cfg.get("partition") != i:
            raise ValueError(
                f"{run_dir}/export was not trained as the expert of partition {i} (config says {cfg.get('partition')})"
            )
        check_weights(store, run_dir, cfg)
        experts.append({"dir": run_dir, "step": cfg["step"], "sha256": weights_sha256(manifest), "config": cfg})
    router_cfg, router_manifest = read_export(store, layout.ROUTER_DIR)
    if router_cfg.get("job") != "router":
        raise ValueError(f"{store.url}/{layout.ROUTER_DIR}/export is not a router (job={router_cfg.get('job')!r})")
    if router_cfg["num_partitions"] != k:
        raise ValueError(f"the router predicts {router_cfg['num_partitions']} partitions but there are {k} experts")
    check_weights(store, layout.ROUTER_DIR, router_cfg)
    first = experts[0]["config"]
    for e in experts[1:]:
        for key, what in (("data_shape", "data shape"), ("num_classes", "classes")):
            if e["config"]["model"][key] != first["model"][key]:
                raise ValueError(
                    f"{e['dir']} has {what} {e['config']['model'][key]} but experts/00 has {first['model'][key]}"
                )
    text = _text_of(experts)
    router_text = router_cfg.get("architecture", {}).get("text")  # exports of ddm 0.1 have no architecture
    if router_text and {k: router_text[k] for k in ("encoder", "dim", "length")} != text:
        raise ValueError(
            f"the router reads captions with {router_text['encoder']!r} (dim {router_text['dim']}, length "
            f"{router_text['length']}) but the experts {'with ' + repr(text) if text else 'read none'}; train the "
            "router with the experts' text encoder, or on the images alone"
        )
    if router_cfg["model"]["data_shape"] != first["model"]["data_shape"]:
        raise ValueError(
            f"the router sees data shape {router_cfg['model']['data_shape']} but the experts "
            f"{first['model']['data_shape']}"
        )
    flow = ensemble_flow([e["config"]["flow"] for e in experts])
    description = {
        "kind": "ddm.ensemble",
        "format_version": 1,
        "num_experts": k,
        "rule": str(parsed),
        "data_shape": first["model"]["data_shape"],
        "num_classes": first["model"]["num_classes"],
        "flow": flow,
        **({"text": text} if text else {}),
        # An expert of another path or prediction (DDPM, another flow) names its own: the ensemble
        # converts its output to the ensemble's velocity at every step (ddm.flow.converted).
        "experts": [
            {key: e[key] for key in ("dir", "step", "sha256")}
            | ({"flow": e["config"]["flow"]} if _kind(e["config"]["flow"]) != _kind(flow) else {})
            for e in experts
        ],
        "router": {"dir": layout.ROUTER_DIR, "step": router_cfg["step"], "sha256": weights_sha256(router_manifest)},
    }
    if store.exists(layout.ENSEMBLE_FILE):
        old = store.read_json(layout.ENSEMBLE_FILE)
        if old == description:
            return old
        if not replace:
            raise ValueError(
                f"{store.url}/{layout.ENSEMBLE_FILE} already describes a different ensemble; pass replace=True "
                "(--replace) to keep it as ensemble.<its id>.json and write the new one"
            )
        store.write_json(layout.ensemble_copy(old), old)
    store.write_json(layout.ENSEMBLE_FILE, description)
    return description


def _text_of(experts: list[dict]) -> dict | None:
    """The caption conditioning every expert shares (one encoder, one length), or None when none is
    text-conditioned; experts that disagree are an error (one prompt is encoded once for all)."""
    texts = [e["config"].get("architecture", {}).get("text") for e in experts]
    if not any(texts):
        return None
    keys = ("encoder", "dim", "length")
    ref, ref_dir = next((t, e["dir"]) for e, t in zip(experts, texts) if t)
    for e, t in zip(experts, texts):
        if not t:
            raise ValueError(
                f"{e['dir']} is not text-conditioned but {ref_dir} is; an ensemble's experts are all or none"
            )
        if {k: t[k] for k in keys} != {k: ref[k] for k in keys}:
            raise ValueError(
                f"{e['dir']} reads captions with {t['encoder']!r} (dim {t['dim']}, length {t['length']}) but {ref_dir} "
                f"with {ref['encoder']!r} (dim {ref['dim']}, length {ref['length']}); the experts of one ensemble "
                "share their text encoder"
            )
    return {k: ref[k] for k in keys}


def _kind(flow: dict) -> tuple[str, str]:
    return flow["path"], flow.get("prediction", "velocity")


def ensemble_flow(flows: list[dict]) -> dict:
    """The flow an ensemble samples in: that of its first flow-matching (velocity) expert, or, when
    every expert is a DDPM one, the linear path."""
    for f in flows:
        if f.get("prediction", "velocity") == "velocity":
            return f
    return {**flows[0], "path": "linear", "prediction": "velocity"}


def load_ensemble(store: Store, rule: str | None = None, device="cpu", cache_dir: str | None = "default") -> Ensemble:
    """The ensemble described by ``ensemble.json``: router loaded now, experts on first use.

    Weights of a remote store are kept in a local content-addressed cache (``default_cache_dir``),
    so a second load reads only the small JSON files from the store; ``cache_dir=None`` disables it.
    """
    if not store.exists(layout.ENSEMBLE_FILE):
        raise ValueError(f"{store.url} has no {layout.ENSEMBLE_FILE}: run `ddm assemble {store.url}` first")
    desc = store.read_json(layout.ENSEMBLE_FILE)
    if cache_dir == "default":
        cache_dir = default_cache_dir(store)
    experts = [LazyModel(store, e, device=device, cache_dir=cache_dir, flow=desc["flow"]) for e in desc["experts"]]
    router = LazyModel(store, desc["router"], device=device, cache_dir=cache_dir)
    router.load()
    ens = Ensemble(experts, router, Rule.parse(rule or desc["rule"]), description=desc)
    if router.module.num_partitions != len(experts):
        raise ValueError(
            f"the router predicts {router.module.num_partitions} partitions but the ensemble has {len(experts)} experts"
        )
    return ens
