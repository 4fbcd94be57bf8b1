"""Where ``init_from``'s outside weights come from: paths in the job's store or any URL, local
copies to read them from (memory-mapped where they are local), and the Hugging Face hub."""

from __future__ import annotations

import contextlib
import os
import tempfile

from ddm.store import Store
from ddm.store.transfer import file_digest


def split(source: str) -> tuple[str | None, str]:
    """(parent URL, last part) of an absolute path or URL; (None, source) for a path in the store."""
    if "://" in source or source.startswith("/"):
        parent, name = source.rstrip("/").rsplit("/", 1)
        return parent or "/", name
    return None, source.strip("/")


def folder(source: str, store: Store) -> Store:
    if "://" in source or source.startswith("/"):
        return Store(source.rstrip("/"))
    return store.child(source.strip("/"))


def locate(source: str, store: Store) -> tuple[Store, str]:
    parent, rel = split(source)
    where = Store(parent) if parent else store
    if not where.exists(rel):
        raise ValueError(
            f"init_from={source}: no such file ({where.url}/{rel}); a relative path is inside the job's store"
        )
    return where, rel


@contextlib.contextmanager
def local_copy(where: Store, name: str):
    """(a local path of ``name``, its sha256): the file itself on a local store, else a copy in local
    scratch fetched in pieces and removed afterwards."""
    if where.protocol == "file":
        path = where.path(name)
        yield path, file_digest(path)["sha256"]
        return
    with tempfile.TemporaryDirectory(prefix="ddm-init-from-") as tmp:
        local = os.path.join(tmp, os.path.basename(name))
        yield local, where.get_file(name, local)["sha256"]


def hub_commit(folder: str) -> str | None:
    """The commit a hub download resolved to: the name of its snapshot folder (huggingface_hub's
    cache keeps each commit's files under ``snapshots/<commit>``), or None."""
    name = os.path.basename(os.path.normpath(folder))
    return name if len(name) == 40 and all(c in "0123456789abcdef" for c in name) else None


def download(source: str) -> str:
    """A local folder holding ``hf://<repo>[@<revision>]``'s transformer (a diffusers model or
    pipeline folder): safetensors weights only (a repository holding only pickled ones has none to
    read), at the revision named, else at the hub's current main (``hub_commit`` says which commit;
    the job records it)."""
    repo, _, revision = source.removeprefix("hf://").partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ValueError(f"init_from={source}: the hub needs huggingface_hub (pip install 'ddm[encoders]')") from e
    try:
        folder = snapshot_download(
            repo, revision=revision or None, allow_patterns=["model_index.json", "transformer/*", "config.json",
                                                             "diffusion_pytorch_model*.safetensors*"],
        )  # fmt: skip
    except Exception as e:
        raise ValueError(
            f"init_from={source}: could not fetch {repo} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline, download it where there is a network (huggingface-cli download {repo} --local-dir DIR), "
            "copy DIR here and give init_from=DIR"
        ) from e
    return folder
