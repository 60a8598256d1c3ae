"""The power-law regression toy that shows why freezing helps on multiscale problems.

Model: y = c_1 x^{p_1} + c_2 x^{p_2} with known c = (1, 100) and true
p = (1, 2), on 1000 points x ~ U(0, 1). Only p is learned, with full-batch
Adam on the MSE. The large term fits first and plain training stalls with
p_1 far from 1. At multiples of ``check_every`` epochs, when the loss is not
lower than ``stall_lag`` epochs earlier, every p_i within ``tolerance`` of an
integer is rounded and frozen, which frees the small term to fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ToyResult:
    """Final exponents, the epoch each exponent was frozen (None if never) and the loss per epoch."""

    exponents: np.ndarray
    frozen_epochs: list[int | None]
    losses: np.ndarray
    history: list[tuple[int, float, float]] = field(default_factory=list)


def fit_power_law_toy(
    epochs: int = 200_000,
    lr: float = 1e-4,
    seed: int = 0,
    check_every: int = 10_000,
    stall_lag: int = 100,
    tolerance: float = 0.05,
    initial_exponents: tuple[float, float] | None = None,
) -> ToyResult:
    """Fit p of y = x^{p_1} + 100 x^{p_2} with Adam and integer freezing; defaults are the published ones.

    Without ``initial_exponents`` the start is drawn U(0, 4) from ``seed``.
    NOTE: the initial distribution of the reference toy is not recorded; U(0, 4) is our choice.
    """
    rng = np.random.default_rng(seed)
    coefficients = np.array([1.0, 100.0])
    x = rng.uniform(0.0, 1.0, size=1000)
    y = coefficients[0] * x + coefficients[1] * x**2
    log_x = np.log(x)
    p = np.array(initial_exponents, dtype=np.float64) if initial_exponents is not None else rng.uniform(0.0, 4.0, size=2)

    frozen = np.zeros(2, dtype=bool)
    frozen_epochs: list[int | None] = [None, None]
    m = np.zeros(2)
    v = np.zeros(2)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    losses = np.empty(epochs)
    history = []
    for epoch in range(epochs):
        powers = x[:, None] ** p[None, :]  # N x 2
        residual = powers @ coefficients - y  # N
        losses[epoch] = float(residual @ residual) / x.size
        grad = 2.0 * (residual[:, None] * coefficients * powers * log_x[:, None]).mean(axis=0)  # 2
        grad[frozen] = 0.0

        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        step = epoch + 1
        update = lr / (1 - beta1**step) * m / (np.sqrt(v) / np.sqrt(1 - beta2**step) + eps)
        p = np.where(frozen, p, p - update)

        if epoch > 0 and epoch % check_every == 0:
            history.append((epoch, float(p[0]), float(p[1])))
            if epoch >= stall_lag and losses[epoch] >= losses[epoch - stall_lag]:
                near = (np.abs(p - np.rint(p)) <= tolerance) & ~frozen
                for i in np.flatnonzero(near):
                    frozen_epochs[i] = epoch
                p = np.where(near, np.rint(p), p)
                frozen |= near
    return ToyResult(exponents=p, frozen_epochs=frozen_epochs, losses=losses, history=history)
