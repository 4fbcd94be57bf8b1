"""Where a frozen text encoder's files come from (``ddm.models.text_encoder`` loads them): a local
folder, a folder at a store URL (copied down), a committed folder in a store (``store:<folder>``, or
any folder with a ``MANIFEST.json``: only the files its manifest lists, each checked against its
size and sha256 while it is copied down), or the Hugging Face hub (top-level files, safetensors
weights, at the revision named)."""

from __future__ import annotations

import json
import os

from ddm.store import ChecksumError, Store, StoreError
from ddm.store.layout import check_digest, safe_relpath
from ddm.store.manifests import MANIFEST  # a committed folder's file list (not part of the model)


def remote(where: str) -> bool:
    return "://" in where and not where.startswith("file://")


def is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def folder_store(encoder: str, where: str):
    """A ``Store`` rooted at the encoder's folder (a store URL or a local path)."""
    try:
        return Store(where)
    except ValueError as e:
        raise ValueError(f"text encoder {encoder!r}: cannot open {where} ({e})") from e


def committed(encoder: str, where: str) -> bool:
    """Whether the folder at ``where`` holds a manifest (then only what it lists is read, checked)."""
    if not remote(where):
        return os.path.isfile(os.path.join(where.removeprefix("file://"), MANIFEST))
    try:
        return folder_store(encoder, where).exists(MANIFEST)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials (botocore's own errors), a missing s3fs, the network
        raise ValueError(f"text encoder {encoder!r}: cannot read {where} ({type(e).__name__}: {e})") from e


def not_committed(encoder: str, where: str) -> ValueError:
    return ValueError(
        f"text encoder {encoder!r}: {where} has no {MANIFEST}, so its files cannot be checked (it was never "
        'committed, or its writer stopped before the end). Put the encoder there with ddm: python -c "from '
        "ddm.models.text_files import commit_folder; commit_folder('LOCAL_FOLDER', 'STORE_URL', 'FOLDER')\""
    )


def manifest_files(encoder: str, where: str, raw: bytes) -> dict[str, dict]:
    """The file list of the encoder folder's manifest ``raw``: every name a plain relative one,
    every entry a size and a sha256 (``ddm.store.layout``'s checks), hidden files left out."""
    path = f"{where}/{MANIFEST}"
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ChecksumError(f"text encoder {encoder!r}: {path} is not a valid manifest ({e})") from None
    if not isinstance(files, dict):
        raise ChecksumError(f"text encoder {encoder!r}: {path} is not a valid manifest (no file list)")
    for name, entry in files.items():
        safe_relpath(name, path)
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise ChecksumError(f"text encoder {encoder!r}: {path} lists {name!r} without its size")
        check_digest(entry.get("sha256"), f"{path}: the sha256 of {name!r}")
    if "config.json" not in files:
        raise ValueError(f"text encoder {encoder!r}: {path} lists no config.json (a save_pretrained model)")
    return {n: e for n, e in files.items() if not os.path.basename(n).startswith(".")}


def copy_verified(encoder: str, where: str, local: str) -> None:
    """The files that the manifest of the folder at ``where`` lists (and the manifest itself, as
    ``describe`` has always counted it) into ``local``, each checked against its size and sha256
    while it is copied; a file that differs is a ``ChecksumError`` naming it (nothing is loaded)."""
    store = folder_store(encoder, where)
    try:
        raw = store.read_bytes(MANIFEST)
        files = manifest_files(encoder, where, raw)
        manifest = {"files": files}
        for name in sorted(files):
            target = os.path.join(local, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                store.get_verified("", name, target, manifest)
            except ChecksumError as e:
                msg = str(e).replace(f"{store.url}//", f"{store.url}/")
                raise ChecksumError(
                    f"text encoder {encoder!r}: {where}/{name} does not match its {MANIFEST} ({msg}); refusing to "
                    "load it. Someone or something changed the file after it was committed: put the encoder there "
                    "again"
                ) from None
    except (ValueError, StoreError):
        raise
    except Exception as e:  # noqa: BLE001 - credentials (botocore's own errors), a missing s3fs, the network
        raise ValueError(f"text encoder {encoder!r}: cannot read {where} ({type(e).__name__}: {e})") from e
    with open(os.path.join(local, MANIFEST), "wb") as f:
        f.write(raw)


def verified_config(encoder: str, where: str) -> dict:
    """The committed folder's config.json, checked against its manifest."""
    store = folder_store(encoder, where)
    manifest_files(encoder, where, store.read_bytes(MANIFEST))  # its names and entries are sound
    try:
        return json.loads(store.read_verified("", "config.json"))
    except ChecksumError as e:
        msg = str(e).replace(f"{store.url}//", f"{store.url}/")
        raise ChecksumError(
            f"text encoder {encoder!r}: {where}/config.json does not match its {MANIFEST} ({msg})"
        ) from None


def commit_folder(local: str, store: str, folder: str) -> dict:
    """Put the encoder saved in the local folder ``local`` (its top-level files) into ``folder`` of
    the store at URL ``store``, committed by a manifest: then ``store:<folder>`` names it, and every
    load checks each file against the manifest. Returns the manifest."""
    folder = safe_relpath(folder.strip("/"), "the encoder's folder in the store")
    names = [n for n in sorted(os.listdir(local)) if not n.startswith(".") and os.path.isfile(os.path.join(local, n))]
    if "config.json" not in names:
        raise ValueError(f"{local} has no config.json: save the encoder with save_pretrained first")
    target = Store(store)
    known = {n: target.put_file(os.path.join(local, n), f"{folder}/{n}") for n in names if n != MANIFEST}
    return target.commit(folder, list(known), known=known)


def remote_config(encoder: str, where: str) -> dict:
    try:
        return Store(where).read_json("config.json")
    except FileNotFoundError as e:
        raise ValueError(f"text encoder {encoder!r}: {where} has no config.json") from e
    except Exception as e:  # noqa: BLE001 - credentials (botocore's own errors), a missing s3fs, a bad file
        raise ValueError(f"text encoder {encoder!r}: cannot read {where}/config.json ({type(e).__name__}: {e})") from e


def copy_down(where: str, local: str) -> None:
    """The files of the folder at the store URL ``where`` (not its sub-folders) into ``local``,
    through ``Store`` (its endpoint settings, timeouts and retries)."""
    store = Store(where)
    folder = store.path("").rstrip("/")
    try:  # its files (not sub-folders, not an S3 console's zero-byte folder marker), streamed to disk
        entries = store.fs.ls(folder, detail=True, refresh=True)
        names = [
            os.path.basename(e["name"].rstrip("/")) for e in entries
            if e.get("type") == "file" and not e["name"].endswith("/") and e["name"].rstrip("/") != folder
        ]  # fmt: skip
        names = [n for n in names if not n.startswith(".")]
        if "config.json" in names:
            for name in names:
                store.get_file(name, os.path.join(local, name))
    except Exception as e:  # noqa: BLE001 - credentials (botocore's own errors), a missing s3fs, the network
        raise ValueError(f"text encoder {where!r}: cannot read it ({type(e).__name__}: {e})") from e
    if "config.json" not in names:
        raise ValueError(f"text encoder {where!r} is not a folder with a config.json (a save_pretrained model)")


def local_folder(where: str) -> str:
    path = where.removeprefix("file://")
    if not os.path.isdir(path):
        raise ValueError(f"text encoder {where!r} is not a folder (a save_pretrained text model and its tokenizer)")
    return path


def hub_error(spec: str, repo: str, revision: str | None, e: Exception) -> ValueError:
    rev = f" --revision {revision}" if revision else ""
    return ValueError(
        f"text encoder {spec!r}: could not fetch {repo} from the Hugging Face hub ({type(e).__name__}). Offline, "
        f"download it where there is a network (huggingface-cli download {repo}{rev} --local-dir DIR), copy DIR "
        "here and name the folder instead of the hub id"
    )


def hub_folder(spec: str, repo: str, revision: str | None) -> str:
    """The repo's top-level files (its config first: a diffusers pipeline, whose encoder lives in a
    sub-folder, is refused before any weights are fetched)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ValueError(f"text encoder {spec!r} comes from the hub: pip install 'ddm[encoders]'") from e
    hub_config(spec, repo, revision)
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "vocab*", "merges.txt", "spiece.model"]  # fmt: skip
    try:  # top level only: "*.safetensors" would match a sub-folder's weights too
        return snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=["*/*"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: one message with the way out
        raise hub_error(spec, repo, revision, e) from e


def hub_config(spec: str, repo: str, revision: str | None) -> str:
    """The path of the repo's config.json, fetched alone; a pipeline (model_index.json, no config.json)
    is an error that says which folder to name."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, "config.json", revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: one message with the way out
        try:
            hf_hub_download(repo, "model_index.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a pipeline either: the first error says why
            raise hub_error(spec, repo, revision, e) from e
        raise ValueError(
            f"text encoder {spec!r} is a diffusers pipeline: download its text encoder and tokenizer folders "
            f"(huggingface-cli download {repo} --include 'text_encoder/*' 'tokenizer/*' --local-dir DIR), copy the "
            "tokenizer's files into DIR/text_encoder and name that folder"
        ) from e
