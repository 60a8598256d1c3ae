"""Concentration data: the HDF5 schema, CSV input, dc/dt estimation and checks.

HDF5 schema ``mmtk.reactions.trajectories/1`` (all floats are float64):

=================  =====================  ==========================================
dataset            shape                  meaning
=================  =====================  ==========================================
``species``        (n_species,)           species names (UTF-8 strings)
``time``           (n_experiments, T)     sample times of each experiment
``concentrations`` (n_experiments, T, n)  concentrations c
``dcdt``           (n_experiments, T, n)  dc/dt (optional; estimated when absent)
=================  =====================  ==========================================

Root attributes: ``dcdt_method`` (how dc/dt was obtained, "exact" for the
true right-hand side of a simulated mechanism) and, for simulated data,
``mechanism`` (the mechanism YAML text) and ``seed``.

CSV input has one row per sample and a header with ``time``, one column per
species and optionally ``experiment`` (an id, default one experiment) and
``dcdt_<species>`` columns for given derivatives.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmtk.core.errors import DataError
from mmtk.core.hdf5 import DatasetSpec, read_datasets, write_datasets
from mmtk.core.logging import get_logger
from mmtk.reactions.simulate import Trajectories

log = get_logger(__name__)

SCHEMA = "mmtk.reactions.trajectories/1"

_SPECS = {
    "species": DatasetSpec(("n_species",), kind="S"),
    "time": DatasetSpec(("n_experiments", "n_times")),
    "concentrations": DatasetSpec(("n_experiments", "n_times", "n_species")),
    "dcdt": DatasetSpec(("n_experiments", "n_times", "n_species"), required=False),
}


@dataclass
class Samples:
    """(c, dc/dt) pairs, one row per sample, with their experiment ids and times.

    ``concentrations`` and ``dcdt`` have shape (N, n_species); ``experiment``
    and ``time`` have shape (N,).
    """

    species: list[str]
    experiment: np.ndarray
    time: np.ndarray
    concentrations: np.ndarray
    dcdt: np.ndarray
    dcdt_method: str


def save_trajectories(path: str | Path, trajectories: Trajectories, attrs: dict[str, Any] | None = None, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write trajectories in the ``mmtk.reactions.trajectories/1`` schema atomically.

    ``extra`` holds further datasets written in the same file, such as a run's split.
    """
    datasets = {
        "species": list(trajectories.species),
        "time": trajectories.time,
        "concentrations": trajectories.concentrations,
        "dcdt": trajectories.dcdt,
        **(extra or {}),
    }
    return write_datasets(path, datasets, schema=SCHEMA, attrs={"dcdt_method": trajectories.dcdt_method, **(attrs or {})})


def trajectories_to_samples(trajectories: Trajectories) -> Samples:
    """Flatten (experiment, time) into sample rows."""
    n_experiments, n_times, n = trajectories.concentrations.shape
    return Samples(
        species=list(trajectories.species),
        experiment=np.repeat(np.arange(n_experiments), n_times),
        time=trajectories.time.reshape(-1),
        concentrations=trajectories.concentrations.reshape(-1, n),
        dcdt=trajectories.dcdt.reshape(-1, n),
        dcdt_method=trajectories.dcdt_method,
    )


# ------------------------------------------------------------------ reading


