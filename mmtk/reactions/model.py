"""The mass-action layer, its MSE loss on dc/dt and the gradient, in numpy and in torch.

Parameters for n species and R reactions:

- ``W`` (n x R): signed stoichiometric matrix, reactants negative;
- ``b_f``, ``b_r`` (R,): log forward and log reverse rate constants.

Forward pass for concentrations c (B x n)::

    P = max(-W, 0), Q = max(W, 0)                 reaction orders
    z_f = exp(log c @ P + b_f)                    forward flux, B x R
    z_r = exp(log c @ Q + b_r)                    reverse flux, B x R
    dc/dt = (z_f - z_r) @ W^T                     B x n

with log c taken after replacing values <= 0 by 1e-30. The loss is the mean
squared error over samples and species plus ``penalty`` * (|p|_1 + |p|_2)
summed over the three parameter tensors (the L2 norm is not squared).

Both implementations train all parameters packed in one flat float64 vector
``theta = [W.ravel(), b_f, b_r]`` with Adam, so the schedule code in
:mod:`mmtk.reactions.ppf` is shared. :class:`NumpyMassAction` uses a
hand-derived gradient and is the fast CPU path; :class:`TorchMassAction` uses
autograd on any torch device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mmtk.reactions.mechanism import LOG_FLOOR


def log_concentrations(c: np.ndarray) -> np.ndarray:
    """Return log c with values <= 0 replaced by log(1e-30)."""
    return np.log(np.where(c > 0, c, LOG_FLOOR))


def predict_dcdt(concentrations: np.ndarray, W: np.ndarray, log_forward: np.ndarray, log_reverse: np.ndarray) -> np.ndarray:
    """Return the layer's dc/dt (B x n) for concentrations (B x n); a log-rate of -inf is a zero rate."""
    log_c = log_concentrations(np.asarray(concentrations, dtype=np.float64))  # B x n
    z_f = np.exp(log_c @ np.maximum(-W, 0.0) + log_forward)  # B x R
    z_r = np.exp(log_c @ np.maximum(W, 0.0) + log_reverse)  # B x R
    return (z_f - z_r) @ W.T  # B x n


def pack(W: np.ndarray, b_f: np.ndarray, b_r: np.ndarray) -> np.ndarray:
    """Pack parameters into theta = [W.ravel(), b_f, b_r]."""
    return np.concatenate([W.ravel(), b_f, b_r]).astype(np.float64)


