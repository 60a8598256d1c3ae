"""Recipe dataclasses of ``mmtk discover-reactions`` and ``mmtk simulate-reactions``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from mmtk.core.errors import RecipeError
from mmtk.core.recipe import param


@dataclass
class SimulationRecipe:
    """Sampled initial conditions and the stiff solver that integrates them."""

    experiments: int = param(100, help="number of initial conditions (experiments)", min=1)
    grid: Literal["linear", "log"] = param("linear", help="time grid: linear from 0, or 0 followed by log-spaced times")
    t_end: float = param(1.0, help="last sample time", min=0.0, min_exclusive=True)
    t_start: float = param(1e-3, help="first non-zero time of the log grid", min=0.0, min_exclusive=True)
    points: int = param(10, help="sample times per experiment, t = 0 included", min=2)
    initial_low: float = param(0.0, help="initial concentrations are drawn U[initial_low, initial_high)", min=0.0)
    initial_high: float = param(1.0, help="upper end of the initial concentration range", min=0.0, min_exclusive=True)
    method: Literal["Radau", "BDF", "LSODA", "RK45", "DOP853"] = param("Radau", help="scipy.integrate.solve_ivp method")
    rtol: float = param(1e-3, help="solver relative tolerance", min=0.0, min_exclusive=True)
    atol: float = param(1e-6, help="solver absolute tolerance", min=0.0, min_exclusive=True)
    noise: float = param(0.0, help="multiply each dc/dt by 1 + U(-noise, noise)", min=0.0, max=1.0)

    def __post_init__(self) -> None:
        if self.initial_high <= self.initial_low:
            raise ValueError(f"initial_high ({self.initial_high}) must be above initial_low ({self.initial_low})")
        if self.grid == "log" and self.t_start >= self.t_end:
            raise ValueError(f"t_start ({self.t_start}) must be below t_end ({self.t_end}) for the log grid")


@dataclass
class DerivativeRecipe:
    """The dc/dt estimator for data files without dc/dt."""

    method: Literal["smoothing_spline", "finite_difference"] = param("smoothing_spline", help="smoothing_spline (scipy make_smoothing_spline) or finite_difference (numpy.gradient)")
    smoothing: Optional[float] = param(None, help="null: quintic smoothing spline smoothed to the estimated noise level; a number: penalty lam of scipy make_smoothing_spline (natural cubic)", min=0.0)


@dataclass
class DataRecipe:
    """Source of the (c, dc/dt) pairs and their train/validation split."""

    source: Literal["simulate", "file"] = param("simulate", help="simulate the mechanism, or read data.file")
    mechanism: Optional[str] = param(None, help="mechanism YAML path or bundled name to simulate; also the ground truth unless data.truth is set")
    simulation: SimulationRecipe = field(default_factory=SimulationRecipe)
    file: Optional[Path] = param(None, help="HDF5 (mmtk.reactions.trajectories/1) or CSV file with concentration time series")
    format: Literal["auto", "hdf5", "csv"] = param("auto", help="data file format; auto uses the file extension")
    truth: Optional[str] = param(None, help="ground-truth mechanism (path or bundled name) to compare the result with")
    derivative: DerivativeRecipe = field(default_factory=DerivativeRecipe)
    validation_fraction: float = param(0.2, help="fraction of samples held out for validation", min=0.0, max=0.9)
    negative_tolerance: float = param(1e-8, help="concentrations in [-negative_tolerance, 0) are accepted as round-off; lower ones are an error", min=0.0)

    def __post_init__(self) -> None:
        if self.source == "simulate" and self.mechanism is None:
            raise ValueError("data.source is 'simulate' but data.mechanism is not set; name a bundled mechanism such as hydrogen-oxidation or a YAML file")
        if self.source == "file" and self.file is None:
            raise ValueError("data.source is 'file' but data.file is not set; give the path of an HDF5 or CSV file")


@dataclass
class FreezeRecipe:
    """Cadence and thresholds of the partial-parameters freezing schedule (published values)."""

    check_every: int = param(10_000, help="epochs between freeze checks", min=1)
    stall_lag: int = param(1_000, help="a partial freeze needs the loss this many epochs earlier to be lower than now", min=1)
    partial_tolerance: float = param(0.05, help="a column joins the integer set when every entry is this close to an integer", min=0.0, max=0.5)
    full_tolerance: float = param(1e-3, help="W is rounded and frozen when every entry is this close to an integer", min=0.0, max=0.5)
    reinit_range: float = param(2.0, help="columns outside the integer set are redrawn U(-reinit_range, reinit_range)", min=0.0, min_exclusive=True)
    duplicate_low: float = param(0.0, help="duplicate integer columns are redrawn U(duplicate_low, duplicate_high)")
    duplicate_high: float = param(1.0, help="upper end of the duplicate redraw range")
    reset_rates: bool = param(False, help="also redraw b_f and b_r of redrawn columns U(-init_range, init_range)")
    full_requires_distinct: bool = param(False, help="freeze W only when no column is all zeros or a duplicate (equal or negated) of another; off in the published rule")

    def __post_init__(self) -> None:
        if self.duplicate_high <= self.duplicate_low:
            raise ValueError(f"duplicate_high ({self.duplicate_high}) must be above duplicate_low ({self.duplicate_low})")


@dataclass
class TrainRecipe:
    """Adam on the MSE of dc/dt, with restarts."""

    reactions: int = param(help="number of reactions R (columns of W) to learn", min=1)
    epochs: int = param(1_000_000, help="maximum full-batch Adam epochs per restart", min=1)
    lr: float = param(1e-3, help="Adam learning rate", min=0.0, min_exclusive=True)
    penalty: float = param(1e-8, help="weight of the L1 + L2 penalty on all parameters, dropped once W is frozen", min=0.0)
    init_range: float = param(0.5, help="parameters start U(-init_range, init_range)", min=0.0, min_exclusive=True)
    restarts: int = param(1, help="independent restarts (seeds seed, seed+1, ...); the lowest training loss wins", min=1)
    backend: Literal["auto", "numpy", "torch"] = param("auto", help="numpy (hand-derived gradient, CPU only) or torch (autograd, any device); auto picks numpy on cpu")
    freeze: FreezeRecipe = field(default_factory=FreezeRecipe)
    log_every: int = param(10_000, help="epochs between metric records and log lines", min=1)
    checkpoint_every: int = param(50_000, help="epochs between checkpoints", min=1)


@dataclass
class RateFitRecipe:
    """The rate-only fit after W is frozen."""

    method: Literal["least_squares", "adam"] = param("least_squares", help="least_squares: scipy trust-region fit of the log-rates right after the freeze; adam: keep training the rates with Adam up to train.epochs")
    max_evaluations: int = param(200, help="least_squares: maximum function evaluations", min=1)
    tolerance: float = param(1e-15, help="least_squares: ftol, xtol and gtol", min=0.0, min_exclusive=True)


@dataclass
class DiscoverRecipe:
    """``mmtk discover-reactions``: PPF discovery of a mass-action mechanism."""

    train: TrainRecipe
    seed: int = param(1, help="seed of data sampling, the split and the initialisation")
    device: str = param("cpu", help="torch device for the torch backend (cpu, cuda, cuda:1)")
    data: DataRecipe = field(default_factory=lambda: DataRecipe(mechanism="hydrogen-oxidation"))
    rate_fit: RateFitRecipe = field(default_factory=RateFitRecipe)


@dataclass
class SimulateRecipe:
    """``mmtk simulate-reactions``: trajectories and exact dc/dt of a mechanism."""

    mechanism: str = param(help="mechanism YAML path or bundled name (hydrogen-oxidation, michaelis-menten, linear-chain)")
    seed: int = param(1, help="seed of the initial-condition sampling")
    device: str = param("cpu", help="cpu (or auto, which means cpu here): the simulation runs scipy's solve_ivp on the CPU")
    simulation: SimulationRecipe = field(default_factory=SimulationRecipe)


def check_device(recipe: DiscoverRecipe) -> None:
    """Raise RecipeError for an invalid torch device or a device the numpy backend cannot use."""
    import torch

    try:
        torch.device(recipe.device)
    except RuntimeError as exc:
        raise RecipeError(f"recipe key 'device': invalid torch device {recipe.device!r} ({exc}); use cpu, cuda or cuda:N.") from None
    if recipe.train.backend == "numpy" and recipe.device != "cpu":
        raise RecipeError(f"train.backend 'numpy' runs on the CPU only, but device is {recipe.device!r}; use train.backend=torch or auto.")


def check_simulate_device(recipe: SimulateRecipe) -> None:
    """Raise RecipeError unless the device is auto or a CPU device, the only one scipy's solvers use."""
    import torch

    if recipe.device == "auto":
        return
    try:
        device = torch.device(recipe.device)
    except RuntimeError as exc:
        raise RecipeError(f"recipe key 'device': invalid torch device {recipe.device!r} ({exc}); use cpu.") from None
    if device.type != "cpu":
        raise RecipeError(f"simulate-reactions integrates with scipy's solve_ivp on the CPU, so device must be cpu, not {recipe.device!r}. Drop --device or pass --device cpu.")
