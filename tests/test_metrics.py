"""Fréchet distance against closed forms, and the FD-classifier feature network."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ddm.eval.metrics import FeatureClassifier, frechet_distance, gaussian_stats, train_classifier


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Rotating both Gaussians by one orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T  # s1 S2 do not commute; s2 is near-singular-ish
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # Singular covariances (rank-deficient features) stay finite and non-negative.
    low = np.outer(mu1, mu1)
    assert 0 <= frechet_distance(mu1, low, mu2, low) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-6)


def test_gaussian_stats_estimate_the_distribution():
    rng = np.random.default_rng(2)
    cov = np.array([[2.0, 0.6], [0.6, 0.5]])
    x = rng.multivariate_normal([1.0, -2.0], cov, size=200_000)
    mu, s = gaussian_stats(x)
    assert np.allclose(mu, [1, -2], atol=0.01) and np.allclose(s, cov, atol=0.02)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(x[:1])
    with pytest.raises(ValueError, match="mismatched Gaussian statistics"):
        frechet_distance(mu, s, mu[:1], s)


def test_feature_classifier_learns_digits_and_separates_distributions():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # [0, 16] -> [-1, 1]
    y = torch.tensor(d.target)
    model, acc = train_classifier(x, y, 10, steps=300)
    assert acc > 0.9  # a real classifier, so its features carry class information
    f = model.embed(x)
    assert f.shape == (len(x), FeatureClassifier.feature_dim)
    perm = np.random.default_rng(0).permutation(len(x))
    a, b = perm[: len(x) // 2], perm[len(x) // 2 :]
    floor = frechet_distance(*gaussian_stats(f[a]), *gaussian_stats(f[b]))
    no_zeros = frechet_distance(*gaussian_stats(f[a][y[a].numpy() != 0]), *gaussian_stats(f[b]))
    noise = frechet_distance(*gaussian_stats(model.embed(torch.rand_like(x) * 2 - 1)), *gaussian_stats(f[b]))
    assert floor < no_zeros < noise  # a missing class costs, pure noise costs most
