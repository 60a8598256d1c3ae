"""PPF training: Adam on dc/dt with progressive rounding and freezing of W's columns.

Schedule (defaults are the published values, epochs counted from 0):

- After every Adam step the columns in the integer set S are rounded.
- Partial-freeze check, at multiples of ``check_every`` (10,000) above
  ``check_every``. It runs only when the loss ``stall_lag`` (1,000) epochs
  earlier was lower than now. Columns within ``partial_tolerance`` (0.05) of
  a non-zero integer column are rounded and form S. Later duplicates of an
  integer column (equal or negated) leave S and are redrawn U(0, 1). Every
  other column outside S is redrawn U(-2, 2).
- Full-freeze check, at every multiple of ``check_every``, after the partial
  check of the same epoch, so a partial check that completes S freezes W at
  once. When every entry of W is within ``full_tolerance`` (1e-3) of an
  integer, W is rounded and fixed and the penalty is dropped. From then on
  only b_f and b_r train. With ``full_requires_distinct`` (not part of the
  published rule, default off) the freeze also waits until no column is all
  zeros or a duplicate of another.
- The loss of an epoch is evaluated before that epoch's update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mmtk.core.logging import get_logger
from mmtk.reactions.model import MassActionBackend, OptimizerState, StopCheck, unpack

log = get_logger(__name__)


@dataclass
class FreezeSettings:
    """Thresholds and cadence of the PPF schedule (epochs, absolute distances to integers)."""

    check_every: int = 10_000
    stall_lag: int = 1_000
    partial_tolerance: float = 0.05
    full_tolerance: float = 1e-3
    reinit_range: float = 2.0
    duplicate_range: tuple[float, float] = (0.0, 1.0)
    reset_rates: bool = False
    init_range: float = 0.5
    full_requires_distinct: bool = False


# ------------------------------------------------------------- freeze rules


def near_integer_columns(W: np.ndarray, tolerance: float) -> np.ndarray:
    """Return a bool per column: every entry is within ``tolerance`` of an integer."""
    return np.all(np.abs(W - np.rint(W)) <= tolerance, axis=0)


def fully_integer(W: np.ndarray, tolerance: float) -> bool:
    """Return True when every entry of W is within ``tolerance`` of an integer."""
    return bool(np.all(np.abs(W - np.rint(W)) <= tolerance))


def duplicate_columns(W: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Return a bool per column: an integer column equal or opposite to an earlier one in ``columns``."""
    duplicate = np.zeros(W.shape[1], dtype=bool)
    distinct: list[np.ndarray] = []
    for r in np.flatnonzero(columns):
        column = W[:, r]
        if any(np.array_equal(column, other) or np.array_equal(column, -other) for other in distinct):
            duplicate[r] = True
        else:
            distinct.append(column)
    return duplicate


def degenerate_columns(W: np.ndarray) -> np.ndarray:
    """Return a bool per column of an integer W: all zeros, or a duplicate of an earlier column."""
    nonzero = np.any(W != 0, axis=0)
    return ~nonzero | duplicate_columns(W, nonzero)


@dataclass
class PartialFreezeResult:
    """Outcome of one partial-freeze check: the new integer set and the redrawn columns."""

    integer_columns: np.ndarray
    duplicates: np.ndarray
    reinitialised: np.ndarray


def partial_freeze(W: np.ndarray, rng: np.random.Generator, settings: FreezeSettings) -> PartialFreezeResult:
    """Apply the partial-freeze rule to W in place; return the new integer set.

    Columns within ``partial_tolerance`` of an integer column that is not all
    zeros are rounded and join the set. A later duplicate (equal or negated)
    of such a column leaves the set and is redrawn U(duplicate_range). Every
    other column outside the set is redrawn U(-reinit_range, reinit_range).
    """
    n = W.shape[0]
    candidates = near_integer_columns(W, settings.partial_tolerance) & np.any(np.rint(W) != 0, axis=0)
    W[:, candidates] = np.rint(W[:, candidates])
    duplicates = duplicate_columns(W, candidates)
    integer_columns = candidates & ~duplicates
    reinitialised = ~integer_columns & ~duplicates

    # Draw in column order so a run is reproducible from its seed.
    low, high = settings.duplicate_range
    for r in range(W.shape[1]):
        if duplicates[r]:
            W[:, r] = rng.uniform(low, high, size=n)
        elif reinitialised[r]:
            W[:, r] = rng.uniform(-settings.reinit_range, settings.reinit_range, size=n)
    return PartialFreezeResult(integer_columns=integer_columns, duplicates=duplicates, reinitialised=reinitialised)


# ----------------------------------------------------------------- training


@dataclass
class RestartState:
    """Everything that a restart needs to continue exactly: parameters, Adam, schedule, RNG, losses."""

    restart: int
    optimizer: OptimizerState
    integer_columns: np.ndarray
    rng: np.random.Generator
    epoch: int = 0
    frozen: bool = False
    frozen_epoch: int | None = None
    losses: list[np.ndarray] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def loss_history(self) -> np.ndarray:
        """Return the loss of every epoch run so far (float64, length ``epoch``)."""
        if len(self.losses) > 1:
            self.losses = [np.concatenate(self.losses)]
        return self.losses[0] if self.losses else np.empty(0)


