"""Prompt retrieval against closed forms: a ridge map that is exact finds every sample's own prompt,
one fit on features that carry nothing about the captions scores at chance."""

import numpy as np

from ddm.eval.adherence import CANDIDATES, CaptionProbe, candidates


def test_candidates_hold_the_own_prompt_first_and_never_twice():
    own = np.array([0, 5, 9, 3] * 50)
    c = candidates(own, 12, seed=0)
    assert c.shape == (200, CANDIDATES) and (c[:, 0] == own).all()
    assert all(len(set(row)) == CANDIDATES for row in c) and c.max() < 12
    assert candidates(np.array([1, 0]), 3, seed=0).shape == (2, 3)  # fewer prompts than CANDIDATES


def test_a_linear_world_is_retrieved_exactly_and_noise_at_chance():
    rng = np.random.default_rng(0)
    prompts = rng.standard_normal((40, 6))  # 40 distinct prompts' caption vectors
    mix = rng.standard_normal((6, 16))
    own = rng.integers(0, 40, 2000)
    features = prompts[own] @ mix  # images whose features are a linear function of their prompt
    probe = CaptionProbe(features, prompts[own], ridge=1e-9)
    assert probe.retrieval(features, own, prompts, seed=1) == 1.0
    noise = rng.standard_normal((2000, 16))  # features that say nothing about the prompt
    blind = CaptionProbe(noise, prompts[own])
    score = blind.retrieval(rng.standard_normal((2000, 16)), own, prompts, seed=1)
    assert abs(score - 1 / CANDIDATES) < 0.03, score
