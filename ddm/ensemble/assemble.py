"""Ensembles in the store: ``assemble`` writes ``ensemble.json``; ``load_ensemble`` reads it back.

``ensemble.json`` names the exports (folder, step, sha256 of the weights) of the router and of
one expert per partition, the data shape, classes, flow and default rule, and the ddm that wrote
it. Loading checks every weight file against the sha256 recorded at assembly, loads the router at
once and each expert on its first use (a top-1 ensemble that never routes to an expert never
downloads it).

``read_ensemble`` is the one reader of ensemble.json: a file that is not a description (truncated,
overwritten) or that a newer ddm wrote is one error naming it, and every field that becomes a path,
a URL or a cache key (export folders, sha256 digests, a ``store:`` encoder's folder) is checked by
``ddm.store.layout`` before anything uses it.
"""

from __future__ import annotations

import hashlib
import json

from ddm import __version__
from ddm.ensemble.combine import Ensemble, Rule
from ddm.models.exports import LazyModel, check_weights, default_cache_dir, read_export, weights_sha256
from ddm.models.text_config import IN_STORE
from ddm.models.text_encoder import load_checked
from ddm.store import Store, layout

ENSEMBLE_FORMAT = 1  # ensemble.json's format_version that this ddm writes and reads (and every older one)
WRITER = "ddm_version"  # the field naming the ddm that wrote it (not part of what the ensemble is)


class EnsembleFileError(ValueError):
    """The ensemble file is not a description this ddm can use: truncated, overwritten, or newer."""


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
    _same_encoder(experts, router_cfg)
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
        "format_version": ENSEMBLE_FORMAT,
        WRITER: __version__,
        "num_experts": k,
        "rule": str(parsed),
        "data_shape": first["model"]["data_shape"],
        "num_classes": first["model"]["num_classes"],
        "flow": flow,
        **({"text": text} if text else {}),
        # An expert of another path or prediction (DDPM, another flow) names its own: the ensemble
        # converts its output to the ensemble's velocity at every step (ddm.models.flow.converted).
        "experts": [
            {key: e[key] for key in ("dir", "step", "sha256")}
            | ({"flow": e["config"]["flow"]} if _kind(e["config"]["flow"]) != _kind(flow) else {})
            for e in experts
        ],
        "router": {"dir": layout.ROUTER_DIR, "step": router_cfg["step"], "sha256": weights_sha256(router_manifest)},
    }
    if store.exists(layout.ENSEMBLE_FILE):
        try:
            old = read_ensemble(store)
        except ValueError as e:  # unreadable, unsafe or newer: never compared; replaced only if asked to
            if not replace:
                raise EnsembleFileError(f"{e}. Pass replace=True (--replace) to write the new one over it") from None
            raw = store.read_bytes(layout.ENSEMBLE_FILE)  # its bytes kept as they are, named by their digest
            store.write_bytes(layout.ensemble_copy({"replaced_bytes": hashlib.sha256(raw).hexdigest()}), raw)
            old = None
        if old is not None and _without_writer(old) == _without_writer(description):
            return old  # the same ensemble, whichever ddm wrote it: its id (and what is filed under it) stays
        if old is not None and not replace:
            raise ValueError(
                f"{store.url}/{layout.ENSEMBLE_FILE} already describes a different ensemble; pass replace=True "
                "(--replace) to keep it as ensemble.<its id>.json and write the new one"
            )
        if old is not None:
            store.write_json(layout.ensemble_copy(old), old)
    store.write_json(layout.ENSEMBLE_FILE, description)
    return description


def _without_writer(description: dict) -> dict:
    return {k: v for k, v in description.items() if k != WRITER}


def _same_encoder(experts: list[dict], router_cfg: dict) -> None:
    """Every export that recorded its text encoder (``TextEncoder.describe``) recorded the same one:
    the same name with other files (or another hub commit) would embed one prompt two ways."""
    recorded = [(e["dir"], e["config"].get("text_encoder")) for e in experts]
    recorded.append((layout.ROUTER_DIR, router_cfg.get("text_encoder")))
    recorded = [(d, r) for d, r in recorded if isinstance(r, dict)]
    keys = ("kind", "hidden_size", "max_length", "sha256", "revision")

    def same(r: dict) -> dict:
        files = r.get("sha256")
        files = {n: v for n, v in files.items() if n != "MANIFEST.json"} if isinstance(files, dict) else files
        return {k: (files if k == "sha256" else r.get(k)) for k in keys if k != "revision" or not files}

    for d, r in recorded[1:]:
        if same(r) != same(recorded[0][1]):
            raise ValueError(
                f"{d} and {recorded[0][0]} recorded different text encoders ({r.get('spec')!r} and "
                f"{recorded[0][1].get('spec')!r}: other files or another revision); train them with one encoder"
            )


def _fail(where: str, what: str) -> EnsembleFileError:
    return EnsembleFileError(
        f"{where} {what}; it was not written by ddm or was damaged: run `ddm assemble <store> --replace` to write "
        "it again"
    )


