"""Frozen text encoders for text-conditioned experts: CLIP's or T5's text transformer (through
transformers), named by hub id and revision or by a folder that holds a saved one, and a tiny one
made from a dataset's own captions, for offline work and tests.

    enc = TextEncoder.load("openai/clip-vit-large-patch14@<revision>")  # the hub (HF_HOME caches it)
    enc = TextEncoder.load("/models/t5-v1_1-xl")                         # a save_pretrained folder
    enc = TextEncoder.load("store:text_encoder", store=store.url)        # a folder inside the job's store
    emb = enc.encode(["bold serif R", ""])  # tokens (N, L, D), mask (N, L) bool, pooled (N, D)

The encoder is frozen (eval mode, no gradients). Every caption is padded to ``max_length`` and
encoded on its own: its embedding does not depend on the other captions of its batch, so embeddings
computed once at ingest equal those computed inside a training job (up to the stored dtype's
rounding, ``text_dtype``, and on a GPU TF32's, which training jobs turn on). The pooled vector is CLIP's
(the end-of-text token after the final norm) or, for T5, the mean of the caption's tokens.
``describe()`` is what an export records so that a user can rebuild the encoder and sample (an
encoder named ``store:<folder>`` loads with ``store=`` the URL of the store the export is in).

What is read is checked (the store is shared by islands that do not trust each other): a folder in
the store (``store:<folder>``, or any folder holding a ``MANIFEST.json``) loads only the files its
manifest lists, each copied down and checked against its size and sha256 first (a ``store:`` folder
without a manifest is refused); weights load from safetensors only; a hub id loads at the revision
it names (``<org>/<name>@<commit>``; without one, the hub's current commit, which ``describe()``
records). ``check_encoder`` compares an encoder with what an export recorded of the one it was
trained with: sampling, evaluation and training from an export call it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ddm.models import text_files
from ddm.models.text_config import IN_STORE, in_store
from ddm.models.text_files import MANIFEST
from ddm.store.transfer import file_digest

KINDS = {"clip_text_model": "clip", "clip": "clip", "t5": "t5"}  # config.json's model_type -> kind
WEIGHTS = "model.safetensors"


@dataclass
class TextEmbedding:
    """Captions as a text DiT takes them; indexed, moved and joined like a batch tensor. ``drop``
    (N,) bool, when set, marks captions each model replaces by its own learned null caption
    (distillation drops a caption once for the student and every expert of its teacher alike)."""

    tokens: torch.Tensor  # (N, L, D) the last hidden states
    mask: torch.Tensor  # (N, L) bool: True on the caption's tokens
    pooled: torch.Tensor  # (N, D)
    drop: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> "TextEmbedding":
        drop = None if self.drop is None else self.drop[rows]
        return TextEmbedding(self.tokens[rows], self.mask[rows], self.pooled[rows], drop)

    def to(self, device) -> "TextEmbedding":
        drop = None if self.drop is None else self.drop.to(device)
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device), drop)

    @staticmethod
    def cat(parts: list["TextEmbedding"]) -> "TextEmbedding":
        fields = (torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "mask", "pooled"))
        drop = None
        if any(p.drop is not None for p in parts):
            none = lambda p: torch.zeros(len(p), dtype=torch.bool, device=p.tokens.device)  # noqa: E731
            drop = torch.cat([none(p) if p.drop is None else p.drop for p in parts])
        return TextEmbedding(*fields, drop)


def parse(spec: str) -> tuple[str, str | None, bool]:
    """(where, revision, on the hub) of ``spec``: a folder or URL, or ``[hf://]<org>/<name>[@<revision>]``."""
    if spec.startswith("hf://"):
        repo, _, rev = spec[5:].partition("@")
        return repo, rev or None, True
    if "://" in spec or spec.startswith(("/", ".", "~")) or os.path.exists(spec):
        return os.path.expanduser(spec), None, False
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1:
        raise ValueError(
            f"text encoder {spec!r} is neither a folder that exists nor a hub id (<org>/<name>[@<revision>], e.g. "
            "openai/clip-vit-large-patch14 or google/t5-v1_1-xl)"
        )
    return repo, rev or None, True


class TextEncoder:
    def __init__(self, model, tokenizer, kind: str, spec: str, max_length: int, source: dict):
        self.model, self.tokenizer, self.kind, self.spec = model.eval().requires_grad_(False), tokenizer, kind, spec
        self.max_length, self.source = max_length, source
        self.hidden_size = int(model.config.hidden_size if kind == "clip" else model.config.d_model)

    @classmethod
    def load(
        cls,
        spec: str,
        max_length: int = 0,
        device: str | torch.device = "cpu",
        store: str | None = None,
        revision: str | None = None,
    ) -> "TextEncoder":
        """The encoder and tokenizer ``spec`` names (see ``parse``; ``store:<folder>``: in the store at
        URL ``store``); ``max_length`` 0: the model's own (CLIP: its positions, 77; T5: 120,
        PixArt-alpha's). ``revision``: the hub revision to load where ``spec`` names none (the one an
        export recorded). A committed folder (``store:`` names always) loads only the files its
        manifest lists, each checked first (``ddm.store.store.ChecksumError`` names a file that differs).
        The encoder keeps ``spec`` as its name (``describe``)."""
        import tempfile

        where, own_revision, hub = parse(in_store(spec, store))
        if hub:
            folder = text_files.hub_folder(spec, where, own_revision or revision)
            return cls._load(spec, folder, own_revision or revision, True, max_length, device)
        if text_files.committed(spec, where):  # verified file by file, copied down for the load, removed after it
            with tempfile.TemporaryDirectory(prefix="ddm-text-encoder-") as tmp:
                text_files.copy_verified(spec, where, tmp)
                return cls._load(spec, tmp, None, False, max_length, device)
        if spec.startswith(IN_STORE):
            raise text_files.not_committed(spec, where)
        if text_files.remote(where):  # a store URL: copied down for the load, removed after it
            with tempfile.TemporaryDirectory(prefix="ddm-text-encoder-") as tmp:
                text_files.copy_down(where, tmp)
                return cls._load(spec, tmp, None, False, max_length, device)
        return cls._load(spec, text_files.local_folder(where), None, False, max_length, device)

    @classmethod
    def _load(cls, spec: str, folder: str, revision: str | None, hub: bool, max_length: int, device) -> "TextEncoder":
        try:
            with open(os.path.join(folder, "config.json")) as f:
                config = json.load(f)
        except FileNotFoundError as e:
            raise ValueError(f"text encoder {spec!r}: {folder} has no config.json (a transformers save)") from e
        kind = KINDS.get(config.get("model_type", ""))
        if kind is None:
            raise ValueError(
                f"text encoder {spec!r} is a {config.get('model_type')!r} model; ddm reads CLIP and T5 text "
                "encoders (model_type clip, clip_text_model or t5)"
            )
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load of a tiny model is noise in the job's log
        model = (CLIPTextModel if kind == "clip" else T5EncoderModel).from_pretrained(folder, use_safetensors=True)
        model = model.float()  # whatever dtype it was saved in: fp16 T5 overflows, and ingest and job must agree
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if not max_length:  # CLIP: its positions (77); T5: the tokenizer's limit below 512, else PixArt's 120
            own = int(getattr(tokenizer, "model_max_length", 0) or 0)
            max_length = int(model.config.max_position_embeddings) if kind == "clip" else own if 0 < own < 512 else 120
        # The commit a hub load resolved to (its snapshot folder's name), whatever revision named it.
        commit = os.path.basename(os.path.normpath(folder)) if hub else None
        commit = commit if commit and len(commit) == 40 and text_files.is_hex(commit) else None
        source = {"spec": spec, "revision": commit or getattr(model.config, "_commit_hash", None) or revision}
        if not hub:
            files = [n for n in sorted(os.listdir(folder)) if not n.startswith(".")]  # not a download's .cache/
            source["sha256"] = {
                n: file_digest(os.path.join(folder, n))["sha256"]
                for n in files
                if os.path.isfile(os.path.join(folder, n))
            }
        return cls(model.to(device), tokenizer, kind, spec, max_length, source)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask)
        tokens = out.last_hidden_state
        if self.kind == "clip":
            pooled = out.pooler_output
        else:
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
        return TextEmbedding(tokens.float(), mask.bool(), pooled.float())

    def encode_to_cpu(self, captions: list[str], chunk: int = 256) -> TextEmbedding:
        """``encode`` in chunks, each moved to host memory: for many captions (a prompts file, an
        evaluation's samples) that would not fit beside the models on the GPU at once."""
        return TextEmbedding.cat(
            [self.encode(captions[i : i + chunk]).to("cpu") for i in range(0, len(captions), chunk)]
        )

    def describe(self) -> dict:
        """What a text model's export records: which encoder, its sizes and where it came from."""
        return {"kind": self.kind, "hidden_size": self.hidden_size, "max_length": self.max_length, **self.source}