def read_samples(path: Path, file_format: str, derivative_method: str, smoothing: float | None, negative_tolerance: float) -> Samples:
    """Read an HDF5 or CSV data file, estimate dc/dt where absent and check the values.

    Raises DataError for a missing, empty, truncated or malformed file, for
    NaN or infinite values and for concentrations below -``negative_tolerance``.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}. Check the path in data.file.")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty. Give an HDF5 ({SCHEMA}) or CSV file with concentration time series.")
    if file_format == "auto":
        file_format = "csv" if path.suffix.lower() in (".csv", ".txt") else "hdf5"

    if file_format == "hdf5":
        species, experiments = _read_hdf5(path)
    else:
        species, experiments = _read_csv(path)

    _check_concentrations(species, experiments, str(path), negative_tolerance)
    has_dcdt = [dcdt is not None for _, _, _, dcdt in experiments]
    method = "given in the data file"
    if not all(has_dcdt):
        method = f"estimated with {describe_derivative(derivative_method, smoothing)}"
        log.info("dc/dt is not in %s; %s", path, method)
        experiments = [(e, t, c, dcdt if dcdt is not None else estimate_dcdt(t, c, derivative_method, smoothing, f"{path} experiment {e}")) for e, t, c, dcdt in experiments]

    samples = Samples(
        species=species,
        experiment=np.concatenate([np.full(t.size, e) for e, t, _, _ in experiments]),
        time=np.concatenate([t for _, t, _, _ in experiments]),
        concentrations=np.concatenate([c for _, _, c, _ in experiments]),
        dcdt=np.concatenate([d for _, _, _, d in experiments]),
        dcdt_method=method if file_format == "csv" or not all(has_dcdt) else _hdf5_method(path, method),
    )
    check_samples(samples, str(path), negative_tolerance)
    return samples


def _hdf5_method(path: Path, fallback: str) -> str:
    _, attrs = read_datasets(path, {})
    return str(attrs.get("dcdt_method", fallback))


def _read_hdf5(path: Path) -> tuple[list[str], list[tuple[Any, np.ndarray, np.ndarray, np.ndarray | None]]]:
    arrays, _ = read_datasets(path, _SPECS, schema=SCHEMA)
    species = [str(s) for s in arrays["species"]]
    time = np.asarray(arrays["time"], dtype=np.float64)
    c = np.asarray(arrays["concentrations"], dtype=np.float64)
    if c.shape[-1] != len(species):
        raise DataError(f"{path}: 'concentrations' has {c.shape[-1]} species columns but 'species' names {len(species)}.")
    dcdt = arrays.get("dcdt")
    experiments = []
    for e in range(c.shape[0]):
        experiments.append((e, time[e], c[e], None if dcdt is None else np.asarray(dcdt[e], dtype=np.float64)))
    if not experiments or time.shape[1] == 0:
        raise DataError(f"{path} contains no samples. Give at least one experiment with one time point.")
    return species, experiments


def _read_csv(path: Path) -> tuple[list[str], list[tuple[Any, np.ndarray, np.ndarray, np.ndarray | None]]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as CSV: {exc}.") from exc
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise DataError(f"{path} contains no data rows. Give a header (experiment, time, species...) and one row per sample.")

    header = [cell.strip() for cell in rows[0]]
    if "time" not in header:
        raise DataError(f"{path}: the header has no 'time' column (got {header}). Name the columns experiment, time, <species...>, dcdt_<species...>.")
    species = [h for h in header if h not in ("experiment", "time") and not h.startswith("dcdt_")]
    derivative_columns = [h for h in header if h.startswith("dcdt_")]
    if derivative_columns and sorted(derivative_columns) != sorted(f"dcdt_{s}" for s in species):
        raise DataError(f"{path}: dc/dt columns {derivative_columns} do not match the species {species}; give dcdt_<name> for every species or for none.")

    values = np.empty((len(rows) - 1, len(header)))
    experiment_ids: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path} line {line}: {len(row)} fields, but the header has {len(header)}.")
        for j, (name, cell) in enumerate(zip(header, row)):
            if name == "experiment":
                experiment_ids.append(cell.strip())
                values[line - 2, j] = 0.0
                continue
            try:
                values[line - 2, j] = float(cell)
            except ValueError:
                raise DataError(f"{path} line {line}: column '{name}' contains {cell!r}, which is not a number.") from None
    if not experiment_ids:
        experiment_ids = ["0"] * values.shape[0]

    column = {name: j for j, name in enumerate(header)}
    experiments = []
    for experiment in dict.fromkeys(experiment_ids):
        rows_of = np.array([i for i, e in enumerate(experiment_ids) if e == experiment])
        block = values[rows_of]
        order = np.argsort(block[:, column["time"]], kind="stable")
        block = block[order]
        c = block[:, [column[s] for s in species]]
        dcdt = block[:, [column[f"dcdt_{s}"] for s in species]] if derivative_columns else None
        experiments.append((experiment, block[:, column["time"]], c, dcdt))
    return species, experiments


# --------------------------------------------------------------- derivatives


def describe_derivative(method: str, smoothing: float | None) -> str:
    """Name the dc/dt estimator and its setting, for logs and summaries."""
    if method == "smoothing_spline" and smoothing is None:
        return "quintic smoothing spline (scipy.interpolate.UnivariateSpline, k=5, s = points x estimated noise variance), differentiated"
    if method == "smoothing_spline":
        return f"scipy.interpolate.make_smoothing_spline (cubic, penalty lam={smoothing:g}), differentiated"
    return "second-order finite differences (numpy.gradient, edge_order=2)"


def estimate_noise(time: np.ndarray, values: np.ndarray) -> float:
    """Estimate the noise standard deviation of one series ``values`` (T,) sampled at ``time`` (T,).

    An interpolating spline (quintic when there are enough points) through
    the even-indexed samples predicts the odd-indexed ones inside its range,
    and the other way round. Each residual is the noise of a sample plus
    the spline's noise and interpolation error, so the result is
    RMS(residual) / sqrt(2). On noise-free data it is the interpolation
    error, which is small for smooth series.
    """
    from scipy.interpolate import make_interp_spline

    residuals = []
    for first, second in ((0, 1), (1, 0)):
        fit_time, fit_values = time[first::2], values[first::2]
        degree = min(5, fit_time.size - 1)
        degree -= 1 - degree % 2  # an odd degree, so the spline needs no extra end conditions
        if degree < 1:
            continue
        spline = make_interp_spline(fit_time, fit_values, k=degree)
        inside = (time[second::2] > fit_time[0]) & (time[second::2] < fit_time[-1])
        residuals.append(spline(time[second::2][inside]) - values[second::2][inside])
    residuals = np.concatenate(residuals) if residuals else np.zeros(0)
    return float(np.sqrt(np.mean(residuals**2) / 2.0)) if residuals.size else 0.0


def _spline_dcdt(time: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Differentiate a quintic FITPACK smoothing spline whose smoothing comes from the estimated noise.

    The spline's residual sum of squares is at most s = T * sigma^2
    (the discrepancy principle), so noisy series are smoothed and
    noise-free series are nearly interpolated. Unlike the natural cubic
    spline of make_smoothing_spline, it puts no condition on the second
    derivative at the ends, which biased the end slopes of curved series.
    """
    from scipy.interpolate import UnivariateSpline

    sigma = estimate_noise(time, values)
    spline = UnivariateSpline(time, values, k=min(5, time.size - 1), s=time.size * sigma**2)
    return spline.derivative()(time)


