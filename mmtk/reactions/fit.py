"""Rate-only fit for a fixed integer stoichiometry: least squares on the log-rates.

Once W is frozen the loss depends on b_f and b_r only, so the remaining Adam
epochs can be replaced by a second-order solver on the same objective:
``scipy.optimize.least_squares`` (trust-region reflective) with the analytic
Jacobian, started from the Adam log-rates. The residuals are scaled so that
their sum of squares equals the MSE on dc/dt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from mmtk.core.logging import get_logger
from mmtk.reactions.model import log_concentrations, predict_dcdt

log = get_logger(__name__)

# Log-rates are kept above log(1e-300) so that an irreversible reaction's
# vanishing reverse rate stays a finite float64.
_LOG_RATE_FLOOR = np.log(1e-300)


@dataclass
class RateFitResult:
    """Fitted log-rates (R,) each, the final MSE, and the solver's status text."""

    log_forward: np.ndarray
    log_reverse: np.ndarray
    mse: float
    evaluations: int
    message: str


def fit_rates(W: np.ndarray, concentrations: np.ndarray, dcdt: np.ndarray, log_forward: np.ndarray, log_reverse: np.ndarray, max_evaluations: int = 200, tolerance: float = 1e-15) -> RateFitResult:
    """Minimise the MSE on dc/dt over (b_f, b_r) for the fixed matrix W (n x R)."""
    W = np.asarray(W, dtype=np.float64)
    n, R = W.shape
    log_c = log_concentrations(concentrations)  # B x n
    target = np.asarray(dcdt, dtype=np.float64)  # B x n
    scale = 1.0 / np.sqrt(target.size)
    base = log_c @ np.concatenate([np.maximum(-W, 0.0), np.maximum(W, 0.0)], axis=1)  # B x 2R

    def fluxes(b: np.ndarray) -> np.ndarray:
        return np.exp(base + b)  # B x 2R

    def residuals(b: np.ndarray) -> np.ndarray:
        z = fluxes(b)
        prediction = (z[:, :R] - z[:, R:]) @ W.T  # B x n
        return ((prediction - target) * scale).ravel()

    def jacobian(b: np.ndarray) -> np.ndarray:
        z = fluxes(b)
        # d prediction[s, i] / d b_f[r] = z_f[s, r] W[i, r], and minus z_r[s, r] W[i, r] for b_r.
        forward = z[:, None, :R] * W[None, :, :]  # B x n x R
        reverse = -z[:, None, R:] * W[None, :, :]  # B x n x R
        return np.concatenate([forward, reverse], axis=2).reshape(-1, 2 * R) * scale

    start = np.maximum(np.concatenate([log_forward, log_reverse]), _LOG_RATE_FLOOR + 1.0)
    bounds = (np.full(2 * R, _LOG_RATE_FLOOR), np.full(2 * R, np.inf))
    # An unconverged (rounded) W can overflow exp in trial steps; the solver rejects those steps.
    with np.errstate(over="ignore", invalid="ignore"):
        solution = least_squares(
            residuals, start, jac=jacobian, bounds=bounds, method="trf", x_scale="jac", ftol=tolerance, xtol=tolerance, gtol=tolerance, max_nfev=max_evaluations
        )
    mse = float(np.sum(solution.fun**2))
    log.info("rate fit: MSE %.4g after %d evaluations (%s)", mse, solution.nfev, solution.message)
    return RateFitResult(log_forward=solution.x[:R].copy(), log_reverse=solution.x[R:].copy(), mse=mse, evaluations=int(solution.nfev), message=str(solution.message))


def mse(W: np.ndarray, log_forward: np.ndarray, log_reverse: np.ndarray, concentrations: np.ndarray, dcdt: np.ndarray) -> float:
    """Return the MSE on dc/dt of the layer (W, b_f, b_r), without penalty."""
    residual = predict_dcdt(concentrations, W, log_forward, log_reverse) - dcdt
    return float(np.mean(residual**2))
