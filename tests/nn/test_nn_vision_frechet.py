"""Fréchet distance against the closed form for diagonal Gaussians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtk.core.errors import InputError
from mmtk.nn.vision import frechet_distance, frechet_distance_from_statistics, gaussian_statistics


def _diagonal_closed_form(mean_a, var_a, mean_b, var_b) -> float:
    """|mean_a - mean_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2, the distance for diagonal covariances."""
    return float(np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2))


def _samples_with_exact_statistics(mean, var, count, seed):
    """Samples whose sample mean is ``mean`` and whose unbiased sample covariance is diag(``var``) exactly."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((count, mean.shape[0]))
    z -= z.mean(axis=0)
    cholesky = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = z @ np.linalg.inv(cholesky).T  # sample covariance is now the identity
    return mean + z * np.sqrt(var)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_statistics_diagonal_closed_form(method):
    mean_a, var_a = np.array([0.0, 1.0, -2.0]), np.array([1.0, 4.0, 0.25])
    mean_b, var_b = np.array([1.0, 1.0, 0.0]), np.array([9.0, 1.0, 0.25])
    distance = frechet_distance_from_statistics(mean_a, np.diag(var_a), mean_b, np.diag(var_b), method=method)
    # By hand: mean term 1 + 0 + 4 = 5; covariance term (1-3)^2 + (2-1)^2 + 0 = 5.
    assert distance == pytest.approx(10.0, abs=1e-9)
    assert distance == pytest.approx(_diagonal_closed_form(mean_a, var_a, mean_b, var_b), abs=1e-9)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_features_diagonal_closed_form(method):
    dim = 6
    rng = np.random.default_rng(0)
    mean_a, mean_b = rng.normal(size=dim), rng.normal(size=dim)
    var_a, var_b = rng.uniform(0.5, 3.0, size=dim), rng.uniform(0.5, 3.0, size=dim)
    feats_a = _samples_with_exact_statistics(mean_a, var_a, 200, seed=1)
    feats_b = _samples_with_exact_statistics(mean_b, var_b, 150, seed=2)

    expected = _diagonal_closed_form(mean_a, var_a, mean_b, var_b)
    assert frechet_distance(feats_a, feats_b, method=method) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(torch.from_numpy(feats_b), torch.from_numpy(feats_a), method=method) == pytest.approx(expected, rel=1e-7)


def test_frechet_methods_agree_full_covariance():
    rng = np.random.default_rng(6)
    feats_a = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64))
    feats_b = rng.normal(size=(200, 64)) @ rng.normal(size=(64, 64)) + 0.5
    by_eigh = frechet_distance(feats_a, feats_b, method="eigh")
    by_sqrtm = frechet_distance(feats_a, feats_b, method="sqrtm")
    assert by_eigh == pytest.approx(by_sqrtm, rel=1e-8)


def test_frechet_rejects_unknown_method():
    with pytest.raises(InputError, match="method"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 3)), method="svd")


def test_frechet_identical_sets_is_zero():
    feats = np.random.default_rng(3).normal(size=(50, 8))
    assert abs(frechet_distance(feats, feats)) < 1e-6


def test_gaussian_statistics_unbiased():
    feats = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mean, cov = gaussian_statistics(feats)
    assert np.allclose(mean, [2.0, 4.0])
    # Unbiased variances: ((-2)^2 + 0 + 2^2) / 2 = 4 and ((-3)^2 + 1 + 4^2) / 2 = 13; covariance (6 + 0 + 8) / 2 = 7.
    assert np.allclose(cov, [[4.0, 7.0], [7.0, 13.0]])


def test_frechet_singular_covariance_is_finite():
    # Fewer samples than dimensions: both covariances are singular.
    rng = np.random.default_rng(4)
    distance = frechet_distance(rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1.0)
    assert np.isfinite(distance)
    assert distance > 10.0  # the mean term alone is about 20


def test_frechet_rejects_dimension_mismatch():
    with pytest.raises(InputError, match="features per sample"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 5)))


def test_frechet_rejects_nan():
    feats = np.ones((4, 3))
    feats[1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        frechet_distance(feats, np.ones((4, 3)))


def test_frechet_rejects_single_sample():
    with pytest.raises(InputError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))


def test_frechet_singular_rotated_closed_form():
    # Zero variances make both covariances singular; a common rotation leaves the distance unchanged.
    var_a, var_b = np.array([1.0, 0.0, 4.0, 0.0]), np.array([4.0, 9.0, 0.0, 0.0])
    rotation, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(4, 4)))
    cov_a = rotation @ np.diag(var_a) @ rotation.T
    cov_b = rotation @ np.diag(var_b) @ rotation.T
    mean = np.zeros(4)
    # By hand: (1 - 2)^2 + (0 - 3)^2 + (2 - 0)^2 + 0 = 14.
    assert frechet_distance_from_statistics(mean, cov_a, mean, cov_b) == pytest.approx(14.0, abs=1e-6)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_identical_sets_zero(method):
    features = np.random.default_rng(3).normal(size=(64, 256)) * 5.0
    distance = frechet_distance(features, features, method=method)
    assert distance >= 0.0
    assert distance < 1e-3
