"""Simulation of mass-action mechanisms from sampled initial conditions.

Trajectories come from ``scipy.integrate.solve_ivp`` with a stiff method
(Radau by default, with SciPy's default tolerances rtol 1e-3 and atol 1e-6).
The targets dc/dt are the mechanism's right-hand side evaluated at the
returned states, not finite differences, so every (c, dc/dt) pair is exactly
consistent with the mechanism and solver error only moves where the samples
lie.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.integrate import solve_ivp

from mmtk.core.errors import MmtkError
from mmtk.core.logging import get_logger
from mmtk.reactions.mechanism import Mechanism

log = get_logger(__name__)


@dataclass
class Trajectories:
    """Concentration time series of several experiments over one time grid.

    ``time`` has shape (n_experiments, n_times) in the mechanism's time unit;
    ``concentrations`` and ``dcdt`` have shape (n_experiments, n_times, n_species).
    ``dcdt_method`` names how dc/dt was obtained ("exact" for the true right-hand side).
    ``solver_stats`` has one mapping per simulated experiment (see :func:`simulate`);
    it is empty for trajectories read from a file.
    """

    species: list[str]
    time: np.ndarray
    concentrations: np.ndarray
    dcdt: np.ndarray
    dcdt_method: str = "exact"
    solver_stats: list[dict[str, Any]] = field(default_factory=list)


def time_grid(kind: str, t_end: float, points: int, t_start: float = 1e-3) -> np.ndarray:
    """Return the sample times: ``linear`` is linspace(0, t_end, points) with t = 0 included,
    ``log`` is [0] followed by logspace(log10 t_start, log10 t_end, points - 1)."""
    if kind == "linear":
        return np.linspace(0.0, t_end, points)
    if kind == "log":
        return np.concatenate([[0.0], np.logspace(np.log10(t_start), np.log10(t_end), points - 1)])
    raise ValueError(f"unknown time grid {kind!r}; use 'linear' or 'log'")


def simulate(
    mechanism: Mechanism,
    times: np.ndarray,
    n_experiments: int,
    rng: np.random.Generator,
    initial_low: float = 0.0,
    initial_high: float = 1.0,
    method: str = "Radau",
    rtol: float = 1e-3,
    atol: float = 1e-6,
    noise: float = 0.0,
) -> Trajectories:
    """Integrate the mechanism from ``n_experiments`` initial states drawn U[low, high).

    With ``noise`` = l > 0, every dc/dt value is multiplied by 1 + U(-l, l).
    The result's ``solver_stats`` gives, per experiment, the initial state
    ``c0`` and solve_ivp's counts of right-hand-side evaluations (``nfev``),
    Jacobian evaluations (``njev``) and LU decompositions (``nlu``).
    Raises MmtkError when the solver fails.
    """
    n = mechanism.n_species
    initial = rng.uniform(initial_low, initial_high, size=(n_experiments, n))  # E x n
    stiff = method in ("Radau", "BDF", "LSODA")
    jac = (lambda t, c: mechanism.jacobian(c)) if stiff else None

    states = np.empty((n_experiments, times.size, n))  # E x T x n
    solver_stats = []
    for e in range(n_experiments):
        solution = solve_ivp(lambda t, c: mechanism.rhs(c), (times[0], times[-1]), initial[e], method=method, t_eval=times, rtol=rtol, atol=atol, jac=jac)
        if not solution.success:
            raise MmtkError(f"solve_ivp ({method}) failed on experiment {e} from c0={initial[e].tolist()}: {solution.message}. Try method=Radau or tighter tolerances.")
        states[e] = solution.y.T
        stats = {"experiment": e, "c0": initial[e].tolist(), "nfev": int(solution.nfev), "njev": int(solution.njev), "nlu": int(solution.nlu)}
        solver_stats.append(stats)
        log.debug("experiment %d: %s from c0=%s took %d right-hand-side evaluations, %d Jacobian evaluations and %d LU decompositions", e, method, np.array2string(initial[e], precision=4), stats["nfev"], stats["njev"], stats["nlu"])

    dcdt = mechanism.rhs(states)  # E x T x n
    if noise > 0:
        dcdt = dcdt * (1.0 + rng.uniform(-noise, noise, size=dcdt.shape))
    log.info("simulated %d experiments of %s at %d times with %s (rtol %g, atol %g)", n_experiments, mechanism.name, times.size, method, rtol, atol)
    time = np.broadcast_to(times, (n_experiments, times.size)).copy()
    dcdt_method = "exact" if noise == 0 else f"exact with multiplicative noise U(-{noise}, {noise})"
    return Trajectories(species=list(mechanism.species), time=time, concentrations=states, dcdt=dcdt, dcdt_method=dcdt_method, solver_stats=solver_stats)