def unpack(theta: np.ndarray, n_species: int, n_reactions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return views (W, b_f, b_r) into theta."""
    size = n_species * n_reactions
    return theta[:size].reshape(n_species, n_reactions), theta[size : size + n_reactions], theta[size + n_reactions :]


@dataclass
class AdamSettings:
    """Adam hyper-parameters, with torch.optim.Adam's update rule and defaults."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class OptimizerState:
    """Parameters and Adam moments; ``step`` counts the Adam updates taken."""

    theta: np.ndarray
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    step: int = 0


class StopCheck(Protocol):
    requested: bool


class MassActionBackend(Protocol):
    """Runs PPF epochs: one loss evaluation and one Adam step each."""

    def run(self, state: OptimizerState, epochs: int, integer_columns: np.ndarray, frozen: bool, stop: StopCheck | None) -> np.ndarray:
        """Run up to ``epochs`` epochs in place on ``state``; return the loss of each epoch run.

        The loss of an epoch is evaluated before its update. After each update
        the columns flagged in ``integer_columns`` are rounded to integers.
        With ``frozen`` True, W is fixed, only b_f and b_r are updated and the
        penalty is dropped. Stops early when ``stop.requested`` becomes true.
        """


class NumpyMassAction:
    """Float64 numpy implementation with a hand-derived gradient (CPU only).

    Work arrays are allocated once, because at this size (a few thousand
    numbers per epoch) the per-call cost of numpy dominates the arithmetic.
    """

    def __init__(self, concentrations: np.ndarray, dcdt: np.ndarray, n_reactions: int, penalty: float, adam: AdamSettings) -> None:
        self.log_c = log_concentrations(np.asarray(concentrations, dtype=np.float64))  # B x n
        self.log_c_t = np.ascontiguousarray(self.log_c.T)  # n x B
        self.target = np.asarray(dcdt, dtype=np.float64)  # B x n
        self.n_species = self.target.shape[1]
        self.n_reactions = n_reactions
        self.penalty = penalty
        self.adam = adam
        self.inv_count = 1.0 / self.target.size

        batch, n, R = self.target.shape[0], self.n_species, n_reactions
        self._orders = np.empty((n, 2 * R))  # [P | Q]
        self._z = np.empty((batch, 2 * R))  # [z_f | z_r]
        self._d_logits = np.empty((batch, 2 * R))
        self._ones = np.ones(batch)
        # Which parameter tensor (W, b_f, b_r) each entry of theta belongs to, for the L2 norms.
        self._segment_starts = np.array([0, n * R, n * R + R])
        self._segment_of = np.repeat(np.arange(3), [n * R, R, R])

    def loss_and_grad(self, theta: np.ndarray, frozen: bool = False) -> tuple[float, np.ndarray]:
        """Return the loss and its gradient with respect to theta (zero for W when ``frozen``)."""
        grad = np.empty_like(theta)
        loss = self._loss_and_grad(theta, frozen, grad)
        return loss, grad

    def _loss_and_grad(self, theta: np.ndarray, frozen: bool, grad: np.ndarray) -> float:
        n, R = self.n_species, self.n_reactions
        nR = n * R
        W = theta[:nR].reshape(n, R)

        orders = self._orders
        np.negative(W, out=orders[:, :R])
        np.maximum(orders[:, :R], 0.0, out=orders[:, :R])
        np.maximum(W, 0.0, out=orders[:, R:])
        z = self._z
        np.dot(self.log_c, orders, out=z)  # B x 2R
        z += theta[nR:]
        np.exp(z, out=z)
        net = z[:, :R] - z[:, R:]  # B x R
        residual = net @ W.T  # B x n
        residual -= self.target
        flat = residual.ravel()
        loss = float(flat @ flat) * self.inv_count

        residual *= 2.0 * self.inv_count  # now d loss / d prediction, B x n
        d_net = residual @ W  # B x R
        d_logits = self._d_logits
        np.multiply(z[:, :R], d_net, out=d_logits[:, :R])
        np.multiply(z[:, R:], d_net, out=d_logits[:, R:])
        np.negative(d_logits[:, R:], out=d_logits[:, R:])
        np.dot(self._ones, d_logits, out=grad[nR:])
        if frozen:
            grad[:nR] = 0.0
            return loss

        d_orders = self.log_c_t @ d_logits  # n x 2R
        d_W = residual.T @ net  # n x R
        d_W -= d_orders[:, :R] * (W < 0)
        d_W += d_orders[:, R:] * (W > 0)
        grad[:nR] = d_W.ravel()
        if self.penalty > 0:
            norms = np.sqrt(np.add.reduceat(theta * theta, self._segment_starts))  # 3
            loss += self.penalty * (float(np.abs(theta).sum()) + float(norms.sum()))
            safe = np.where(norms > 0, norms, np.inf)
            grad += self.penalty * (np.sign(theta) + theta / safe[self._segment_of])
        return loss

    def run(self, state: OptimizerState, epochs: int, integer_columns: np.ndarray, frozen: bool, stop: StopCheck | None) -> np.ndarray:
        n, R = self.n_species, self.n_reactions
        adam = self.adam
        # Frozen: W stays as it is and only the 2R log-rates move.
        start = n * R if frozen else 0
        theta = state.theta
        moving = theta[start:]
        m, v = state.exp_avg[start:], state.exp_avg_sq[start:]
        W = theta[: n * R].reshape(n, R)
        rounded = np.flatnonzero(integer_columns) if not frozen else np.empty(0, dtype=np.int64)
        grad = np.empty_like(theta)
        g = grad[start:]
        work = np.empty_like(g)
        losses = np.empty(epochs)

        for done in range(epochs):
            if stop is not None and stop.requested:
                return losses[:done]
            losses[done] = self._loss_and_grad(theta, frozen, grad)

            # Adam, in torch.optim.Adam's order of operations.
            state.step += 1
            m *= adam.beta1
            m += (1.0 - adam.beta1) * g
            v *= adam.beta2
            np.multiply(g, g, out=work)
            work *= 1.0 - adam.beta2
            v += work
            bias1 = 1.0 - adam.beta1**state.step
            bias2 = 1.0 - adam.beta2**state.step
            np.sqrt(v, out=work)
            work /= np.sqrt(bias2)
            work += adam.eps
            moving -= (adam.lr / bias1) * m / work
            if rounded.size:
                W[:, rounded] = np.rint(W[:, rounded])
        return losses


def penalty_value(theta: np.ndarray, n_species: int, n_reactions: int) -> float:
    """Return sum over W, b_f, b_r of (L1 norm + L2 norm)."""
    return float(sum(np.abs(p).sum() + np.linalg.norm(p) for p in unpack(theta, n_species, n_reactions)))


def penalty_grad(theta: np.ndarray, n_species: int, n_reactions: int) -> np.ndarray:
    """Return the gradient of :func:`penalty_value` (0 where a norm is 0)."""
    parts = []
    for p in unpack(theta, n_species, n_reactions):
        norm = np.linalg.norm(p)
        parts.append((np.sign(p) + (p / norm if norm > 0 else 0.0)).ravel())
    return np.concatenate(parts)


class TorchMassAction:
    """The same layer and Adam update in torch, with autograd, on any device (float64).

    NOTE: the tests run this backend on the CPU only; it has not been run on a CUDA device yet.
    """

    def __init__(self, concentrations: np.ndarray, dcdt: np.ndarray, n_reactions: int, penalty: float, adam: AdamSettings, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.log_c = torch.as_tensor(log_concentrations(np.asarray(concentrations, dtype=np.float64)), device=self.device)  # B x n
        self.target = torch.as_tensor(np.asarray(dcdt, dtype=np.float64), device=self.device)  # B x n
        self.n_species = self.target.shape[1]
        self.n_reactions = n_reactions
        self.penalty = penalty
        self.adam = adam

    def loss(self, W, b_f, b_r, with_penalty: bool):
        """Return the loss tensor for parameter tensors W (n x R), b_f, b_r (R,)."""
        torch = self.torch
        z_f = torch.exp(self.log_c @ torch.relu(-W) + b_f)  # B x R
        z_r = torch.exp(self.log_c @ torch.relu(W) + b_r)  # B x R
        prediction = (z_f - z_r) @ W.T  # B x n
        loss = torch.mean((prediction - self.target) ** 2)
        if with_penalty and self.penalty > 0:
            loss = loss + self.penalty * sum(p.abs().sum() + p.norm() for p in (W, b_f, b_r))
        return loss

    def run(self, state: OptimizerState, epochs: int, integer_columns: np.ndarray, frozen: bool, stop: StopCheck | None) -> np.ndarray:
        torch = self.torch
        n, R = self.n_species, self.n_reactions
        adam = self.adam
        theta = torch.as_tensor(state.theta, device=self.device).clone()
        m = torch.as_tensor(state.exp_avg, device=self.device).clone()
        v = torch.as_tensor(state.exp_avg_sq, device=self.device).clone()
        rounded = torch.as_tensor(np.flatnonzero(integer_columns), device=self.device)
        start = n * R if frozen else 0
        losses = torch.empty(epochs, dtype=torch.float64, device=self.device)

        done = 0
        for done in range(epochs):
            if stop is not None and stop.requested:
                break
            params = theta.detach().requires_grad_(True)
            W = params[: n * R].view(n, R)
            b_f, b_r = params[n * R : n * R + R], params[n * R + R :]
            loss = self.loss(W.detach() if frozen else W, b_f, b_r, with_penalty=not frozen)
            (grad,) = torch.autograd.grad(loss, params)
            losses[done] = loss.detach()

            with torch.no_grad():
                g = grad[start:]
                state.step += 1
                m[start:].mul_(adam.beta1).add_(g, alpha=1.0 - adam.beta1)
                v[start:].mul_(adam.beta2).add_(g * g, alpha=1.0 - adam.beta2)
                bias1 = 1.0 - adam.beta1**state.step
                bias2 = 1.0 - adam.beta2**state.step
                denom = v[start:].sqrt() / np.sqrt(bias2) + adam.eps
                theta[start:] -= (adam.lr / bias1) * m[start:] / denom
                if rounded.numel() and not frozen:
                    W_now = theta[: n * R].view(n, R)
                    W_now[:, rounded] = torch.round(W_now[:, rounded])
        else:
            done = epochs

        state.theta[:] = theta.cpu().numpy()
        state.exp_avg[:] = m.cpu().numpy()
        state.exp_avg_sq[:] = v.cpu().numpy()
        return losses[:done].cpu().numpy()
