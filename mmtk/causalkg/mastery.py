"""Skill mastery models: from item responses to per-student skill mastery.

Every model implements :class:`MasteryModel`, so the pipeline can swap the
DINA model for another cognitive-diagnosis model by name
(:data:`MASTERY_MODELS`).

DINA (deterministic input, noisy "and" gate; Junker and Sijtsma 2001; EM as
in de la Torre 2009): student i has a binary skill profile alpha_i. Item j
is answered correctly with probability 1 - s_j when alpha_i contains every
skill the Q-matrix row q_j requires (eta_ij = 1) and with probability g_j
otherwise, where s_j is the slip and g_j the guess parameter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from mmtk.core.errors import DataError
from mmtk.core.logging import get_logger

log = get_logger(__name__)


def all_profiles(n_skills: int) -> np.ndarray:
    """Return every binary skill profile as an int array (2^K x K), profile c = bits of c."""
    codes = np.arange(2**n_skills)
    return ((codes[:, None] >> np.arange(n_skills)[None, :]) & 1).astype(np.int64)  # (C, K)


def _log_sum_exp(values: np.ndarray, axis: int) -> np.ndarray:
    peak = values.max(axis=axis, keepdims=True)
    return peak + np.log(np.exp(values - peak).sum(axis=axis, keepdims=True))


class MasteryModel(ABC):
    """A model that estimates P(student masters skill) from item responses."""

    name: str = ""

    @abstractmethod
    def fit(self, responses: np.ndarray, q_matrix: np.ndarray) -> "MasteryModel":
        """Fit to ``responses`` (students x items, 0/1/NaN) and ``q_matrix`` (items x skills)."""

    @abstractmethod
    def mastery_probabilities(self, responses: np.ndarray) -> np.ndarray:
        """Return P(mastered) as floats (students x skills) for the fitted model."""

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """Return the fitted parameters as JSON-safe values (see :meth:`from_parameters`)."""

    @classmethod
    @abstractmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> "MasteryModel":
        """Rebuild a fitted model from :meth:`parameters` output."""


class DINA(MasteryModel):
    """DINA model fitted with EM over all 2^K profiles.

    With ``prior_smoothing`` 0 this is marginal maximum likelihood. A positive
    value adds that pseudo-count to every profile's expected count in the
    M-step, which is the MAP estimate of the profile prior under a symmetric
    Dirichlet(1 + prior_smoothing) prior. Slip and guess are clipped to
    [1e-4, 1 - 1e-4] after every M-step, so no response has probability 0.

    Args:
        max_iter: maximum EM iterations (default 500).
        tol: stop when the log-likelihood gains less than this (nats, default 1e-6).
        init_slip, init_guess: starting values of every s_j and g_j (default 0.2).
        prior_smoothing: pseudo-count added to each profile's count when
            updating the profile prior (default 0.01), so no profile gets
            probability 0; 0 gives the maximum-likelihood update.
    """

    name = "dina"

    def __init__(self, max_iter: int = 500, tol: float = 1e-6, init_slip: float = 0.2, init_guess: float = 0.2, prior_smoothing: float = 0.01) -> None:
        self.max_iter = max_iter
        self.tol = tol
        self.init_slip = init_slip
        self.init_guess = init_guess
        self.prior_smoothing = prior_smoothing
        self.q_matrix: np.ndarray | None = None
        self.slip: np.ndarray | None = None
        self.guess: np.ndarray | None = None
        self.profile_prior: np.ndarray | None = None
        self.log_likelihood: float = float("nan")
        self.n_iter: int = 0

    # ----------------------------------------------------------- internals

    def _eta(self) -> np.ndarray:
        profiles = all_profiles(self.q_matrix.shape[1])  # (C, K)
        required = self.q_matrix.sum(axis=1)  # (J,)
        return (profiles @ self.q_matrix.T == required[None, :]).T  # (J, C)

    def _profile_log_likelihood(self, responses: np.ndarray, eta: np.ndarray) -> np.ndarray:
        observed = np.isfinite(responses).astype(np.float64)  # (N, J)
        correct = np.where(observed > 0, responses, 0.0)  # (N, J)
        p_correct = np.where(eta, 1.0 - self.slip[:, None], self.guess[:, None])  # (J, C)
        return correct @ np.log(p_correct) + (observed - correct) @ np.log1p(-p_correct)  # (N, C)

    def _posterior(self, responses: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, float]:
        # Without smoothing a profile's prior can reach 0, whose log is -inf; such a profile gets posterior 0.
        with np.errstate(divide="ignore"):
            log_prior = np.log(self.profile_prior)  # (C,)
        joint = self._profile_log_likelihood(responses, eta) + log_prior[None, :]  # (N, C)
        evidence = _log_sum_exp(joint, axis=1)  # (N, 1)
        return np.exp(joint - evidence), float(evidence.sum())

    # -------------------------------------------------------------- public

    def fit(self, responses: np.ndarray, q_matrix: np.ndarray) -> "DINA":
        # The matrices are small, so threaded BLAS only adds contention (20x slower on two busy cores).
        with threadpool_limits(limits=1, user_api="blas"):
            return self._fit(responses, q_matrix)

    def _fit(self, responses: np.ndarray, q_matrix: np.ndarray) -> "DINA":
        self.q_matrix = np.asarray(q_matrix, dtype=np.int64)
        n_items, n_skills = self.q_matrix.shape
        n_profiles = 2**n_skills
        self.slip = np.full(n_items, self.init_slip)
        self.guess = np.full(n_items, self.init_guess)
        self.profile_prior = np.full(n_profiles, 1.0 / n_profiles)

        eta = self._eta()  # (J, C)
        observed = np.isfinite(responses).astype(np.float64)  # (N, J)
        correct = np.where(observed > 0, responses, 0.0)  # (N, J)
        previous = -np.inf
        converged = False
        for iteration in range(1, self.max_iter + 1):
            # E-step: posterior over profiles for every student.
            posterior, log_likelihood = self._posterior(responses, eta)  # (N, C)

            # M-step: expected correct answers and attempts per item and profile.
            expected_correct = correct.T @ posterior  # (J, C)
            expected_attempts = observed.T @ posterior  # (J, C)
            correct_with = (expected_correct * eta).sum(axis=1)
            attempts_with = (expected_attempts * eta).sum(axis=1)
            correct_without = (expected_correct * ~eta).sum(axis=1)
            attempts_without = (expected_attempts * ~eta).sum(axis=1)
            self.slip = np.clip(1.0 - correct_with / np.maximum(attempts_with, 1e-12), 1e-4, 1 - 1e-4)
            self.guess = np.clip(correct_without / np.maximum(attempts_without, 1e-12), 1e-4, 1 - 1e-4)
            counts = posterior.sum(axis=0) + self.prior_smoothing
            self.profile_prior = counts / counts.sum()

            self.n_iter = iteration
            self.log_likelihood = log_likelihood
            if log_likelihood - previous < self.tol:
                converged = True
                break
            previous = log_likelihood

        # The log-likelihood of the last M-step's parameters; its gain over the last E-step shows how far EM was from converging.
        _, self.log_likelihood = self._posterior(responses, eta)
        if not converged:
            log.warning("DINA EM stopped after max_iter=%d iterations without converging: the last iteration raised the log-likelihood by %.3g nats (tol %.3g). Raise mastery.max_iter.", self.max_iter, self.log_likelihood - log_likelihood, self.tol)
        log.info("DINA fitted in %d EM iterations, log-likelihood %.2f", self.n_iter, self.log_likelihood)
        return self

    def mastery_probabilities(self, responses: np.ndarray) -> np.ndarray:
        if self.slip is None:
            raise RuntimeError("DINA.mastery_probabilities called before fit")
        responses = np.atleast_2d(np.asarray(responses, dtype=np.float64))
        if responses.shape[1] != self.q_matrix.shape[0]:
            raise DataError(f"responses have {responses.shape[1]} items but the DINA model was fitted on {self.q_matrix.shape[0]}.")
        with threadpool_limits(limits=1, user_api="blas"):
            posterior, _ = self._posterior(responses, self._eta())  # (N, C)
        return posterior @ all_profiles(self.q_matrix.shape[1])  # (N, K)

    def parameters(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "q_matrix": self.q_matrix.tolist(),
            "slip": self.slip.tolist(),
            "guess": self.guess.tolist(),
            "profile_prior": self.profile_prior.tolist(),
            "log_likelihood": self.log_likelihood,
            "n_iter": self.n_iter,
        }

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> "DINA":
        model = cls()
        model.q_matrix = np.asarray(parameters["q_matrix"], dtype=np.int64)
        model.slip = np.asarray(parameters["slip"], dtype=np.float64)
        model.guess = np.asarray(parameters["guess"], dtype=np.float64)
        model.profile_prior = np.asarray(parameters["profile_prior"], dtype=np.float64)
        model.log_likelihood = float(parameters.get("log_likelihood", float("nan")))
        model.n_iter = int(parameters.get("n_iter", 0))
        return model


class CorrectShareRule(MasteryModel):
    """Rule of thumb: the share of correct answers on the items that need each skill.

    The returned "probability" is that share, so a student counts as a master
    at the usual threshold 0.8 when at least 80% of those items are correct.
    It has no parameters beyond the Q-matrix.
    """

    name = "correct-share"

    def __init__(self) -> None:
        self.q_matrix: np.ndarray | None = None

    def fit(self, responses: np.ndarray, q_matrix: np.ndarray) -> "CorrectShareRule":
        self.q_matrix = np.asarray(q_matrix, dtype=np.int64)
        return self

    def mastery_probabilities(self, responses: np.ndarray) -> np.ndarray:
        responses = np.atleast_2d(np.asarray(responses, dtype=np.float64))
        observed = np.isfinite(responses).astype(np.float64)  # (N, J)
        correct = np.where(observed > 0, responses, 0.0)  # (N, J)
        attempted = observed @ self.q_matrix  # (N, K)
        # A student who answered none of a skill's items gets 0.5 (no information).
        return np.where(attempted > 0, (correct @ self.q_matrix) / np.maximum(attempted, 1), 0.5)  # (N, K)

    def parameters(self) -> dict[str, Any]:
        return {"model": self.name, "q_matrix": self.q_matrix.tolist()}

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> "CorrectShareRule":
        model = cls()
        model.q_matrix = np.asarray(parameters["q_matrix"], dtype=np.int64)
        return model


MASTERY_MODELS: dict[str, type[MasteryModel]] = {DINA.name: DINA, CorrectShareRule.name: CorrectShareRule}


def mastery_model_from_parameters(parameters: dict[str, Any]) -> MasteryModel:
    """Rebuild the fitted mastery model stored in a network file."""
    name = parameters.get("model")
    if name not in MASTERY_MODELS:
        raise DataError(f"unknown mastery model {name!r} in the network file; known models: {', '.join(MASTERY_MODELS)}.")
    return MASTERY_MODELS[name].from_parameters(parameters)