def _entry(entry, where: str, field: str) -> dict:
    """An export entry of ensemble.json ({dir, step, sha256[, flow]}) with its names checked."""
    if not isinstance(entry, dict):
        raise _fail(where, f"has {field} = {entry!r:.60} where an export entry belongs")
    layout.safe_relpath(entry.get("dir"), f"{where}: {field}.dir")
    layout.check_digest(entry.get("sha256"), f"{where}: {field}.sha256")
    step = entry.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _fail(where, f"has {field}.step = {step!r:.40}, not a step")
    if "flow" in entry and not isinstance(entry["flow"], dict):
        raise _fail(where, f"has {field}.flow = {entry['flow']!r:.40}, not a flow's settings")
    return entry


def check_description(desc, where: str) -> dict:
    """``desc`` (a parsed ensemble.json, from ``where``) if this ddm can use it: written by this or
    an older ddm, its exports' folders inside the store, its digests digests, its sizes numbers;
    else ``EnsembleFileError`` (or ``ddm.store.layout.UnsafeName``) naming ``where`` and the field."""
    if not isinstance(desc, dict) or desc.get("kind", "ddm.ensemble") != "ddm.ensemble":
        raise _fail(where, "is not an ensemble description (no kind ddm.ensemble)")
    version = desc.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(where, f"has format_version {version!r:.40}")
    if version > ENSEMBLE_FORMAT:
        by = desc.get(WRITER)
        by = by if isinstance(by, str) and len(by) < 40 else f"newer than {__version__} (format {version})"
        raise EnsembleFileError(
            f"{where} was written by ddm {by}; this is ddm {__version__}, which reads ensemble format "
            f"{ENSEMBLE_FORMAT}: upgrade ddm to use it (or assemble it again with this one: ddm assemble --replace)"
        )
    experts = desc.get("experts")
    if not isinstance(experts, list) or not experts:
        raise _fail(where, "names no experts")
    for i, entry in enumerate(experts):
        _entry(entry, where, f"experts[{i}]")
    _entry(desc.get("router"), where, "router")
    if desc.get("num_experts") != len(experts):
        raise _fail(where, f"says num_experts={desc.get('num_experts')!r:.20} but names {len(experts)} experts")
    shape, classes = desc.get("data_shape"), desc.get("num_classes")
    if not isinstance(shape, list) or not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        raise _fail(where, f"has data_shape {shape!r:.40}")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
        raise _fail(where, f"has num_classes {classes!r:.40}")
    if not isinstance(desc.get("flow"), dict) or not isinstance(desc.get("rule"), str):
        raise _fail(where, "has no flow settings or no rule")
    text = desc.get("text")
    if text is not None:
        if (
            not isinstance(text, dict)
            or not isinstance(text.get("encoder"), str)
            or not all(isinstance(text.get(k), int) and text[k] > 0 for k in ("dim", "length"))
        ):
            raise _fail(where, f"has text = {text!r:.80}, not a text encoder's name and sizes")
        if text["encoder"].startswith(IN_STORE):
            layout.safe_relpath(text["encoder"][len(IN_STORE) :], f"{where}: text.encoder")
    return desc


def read_ensemble(store: Store) -> dict:
    """The store's ensemble.json, parsed and checked (``check_description``); a missing file says
    how to make it, an unreadable one is one ``EnsembleFileError`` naming it."""
    where = f"{store.url}/{layout.ENSEMBLE_FILE}"
    if not store.exists(layout.ENSEMBLE_FILE):
        raise ValueError(f"{store.url} has no {layout.ENSEMBLE_FILE}: run `ddm assemble {store.url}` first")
    raw = store.read_bytes(layout.ENSEMBLE_FILE)
    try:
        desc = json.loads(raw)
    except ValueError as e:  # json's decode errors (also bytes that are not UTF-8)
        raise EnsembleFileError(
            f"{where} is not a valid ensemble description ({e}): it was truncated or overwritten; run `ddm "
            f"assemble {store.url} --replace` to write it again"
        ) from None
    return check_description(desc, where)


def encoder_records(store: Store, desc: dict) -> list[tuple[str, dict]]:
    """(where, record) of the text encoder that each export of the ensemble ``desc`` recorded
    (its config.json's ``text_encoder``), for ``ddm.models.text_encoder.load_checked``; exports
    that recorded none (an image-only router, ddm 0.1's) are left out."""
    out = []
    for entry in [*desc["experts"], desc["router"]]:
        record = export_record(store, entry["dir"])
        if record is not None:
            out.append((f"{store.url}/{entry['dir']}/{layout.EXPORT}", record))
    return out


def export_record(store: Store, run_dir: str) -> dict | None:
    """The text encoder record of the committed export in ``run_dir`` (checked against its
    manifest), or None when it recorded none."""
    run = store.child(layout.safe_relpath(run_dir, f"the export folder of {store.url}"))
    where = f"{store.url}/{run_dir}/{layout.EXPORT}/{layout.EXPORT_CONFIG}"
    raw = run.read_verified(layout.EXPORT, layout.EXPORT_CONFIG)
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); train the job again to rewrite its export") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not an export's config")
    return config.get("text_encoder") or None


def ensemble_encoder(store: Store, desc: dict, device="cpu"):
    """The text encoder of the text ensemble ``desc`` in ``store``, checked against what each of its
    exports recorded (``ddm.models.text_encoder.load_checked``)."""
    return load_checked(desc["text"], encoder_records(store, desc), device, store.url)


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
    desc = read_ensemble(store)
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
