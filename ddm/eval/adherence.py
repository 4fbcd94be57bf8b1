"""Prompt adherence of a text model's samples: two measures that a model ignoring its prompts fails.

- **class**: how often the FD classifier (trained on the data's labels) finds in a sample the class
  of the image its prompt describes. Chance: the commonest class's share among the prompts. Strict:
  at small scale samples can follow a prompt's size, weight and slant long before the classifier
  can read their character.
- **retrieval**: a ridge map from the metric's image features to the caption embeddings (the mean of
  the encoder's caption tokens), fit on data images and their captions; a sample counts when, among
  its own prompt and ``candidates - 1`` other prompts (a seeded draw), the map's prediction from the
  sample is closest (cosine) to its own prompt's embedding. Chance: 1 / candidates. The same measure
  on held-back data images with their own captions is the ceiling (``retrieval_data``).
"""

from __future__ import annotations

import numpy as np
import torch

ADHERENCE_VERSION = 3  # evaluations and learning curves of text models measured before are measured again
CANDIDATES = 10  # prompts each sample is told apart from, its own included
FIT_SAMPLES = 4096  # data images (with their captions) the retrieval map is fit and checked on


def caption_vectors(emb) -> np.ndarray:
    """(N, E) float64: the mean of each caption's tokens (``TextEmbedding``; padding left out)."""
    mask = emb.mask.unsqueeze(-1).to(emb.tokens.dtype)
    return ((emb.tokens * mask).sum(1) / mask.sum(1).clamp(min=1)).double().cpu().numpy()


class CaptionProbe:
    """Ridge regression from image features to caption vectors, centred, fit in closed form."""

    def __init__(self, features: np.ndarray, captions: np.ndarray, ridge: float = 1e-2):
        f, c = np.asarray(features, np.float64), np.asarray(captions, np.float64)
        self.mu_f, self.mu_c = f.mean(0), c.mean(0)
        f, c = f - self.mu_f, c - self.mu_c
        gram = f.T @ f
        lam = ridge * np.trace(gram) / len(gram)
        self.w = np.linalg.solve(gram + lam * np.eye(len(gram)), f.T @ c)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.mu_f) @ self.w  # centred caption vectors

    def retrieval(self, features: np.ndarray, own: np.ndarray, vectors: np.ndarray, seed: int) -> float:
        """Share of samples whose prediction is closest to their own prompt (``own[i]``: a row of
        ``vectors``, the distinct prompts' caption vectors) among ``CANDIDATES`` prompts."""
        pred = _unit(self.predict(features))
        table = _unit(vectors - self.mu_c)
        cands = candidates(own, len(vectors), seed)
        scores = np.einsum("ne,nme->nm", pred, table[cands])
        return float((scores.argmax(1) == 0).mean())


def candidates(own: np.ndarray, num_prompts: int, seed: int) -> np.ndarray:
    """(N, M) prompt indices per sample: its own first, then M - 1 others drawn without it
    (M = min(CANDIDATES, num_prompts))."""
    m = min(CANDIDATES, num_prompts)
    rng = np.random.default_rng(seed)
    out = np.empty((len(own), m), np.int64)
    for i, o in enumerate(own):
        others = rng.choice(num_prompts - 1, m - 1, replace=False)
        out[i] = [o, *(others + (others >= o))]  # skip its own index
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class PromptSet:
    """The prompts of one evaluation (one per sample), their embeddings (what the models read), the
    classes of the images they describe (or None), and the retrieval probe fit on the data."""

    def __init__(self, prompts: list[str], classes: torch.Tensor | None, encode, embedder, x_data: torch.Tensor,
                 captions: list[str], seed: int, source: str):  # fmt: skip
        self.prompts, self.classes, self.embedder, self.seed, self.source = prompts, classes, embedder, seed, source
        self.embeddings = encode(prompts)
        distinct = sorted(set(prompts))
        index = {p: i for i, p in enumerate(distinct)}
        self.own = np.array([index[p] for p in prompts])
        self.vectors = caption_vectors(encode(distinct))
        # The probe: fit on 3/4 of a draw of data images, its ceiling measured on the other 1/4.
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(x_data), generator=g)[:FIT_SAMPLES]
        feats = embedder.embed(x_data[pick])
        vecs = caption_vectors(encode([captions[int(i)] for i in pick]))
        cut = len(pick) * 3 // 4
        self.probe = CaptionProbe(feats[:cut], vecs[:cut])
        back = [captions[int(i)] for i in pick[cut:]]  # their distinct captions, as the samples' prompts are
        index = {c: i for i, c in enumerate(dict.fromkeys(back))}
        own = np.array([index[c] for c in back])
        self.retrieval_data = self.probe.retrieval(feats[cut:], own, vecs[cut:][np.unique(own, return_index=True)[1]],
                                                   seed)  # fmt: skip
        self.retrieval_chance = 1.0 / min(CANDIDATES, len(distinct))

    def adherence(self, x: torch.Tensor) -> dict:
        """The class accuracy (None without classes) and the retrieval accuracy of samples ``x``
        (row i made from prompt i)."""
        out = {"retrieval": self.probe.retrieval(self.embedder.embed(x), self.own, self.vectors, self.seed)}
        out["accuracy"] = None
        if self.classes is not None:
            with torch.no_grad():
                pred = torch.cat([self.embedder(x[i : i + 512].float()).argmax(1) for i in range(0, len(x), 512)])
            out["accuracy"] = float((pred == self.classes).float().mean())
        return {**out, "chance": self.chance, "retrieval_chance": self.retrieval_chance}

    @property
    def chance(self) -> float | None:
        if self.classes is None:
            return None
        return float(torch.bincount(self.classes).max()) / len(self.classes)

    def info(self) -> dict:
        return {
            "source": self.source,
            "examples": self.prompts[:8],
            "adherence": "the FD-classifier's accuracy on the class of each prompt's image"
            if self.classes is not None
            else None,
            "adherence_chance": self.chance,
            "retrieval": f"a ridge map from image features to caption vectors finds a sample's own prompt among "
            f"{min(CANDIDATES, len(self.vectors))}",
            "retrieval_chance": self.retrieval_chance,
            "retrieval_data": self.retrieval_data,
        }