def check(encoder: str, dim: int, length: int, store: str | None = None) -> dict:
    """Before any worker starts: the encoder ``encoder`` names exists (a folder, or the hub: only its
    config.json is fetched; ``store:<folder>``: in the store at URL ``store``) and gives ``dim``-wide
    embeddings of at least ``length`` positions (CLIP); returns its config. Errors say what to set."""
    where, revision, hub = parse(in_store(encoder, store))
    if hub:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as e:
            raise ValueError(f"text encoder {encoder!r} comes from the hub: pip install 'ddm[encoders]'") from e
        with open(text_files.hub_config(encoder, where, revision)) as f:
            config = json.load(f)
    elif text_files.committed(encoder, where):  # its config.json, checked against the folder's manifest
        config = text_files.verified_config(encoder, where)
    elif encoder.startswith(IN_STORE):
        raise text_files.not_committed(encoder, where)
    elif text_files.remote(where):  # a store URL: its config.json only, through the store's client
        config = text_files.remote_config(encoder, where)
    else:
        path = os.path.join(text_files.local_folder(where), "config.json")
        try:
            with open(path) as f:
                config = json.load(f)
        except FileNotFoundError as e:
            raise ValueError(f"text encoder {encoder!r}: {os.path.dirname(path)} has no config.json") from e
    kind = KINDS.get(config.get("model_type", ""))
    if kind is None:
        raise ValueError(f"text encoder {encoder!r} is a {config.get('model_type')!r} model, not a CLIP or T5 one")
    text = config.get("text_config", config) if config.get("model_type") == "clip" else config
    width = int(text.get("hidden_size" if kind == "clip" else "d_model", 0))
    if width != dim:
        raise ValueError(f"text encoder {encoder!r} makes {width}-wide embeddings: set model.text.dim={width}")
    positions = int(text.get("max_position_embeddings", 0)) if kind == "clip" else 0
    if positions and length > positions:
        raise ValueError(
            f"model.text.length={length} but {encoder!r} has {positions} positions: set model.text.length<={positions}"
        )
    return config


