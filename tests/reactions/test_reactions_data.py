"""Simulation against analytic solutions, the HDF5 schema, CSV input and dc/dt estimation."""

from __future__ import annotations

import numpy as np
import pytest

from mmtk.core.errors import DataError
from mmtk.reactions.data import estimate_dcdt, read_samples, save_trajectories, split_rows
from mmtk.reactions.fit import fit_rates
from mmtk.reactions.mechanism import load_mechanism, mechanism_from_dict
from mmtk.reactions.simulate import simulate, time_grid


def _first_order(k=2.0):
    return mechanism_from_dict({"species": ["A", "B"], "reactions": [{"equation": "A -> B", "k_forward": k}]}, "first-order")


def test_first_order_matches_analytic_solution():
    mechanism = _first_order(k=2.0)
    times = time_grid("linear", 2.0, 21)
    trajectories = simulate(mechanism, times, 5, np.random.default_rng(0), rtol=1e-10, atol=1e-12)
    a0 = trajectories.concentrations[:, 0, 0]
    b0 = trajectories.concentrations[:, 0, 1]
    expected_a = a0[:, None] * np.exp(-2.0 * times)[None, :]
    np.testing.assert_allclose(trajectories.concentrations[:, :, 0], expected_a, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(trajectories.concentrations[:, :, 1], (a0 + b0)[:, None] - expected_a, rtol=1e-7, atol=1e-10)
    # dc/dt is the exact right-hand side: dA/dt = -2 A.
    np.testing.assert_allclose(trajectories.dcdt[:, :, 0], -2.0 * trajectories.concentrations[:, :, 0], rtol=1e-14)


def test_reversible_first_order_relaxes_to_equilibrium():
    mechanism = load_mechanism("linear-chain")
    times = time_grid("log", 50.0, 8, t_start=1e-4)
    trajectories = simulate(mechanism, times, 3, np.random.default_rng(1), rtol=1e-9, atol=1e-12)
    final = trajectories.concentrations[:, -1]
    # All rates equal 1 or 1e3 in both directions, so the equilibrium is uniform.
    np.testing.assert_allclose(final, final.mean(axis=1, keepdims=True) * np.ones((1, 3)), rtol=1e-6)
    np.testing.assert_allclose(trajectories.concentrations.sum(axis=2), trajectories.concentrations[:, :1].sum(axis=2) * np.ones((1, 8)), rtol=1e-8)


def test_log_grid_starts_at_zero():
    grid = time_grid("log", 1e8, 200, t_start=1e-3)
    assert grid[0] == 0.0
    assert grid[1] == pytest.approx(1e-3)
    assert grid[-1] == pytest.approx(1e8)
    assert grid.size == 200


def test_hdf5_round_trip(tmp_path):
    mechanism = load_mechanism("michaelis-menten")
    trajectories = simulate(mechanism, time_grid("linear", 1.0, 6), 4, np.random.default_rng(0))
    path = save_trajectories(tmp_path / "mm.h5", trajectories)
    samples = read_samples(path, "auto", "smoothing_spline", None, 1e-8)
    assert samples.species == mechanism.species
    assert samples.dcdt_method == "exact"
    np.testing.assert_array_equal(samples.concentrations, trajectories.concentrations.reshape(-1, 4))
    np.testing.assert_array_equal(samples.dcdt, trajectories.dcdt.reshape(-1, 4))


def _write_csv(path, times, values, species, experiments=None):
    header = (["experiment"] if experiments is not None else []) + ["time"] + species
    lines = [",".join(header)]
    for i, t in enumerate(times):
        prefix = [str(experiments[i])] if experiments is not None else []
        lines.append(",".join(prefix + [repr(float(t))] + [repr(float(v)) for v in values[i]]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_dcdt_estimated_and_named(tmp_path):
    times = np.linspace(0.0, 2.0, 41)
    values = np.stack([np.exp(-times), 1.0 - np.exp(-times)], axis=1)
    path = _write_csv(tmp_path / "a.csv", np.concatenate([times, times]), np.concatenate([values, 0.5 * values]), ["A", "B"], experiments=["x"] * 41 + ["y"] * 41)
    samples = read_samples(path, "auto", "smoothing_spline", None, 0.0)
    assert "smoothing spline" in samples.dcdt_method
    assert sorted(set(samples.experiment.tolist())) == ["x", "y"]
    interior = (samples.time > 0.2) & (samples.time < 1.8)
    expected = np.where(samples.experiment == "x", 1.0, 0.5)[:, None] * np.stack([-np.exp(-samples.time), np.exp(-samples.time)], axis=1)
    np.testing.assert_allclose(samples.dcdt[interior], expected[interior], atol=2e-3)

    finite = read_samples(path, "csv", "finite_difference", None, 0.0)
    assert "finite differences" in finite.dcdt_method
    np.testing.assert_allclose(finite.dcdt[interior], expected[interior], atol=2e-3)


def _decay_rate(dcdt_a: np.ndarray, a: np.ndarray) -> float:
    """Return the least-squares k of dA/dt = -k A."""
    return float(-np.sum(dcdt_a * a) / np.sum(a * a))


def test_spline_dcdt_of_clean_decay():
    # A -> B with k = 2 from A(0) = 1: A = exp(-2 t), dA/dt = -2 exp(-2 t).
    times = np.linspace(0.0, 2.0, 21)
    a = np.exp(-2.0 * times)
    c = np.stack([a, 1.0 - a], axis=1)
    dcdt = estimate_dcdt(times, c, "smoothing_spline", None, "decay")
    assert abs(_decay_rate(dcdt[:, 0], a) - 2.0) < 2.0 * 1e-3, "clean data must give k within 0.1 %"
    np.testing.assert_allclose(dcdt[:, 0], -2.0 * a, atol=1e-3)
    np.testing.assert_allclose(dcdt[:, 1], -dcdt[:, 0], atol=1e-12)


def test_spline_dcdt_smooths_noisy_decay():
    times = np.linspace(0.0, 2.0, 21)
    a = np.exp(-2.0 * times)
    rng = np.random.default_rng(0)
    spline_errors, difference_errors = [], []
    for _ in range(20):
        noisy = (a + 0.01 * rng.standard_normal(times.size))[:, None]
        spline_errors.append(np.sqrt(np.mean((estimate_dcdt(times, noisy, "smoothing_spline", None, "noisy")[:, 0] + 2.0 * a) ** 2)))
        difference_errors.append(np.sqrt(np.mean((estimate_dcdt(times, noisy, "finite_difference", None, "noisy")[:, 0] + 2.0 * a) ** 2)))
    # Noise of 0.01 at spacing 0.1 gives finite-difference errors near 0.07.
    assert np.mean(spline_errors) < 0.5 * np.mean(difference_errors)


def test_noise_estimate_matches_added_noise():
    from mmtk.reactions.data import estimate_noise

    times = np.linspace(0.0, 3.0, 100)
    clean = np.exp(-2.0 * times)
    assert estimate_noise(times, clean) < 1e-7
    noisy = clean + 0.01 * np.random.default_rng(1).standard_normal(times.size)
    assert 0.007 < estimate_noise(times, noisy) < 0.013


def test_estimate_rejects_repeated_times():
    with pytest.raises(DataError, match="distinct"):
        estimate_dcdt(np.array([0.0, 1.0, 1.0, 2.0, 3.0]), np.zeros((5, 1)), "smoothing_spline", None, "x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time,A\n0,1\n1,nan\n", "NaN"),
        ("time,A\n0,1\n1,-0.5\n", "negative concentration -0.5 of A"),
        ("A,B\n1,2\n", "no 'time' column"),
        ("time,A\n0,1\n1,abc\n", "not a number"),
        ("time,A\n", "no data rows"),
    ],
)
def test_bad_csv_rejected(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_samples(path, "auto", "finite_difference", None, 1e-8)


def test_split_is_disjoint_and_complete():
    train, validation = split_rows(1000, 0.2, np.random.default_rng(0))
    assert train.size == 800
    assert validation.size == 200
    assert np.intersect1d(train, validation).size == 0
    np.testing.assert_array_equal(np.union1d(train, validation), np.arange(1000))


def test_rate_fit_recovers_true_rates():
    truth = load_mechanism("hydrogen-oxidation")
    trajectories = simulate(truth, time_grid("linear", 1.0, 10), 30, np.random.default_rng(2))
    c = trajectories.concentrations.reshape(-1, 6)
    dcdt = trajectories.dcdt.reshape(-1, 6)
    b_f, b_r = truth.log_rates()
    result = fit_rates(truth.stoichiometry.astype(float), c, dcdt, b_f + 0.05, b_r - 0.05)
    np.testing.assert_allclose(np.exp(result.log_forward), truth.k_forward, rtol=1e-6)
    np.testing.assert_allclose(np.exp(result.log_reverse), truth.k_reverse, rtol=1e-6)