def estimate_dcdt(time: np.ndarray, c: np.ndarray, method: str, smoothing: float | None, where: str) -> np.ndarray:
    """Estimate dc/dt of one experiment; ``c`` has shape (T, n) and the result too."""
    from scipy.interpolate import make_smoothing_spline

    if np.any(np.diff(time) <= 0):
        raise DataError(f"{where}: sample times must be distinct to estimate dc/dt; found repeated times.")
    if not np.all(np.isfinite(c)):
        raise DataError(f"{where}: concentrations contain NaN or infinite values. Remove or fill them before running.")
    if method == "finite_difference":
        if time.size < 3:
            raise DataError(f"{where}: finite differences need at least 3 time points, got {time.size}.")
        return np.gradient(c, time, axis=0, edge_order=2)
    if time.size < 5:
        raise DataError(f"{where}: a smoothing spline needs at least 5 time points, got {time.size}; use data.derivative.method=finite_difference.")
    if smoothing is None:
        return np.stack([_spline_dcdt(time, c[:, j]) for j in range(c.shape[1])], axis=1)  # T x n
    spline = make_smoothing_spline(time, c, lam=smoothing, axis=0)
    return spline.derivative()(time)


# ------------------------------------------------------------------- checks


def _check_concentrations(species: list[str], experiments: list, source: str, negative_tolerance: float) -> None:
    # Checked before dc/dt is estimated, so that the error names the bad value itself.
    for experiment, time, c, _ in experiments:
        check_samples(Samples(species, np.full(time.size, experiment), time, c, np.zeros_like(c), ""), source, negative_tolerance)


def check_samples(samples: Samples, source: str, negative_tolerance: float) -> None:
    """Reject NaN or infinite values and concentrations below -``negative_tolerance``."""
    for name, array in (("concentrations", samples.concentrations), ("dc/dt", samples.dcdt), ("time", samples.time)):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DataError(f"{source}: {name} contain {bad} NaN or infinite values. Remove or fill them before running.")
    if samples.concentrations.shape[0] == 0:
        raise DataError(f"{source} contains no samples.")
    low = float(samples.concentrations.min())
    if low < -negative_tolerance:
        row, col = np.unravel_index(int(np.argmin(samples.concentrations)), samples.concentrations.shape)
        raise DataError(
            f"{source}: negative concentration {low:g} of {samples.species[col]} (sample {row}, time {samples.time[row]:g}); "
            f"concentrations must be >= 0. Fix the data, or raise data.negative_tolerance (now {negative_tolerance:g}) if these are solver round-off."
        )


def match_species(samples: Samples, expected: list[str], source: str, expected_source: str) -> Samples:
    """Reorder the sample columns to ``expected`` species order; raise DataError on a mismatch."""
    if sorted(samples.species) != sorted(expected):
        missing = [s for s in expected if s not in samples.species]
        extra = [s for s in samples.species if s not in expected]
        raise DataError(f"{source}: species {samples.species} do not match {expected_source} {expected} (missing: {missing or 'none'}, unexpected: {extra or 'none'}). Rename the data columns or fix the mechanism.")
    order = [samples.species.index(s) for s in expected]
    return Samples(list(expected), samples.experiment, samples.time, samples.concentrations[:, order], samples.dcdt[:, order], samples.dcdt_method)


def split_rows(n_rows: int, validation_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices at random into (train, validation)."""
    order = rng.permutation(n_rows)
    n_validation = int(round(validation_fraction * n_rows))
    if n_rows - n_validation < 1:
        raise DataError(f"only {n_rows} samples: too few to keep {validation_fraction:g} of them for validation. Lower data.validation_fraction.")
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])