def check_job(t, dataset, store_url: str) -> None:
    """A text job's inputs, before any worker starts: captions in the dataset, and the encoder (``check``)
    or, for ``embeddings=store``, embeddings stored at ingest by that encoder (which need not be
    reachable from the job then). ``t``: the job's ``model.text`` (a ``TextConfig``); ``dataset``: a
    ``ddm.data.shards.Dataset``."""
    if not dataset.has_captions:
        raise ValueError(
            f"model.text.encoder is set but the dataset in {store_url} has no captions: ingest it with caption=... "
            "(e.g. caption=describe for glyphs, caption=TEXT for a Parquet column)"
        )
    stored = dataset.manifest.get("text_embeddings")
    if t.embeddings != "store":
        check(t.encoder, t.dim, t.length, store_url)
        return
    # The job reads the embeddings ingest stored: it needs no encoder (an offline island trains on them).
    if not stored:
        raise ValueError(
            f"model.text.embeddings=store but the dataset in {store_url} has no stored caption embeddings: "
            f"ingest it with text_encoder={t.encoder} (or use model.text.embeddings=job)"
        )
    made = (stored["encoder"]["spec"], stored["dim"], stored["length"])
    if made != (t.encoder, t.dim, t.length):
        raise ValueError(
            f"the stored caption embeddings were made by {made[0]!r} (dim {made[1]}, length {made[2]}), but the "
            f"job's model.text is {t.encoder!r} (dim {t.dim}, length {t.length}): use the same, or "
            "model.text.embeddings=job"
        )