def new_restart(restart: int, seed: int, n_species: int, n_reactions: int, init_range: float) -> RestartState:
    """Initialise W, b_f, b_r ~ U(-init_range, init_range) from the generator of (seed, restart)."""
    rng = np.random.default_rng([seed, restart])
    size = n_species * n_reactions + 2 * n_reactions
    theta = rng.uniform(-init_range, init_range, size=size)
    optimizer = OptimizerState(theta=theta, exp_avg=np.zeros(size), exp_avg_sq=np.zeros(size))
    return RestartState(restart=restart, optimizer=optimizer, integer_columns=np.zeros(n_reactions, dtype=bool), rng=rng)


class PPFTrainer:
    """Runs the PPF schedule on one restart, in chunks between schedule events.

    ``on_event(state, epoch)`` is called after the epoch's checks at every
    multiple of ``event_every`` (logging, progress, checkpoints); it may
    return True to stop. ``stop_after_freeze`` ends the Adam phase as soon as
    W is frozen (when a separate rate fit follows).
    """

    def __init__(
        self,
        backend: MassActionBackend,
        n_species: int,
        n_reactions: int,
        settings: FreezeSettings,
        epochs: int,
        stop_after_freeze: bool,
        event_every: int = 1_000,
    ) -> None:
        self.backend = backend
        self.n_species = n_species
        self.n_reactions = n_reactions
        self.settings = settings
        self.epochs = epochs
        self.stop_after_freeze = stop_after_freeze
        self.event_every = event_every

    def finished(self, state: RestartState) -> bool:
        return state.epoch >= self.epochs or (state.frozen and self.stop_after_freeze)

    def run(self, state: RestartState, stop: StopCheck | None = None, on_event: Callable[[RestartState, int], None] | None = None) -> bool:
        """Run until the epoch limit, the freeze (with ``stop_after_freeze``) or a stop request.

        Returns True when the restart finished, False when it stopped early.
        """
        check_every = self.settings.check_every
        while not self.finished(state):
            if stop is not None and stop.requested:
                return False
            last = min(_next_multiple(state.epoch, check_every), _next_multiple(state.epoch, self.event_every), self.epochs - 1)
            count = last - state.epoch + 1
            losses = self.backend.run(state.optimizer, count, state.integer_columns, state.frozen, stop)
            state.losses.append(losses)
            state.epoch += losses.size
            if losses.size < count:
                return False

            if last % check_every == 0:
                self.check(state, last)
            if on_event is not None and last % self.event_every == 0:
                on_event(state, last)
        return True

    def check(self, state: RestartState, epoch: int) -> None:
        """Run the partial- and then the full-freeze check after the update of ``epoch``."""
        if state.frozen:
            return
        self.partial_check(state, epoch)
        self.full_check(state, epoch)

    def partial_check(self, state: RestartState, epoch: int) -> None:
        """Round, deduplicate and redraw W's columns when the loss has stalled."""
        settings = self.settings
        if epoch <= settings.check_every or epoch < settings.stall_lag:
            return
        losses = state.loss_history()
        if not losses[epoch - settings.stall_lag] < losses[epoch]:
            return
        W, b_f, b_r = unpack(state.optimizer.theta, self.n_species, self.n_reactions)
        result = partial_freeze(W, state.rng, settings)
        redrawn = result.duplicates | result.reinitialised
        if settings.reset_rates and redrawn.any():
            size = int(redrawn.sum())
            b_f[redrawn] = state.rng.uniform(-settings.init_range, settings.init_range, size=size)
            b_r[redrawn] = state.rng.uniform(-settings.init_range, settings.init_range, size=size)
        state.integer_columns = result.integer_columns
        members = np.flatnonzero(result.integer_columns).tolist()
        state.events.append({"epoch": epoch, "event": "partial_freeze", "loss": float(losses[epoch]), "integer_set": members, "duplicates": np.flatnonzero(result.duplicates).tolist()})
        log.info("restart %d epoch %d: loss stalled (%.4g >= %.4g); integer set %s, %d columns redrawn", state.restart, epoch, losses[epoch], losses[epoch - settings.stall_lag], members, int(redrawn.sum()))

    def full_check(self, state: RestartState, epoch: int) -> None:
        """Round and fix W when every entry is within ``full_tolerance`` of an integer."""
        W, _, _ = unpack(state.optimizer.theta, self.n_species, self.n_reactions)
        if not fully_integer(W, self.settings.full_tolerance):
            return
        if self.settings.full_requires_distinct and degenerate_columns(np.rint(W)).any():
            log.info("restart %d epoch %d: W is integer but has all-zero or duplicate columns; not frozen", state.restart, epoch)
            return
        W[:] = np.rint(W)
        state.frozen = True
        state.frozen_epoch = epoch
        state.integer_columns[:] = True
        state.events.append({"epoch": epoch, "event": "full_freeze", "loss": float(state.loss_history()[epoch])})
        log.info("restart %d epoch %d: every entry of W is within %g of an integer; W is rounded and frozen", state.restart, epoch, self.settings.full_tolerance)


def _next_multiple(epoch: int, every: int) -> int:
    return ((epoch + every - 1) // every) * every