def check_encoder(recorded: dict | None, encoder: "TextEncoder | dict", where: str) -> None:
    """``encoder`` (loaded, or its ``describe()``: a dataset's stored embeddings') is the one
    ``recorded`` describes (what an export or a dataset recorded of the encoder it was made with),
    else a ValueError naming ``where`` and what differs: its kind and sizes, the sha256 of each of
    its files (a folder's), its hub commit. An empty record (exports made before encoders were
    recorded) has nothing to compare."""
    if not recorded:
        return
    if not isinstance(recorded, dict):
        raise ValueError(f"{where}: its text_encoder record is not a description of an encoder: {recorded!r:.80}")
    mine = encoder if isinstance(encoder, dict) else encoder.describe()
    name = recorded.get("spec", mine.get("spec"))
    differs = [
        f"{key} {recorded[key]!r} there, {mine[key]!r} here"
        for key in ("kind", "hidden_size", "max_length")
        if key in recorded and recorded[key] != mine.get(key)
    ]
    files = recorded.get("sha256")
    if isinstance(files, dict):
        own = {n: d for n, d in (mine.get("sha256") or {}).items() if n != MANIFEST}
        files = {n: d for n, d in files.items() if n != MANIFEST}
        if not own:
            differs.append(f"the files of a folder there ({', '.join(sorted(files))}), a hub model here")
        else:
            for n in sorted(files.keys() | own.keys()):
                there, here = files.get(n), own.get(n)
                if there != here:
                    differs.append(f"{n}: sha256 {str(there)[:12]}… there, {str(here)[:12]}… here"
                                   if there and here else f"{n}: {'only there' if there else 'only here'}")  # fmt: skip
    there, here = recorded.get("revision"), mine.get("revision")
    if isinstance(there, str) and len(there) == 40 and text_files.is_hex(there) and not files and there != here:
        differs.append(f"hub revision {there} there, {here} here")
    if differs:
        raise ValueError(
            f"{where} was made with the text encoder {name!r} as it was then, and the encoder loaded now differs: "
            f"{'; '.join(differs)}. Its captions would be embedded differently: load the encoder it recorded (put "
            "those files back, or name that revision)"
        )


def load_checked(text: dict, records: list[tuple[str, dict]], device="cpu", store: str | None = None) -> "TextEncoder":
    """The encoder of a text model or ensemble (``text``: {"encoder", "length"}, its export's
    ``architecture.text`` or ensemble.json's ``text``), at the hub revision its exports recorded
    where its name gives none, checked against every record (``records``: (where, the record)
    of each export made with it; ``check_encoder``)."""
    pinned = {r.get("revision") for _, r in records if isinstance(r, dict) and not r.get("sha256")}
    pinned = {p for p in pinned if isinstance(p, str) and len(p) == 40 and text_files.is_hex(p)}
    encoder = TextEncoder.load(text["encoder"], int(text["length"]), device, store,
                               revision=pinned.pop() if len(pinned) == 1 else None)  # fmt: skip
    for where, record in records:
        check_encoder(record, encoder, where)
    return encoder


# --- a tiny encoder made from a dataset's captions (offline; tests and the glyphs main job) ----------


def make_tiny(
    folder: str,
    captions: list[str],
    kind: str = "clip",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_length: int = 32,
    seed: int = 0,
) -> str:
    """Write a randomly initialised ``kind`` text encoder and a word-level tokenizer trained on
    ``captions`` (lowercased words and punctuation; unknown words map to [UNK]) into ``folder``,
    as transformers saves them: ``TextEncoder.load(folder)`` reads it like any other."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.train_from_iterator(captions, WordLevelTrainer(special_tokens=specials))
    ids = {s: tok.token_to_id(s) for s in specials}
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", ids["[BOS]"]), ("[EOS]", ids["[EOS]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_length,
    )
    torch.manual_seed(seed)
    if kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_length,
            pad_token_id=ids["[PAD]"],
            bos_token_id=ids["[BOS]"],
            eos_token_id=ids["[EOS]"],
        )
        model = CLIPTextModel(config)
    elif kind == "t5":
        from transformers import T5Config, T5EncoderModel

        config = T5Config(
            vocab_size=tok.get_vocab_size(),
            d_model=hidden_size,
            d_kv=hidden_size // heads,
            d_ff=4 * hidden_size,
            num_layers=layers,
            num_heads=heads,
            pad_token_id=ids["[PAD]"],
            eos_token_id=ids["[EOS]"],
        )
        model = T5EncoderModel(config)
    else:
        raise ValueError(f"kind must be clip or t5, got {kind!r}")
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder
