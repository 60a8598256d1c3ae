"""PPF freezing rules on hand-built matrices, the hand-derived gradient and Adam."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtk.reactions.model import AdamSettings, NumpyMassAction, OptimizerState, TorchMassAction, pack, unpack
from mmtk.reactions.ppf import FreezeSettings, PPFTrainer, RestartState, duplicate_columns, fully_integer, near_integer_columns, new_restart, partial_freeze


def _problem(n=4, R=3, rows=60, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.05, 1.0, size=(rows, n))
    dcdt = rng.normal(size=(rows, n))
    return c, dcdt


def test_partial_threshold_is_005():
    W = np.array([[1.049, 1.051, 2.0], [-0.96, -1.0, 0.0], [0.0, 0.0, -1.0]])
    np.testing.assert_array_equal(near_integer_columns(W, 0.05), [True, False, True])


def test_full_threshold_is_1e3():
    assert fully_integer(np.array([[1.0009, -2.0], [0.0, 0.9991]]), 1e-3)
    assert not fully_integer(np.array([[1.0011, -2.0], [0.0, 1.0]]), 1e-3)


def test_partial_freeze_rounds_near_integer_columns():
    W = np.array([[-1.03, 0.4, 0.02], [2.04, 1.3, -0.03], [0.01, -0.7, 0.04]])
    result = partial_freeze(W, np.random.default_rng(0), FreezeSettings())
    np.testing.assert_array_equal(result.integer_columns, [True, False, False])
    np.testing.assert_array_equal(W[:, 0], [-1.0, 2.0, 0.0])


def test_all_zero_column_rejected():
    W = np.array([[0.01, 1.0], [-0.04, 0.02], [0.03, -1.01]])
    result = partial_freeze(W, np.random.default_rng(0), FreezeSettings())
    assert not result.integer_columns[0]
    assert result.reinitialised[0]
    assert result.integer_columns[1]


def test_duplicates_removed_and_redrawn():
    W = np.array([[1.02, -0.98, 1.0, 0.3], [-1.0, 1.01, -1.0, 0.6], [0.0, 0.0, 0.04, -0.2]])
    result = partial_freeze(W, np.random.default_rng(0), FreezeSettings())
    # Column 1 is column 0 negated and column 2 equals column 0: both leave the set.
    np.testing.assert_array_equal(result.integer_columns, [True, False, False, False])
    np.testing.assert_array_equal(result.duplicates, [False, True, True, False])
    for r in (1, 2):
        assert np.all((W[:, r] >= 0.0) & (W[:, r] < 1.0))
    np.testing.assert_array_equal(W[:, 0], [1.0, -1.0, 0.0])


def test_duplicate_detection_keeps_first():
    W = np.array([[1, 0, -1], [0, 1, 0], [-1, 0, 1]], dtype=float)
    np.testing.assert_array_equal(duplicate_columns(W, np.array([True, True, True])), [False, False, True])


def test_reinitialisation_range():
    rng = np.random.default_rng(1)
    W = np.full((6, 40), 0.3)
    W[:, 0] = [1, 0, 0, -2, 0, 0]
    result = partial_freeze(W, rng, FreezeSettings())
    redrawn = W[:, result.reinitialised]
    assert result.reinitialised.sum() == 39
    assert redrawn.min() >= -2.0
    assert redrawn.max() < 2.0
    # 234 draws of U(-2, 2) reach beyond +-1.5 and do not sit near 0.3.
    assert redrawn.min() < -1.5
    assert redrawn.max() > 1.5
    assert not np.any(np.isclose(redrawn, 0.3))


def test_no_gradient_to_w_after_full_freeze():
    c, dcdt = _problem()
    n, R = 4, 3
    backend = NumpyMassAction(c, dcdt, R, 1e-8, AdamSettings())
    theta = pack(np.array([[-1.0, 0, 1], [1, -1, 0], [0, 1, -1], [0, 0, 1]]), np.zeros(R), np.zeros(R))
    _, grad = backend.loss_and_grad(theta, frozen=True)
    assert np.all(grad[: n * R] == 0)
    assert np.any(grad[n * R :] != 0)

    state = OptimizerState(theta.copy(), np.zeros_like(theta), np.zeros_like(theta))
    backend.run(state, 50, np.ones(R, dtype=bool), True, None)
    np.testing.assert_array_equal(state.theta[: n * R], theta[: n * R])
    assert np.any(state.theta[n * R :] != theta[n * R :])


def test_torch_backend_frozen_keeps_w():
    c, dcdt = _problem()
    n, R = 4, 3
    backend = TorchMassAction(c, dcdt, R, 1e-8, AdamSettings(), "cpu")
    theta = pack(np.array([[-1.0, 0, 1], [1, -1, 0], [0, 1, -1], [0, 0, 1]]), np.zeros(R), np.zeros(R))
    state = OptimizerState(theta.copy(), np.zeros_like(theta), np.zeros_like(theta))
    backend.run(state, 20, np.ones(R, dtype=bool), True, None)
    np.testing.assert_array_equal(state.theta[: n * R], theta[: n * R])


def test_full_freeze_check_fixes_w():
    c, dcdt = _problem()
    n, R = 4, 3
    backend = NumpyMassAction(c, dcdt, R, 1e-8, AdamSettings())
    trainer = PPFTrainer(backend, n, R, FreezeSettings(check_every=100, stall_lag=10), epochs=300, stop_after_freeze=False, event_every=100)
    state = new_restart(0, 0, n, R, 0.5)
    W, _, _ = unpack(state.optimizer.theta, n, R)
    W[:] = np.array([[-1.0004, 0, 1], [1, -1, 0.0002], [0, 1, -1], [0, 0, 1]])
    state.losses = [np.ones(101)]
    state.epoch = 101
    trainer.check(state, 100)
    assert state.frozen and state.frozen_epoch == 100
    assert np.all(W == np.rint(W))


def test_partial_check_needs_stalled_loss():
    c, dcdt = _problem()
    n, R = 4, 3
    backend = NumpyMassAction(c, dcdt, R, 1e-8, AdamSettings())
    settings = FreezeSettings(check_every=100, stall_lag=10)
    trainer = PPFTrainer(backend, n, R, settings, epochs=1000, stop_after_freeze=False)

    def state_with(losses):
        state = new_restart(0, 0, n, R, 0.5)
        W, _, _ = unpack(state.optimizer.theta, n, R)
        W[:, 0] = [1.01, -0.99, 0.0, 0.0]
        state.losses = [np.asarray(losses, dtype=float)]
        return state

    falling = state_with(np.linspace(2.0, 1.0, 201))
    trainer.check(falling, 200)
    assert not falling.integer_columns.any()
    assert not falling.events

    stalled = state_with(np.linspace(1.0, 2.0, 201))
    trainer.check(stalled, 200)
    np.testing.assert_array_equal(stalled.integer_columns, [True, False, False])

    early = state_with(np.linspace(1.0, 2.0, 101))
    trainer.check(early, 100)
    assert not early.events, "no partial check at the first check epoch"


def test_integer_columns_rounded_after_each_step():
    c, dcdt = _problem()
    n, R = 4, 3
    backend = NumpyMassAction(c, dcdt, R, 1e-8, AdamSettings(lr=0.1))
    theta = np.random.default_rng(0).uniform(-0.5, 0.5, n * R + 2 * R)
    W, _, _ = unpack(theta, n, R)
    W[:, 1] = [1, -1, 0, 0]
    state = OptimizerState(theta, np.zeros_like(theta), np.zeros_like(theta))
    backend.run(state, 30, np.array([False, True, False]), False, None)
    W, _, _ = unpack(state.theta, n, R)
    np.testing.assert_array_equal(W[:, 1], [1, -1, 0, 0])
    assert np.any(W[:, 0] != np.rint(W[:, 0]))


def test_gradient_matches_torch_autograd():
    c, dcdt = _problem(rows=80)
    n, R = 4, 3
    theta = np.random.default_rng(2).uniform(-1.5, 1.5, n * R + 2 * R)
    backend = NumpyMassAction(c, dcdt, R, 1e-3, AdamSettings())
    loss, grad = backend.loss_and_grad(theta)

    params = torch.tensor(theta, requires_grad=True)
    W = params[: n * R].view(n, R)
    torch_layer = TorchMassAction(c, dcdt, R, 1e-3, AdamSettings(), "cpu")
    torch_loss = torch_layer.loss(W, params[n * R : n * R + R], params[n * R + R :], with_penalty=True)
    (torch_grad,) = torch.autograd.grad(torch_loss, params)
    assert loss == pytest.approx(torch_loss.item(), rel=1e-12)
    np.testing.assert_allclose(grad, torch_grad.numpy(), rtol=1e-9, atol=1e-12 * np.abs(grad).max())


def test_adam_matches_torch_optim():
    c, dcdt = _problem(rows=50)
    n, R = 4, 3
    theta = np.random.default_rng(4).uniform(-0.5, 0.5, n * R + 2 * R)
    backend = NumpyMassAction(c, dcdt, R, 0.0, AdamSettings(lr=1e-2))
    state = OptimizerState(theta.copy(), np.zeros_like(theta), np.zeros_like(theta))
    losses = backend.run(state, 40, np.zeros(R, dtype=bool), False, None)

    params = torch.tensor(theta, requires_grad=True)
    optimizer = torch.optim.Adam([params], lr=1e-2)
    layer = TorchMassAction(c, dcdt, R, 0.0, AdamSettings(), "cpu")
    torch_losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = layer.loss(params[: n * R].view(n, R), params[n * R : n * R + R], params[n * R + R :], with_penalty=False)
        loss.backward()
        optimizer.step()
        torch_losses.append(loss.item())
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-10)
    np.testing.assert_allclose(state.theta, params.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_trainer_same_result_in_chunks():
    c, dcdt = _problem()
    n, R = 4, 3
    settings = FreezeSettings(check_every=200, stall_lag=20)

    def train(stop_at=None):
        backend = NumpyMassAction(c, dcdt, R, 1e-8, AdamSettings(lr=1e-2))
        trainer = PPFTrainer(backend, n, R, settings, epochs=1000, stop_after_freeze=False, event_every=100)
        state = new_restart(0, 3, n, R, 0.5)
        if stop_at is not None:

            class StopAfterPolls:
                """A stop flag that turns on after ``stop_at`` polls, in the middle of a chunk."""

                polls = 0

                @property
                def requested(self):
                    self.polls += 1
                    return self.polls > stop_at

            assert not trainer.run(state, StopAfterPolls())
            assert 0 < state.epoch < 1000
        trainer.run(state)
        return state

    whole = train()
    split = train(stop_at=450)
    np.testing.assert_array_equal(whole.optimizer.theta, split.optimizer.theta)
    np.testing.assert_array_equal(whole.loss_history(), split.loss_history())
    assert isinstance(split, RestartState)


def test_torch_and_numpy_backends_agree():
    c, dcdt = _problem(rows=40)
    n, R = 4, 3
    theta = np.random.default_rng(6).uniform(-0.5, 0.5, n * R + 2 * R)
    W, _, _ = unpack(theta, n, R)
    W[:, 2] = [0, 1, -1, 0]
    integer_columns = np.array([False, False, True])
    results = []
    for backend in (NumpyMassAction(c, dcdt, R, 1e-8, AdamSettings(lr=1e-2)), TorchMassAction(c, dcdt, R, 1e-8, AdamSettings(lr=1e-2), "cpu")):
        state = OptimizerState(theta.copy(), np.zeros_like(theta), np.zeros_like(theta))
        losses = backend.run(state, 100, integer_columns, False, None)
        results.append((losses, state.theta))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-9)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)


def test_full_freeze_can_require_distinct_columns():
    c, dcdt = _problem()
    n, R = 4, 3
    backend = NumpyMassAction(c, dcdt, R, 1e-8, AdamSettings())
    duplicate_w = np.array([[-1.0, 1.0, 1], [1, -1, 0], [0, 0, -1], [0, 0, 1]])
    for requires_distinct, expected in ((False, True), (True, False)):
        settings = FreezeSettings(check_every=100, stall_lag=10, full_requires_distinct=requires_distinct)
        trainer = PPFTrainer(backend, n, R, settings, epochs=300, stop_after_freeze=False)
        state = new_restart(0, 0, n, R, 0.5)
        W, _, _ = unpack(state.optimizer.theta, n, R)
        W[:] = duplicate_w
        state.losses = [np.ones(101)]
        trainer.full_check(state, 100)
        assert state.frozen is expected


@pytest.mark.parametrize("reset_rates", [False, True])
def test_reset_rates_redraws_rates(reset_rates):
    c, dcdt = _problem()
    n, R = 4, 3
    backend = NumpyMassAction(c, dcdt, R, 1e-8, AdamSettings())
    settings = FreezeSettings(check_every=100, stall_lag=10, reset_rates=reset_rates, init_range=0.5)
    trainer = PPFTrainer(backend, n, R, settings, epochs=1000, stop_after_freeze=False)
    state = new_restart(0, 0, n, R, 0.5)
    W, b_f, b_r = unpack(state.optimizer.theta, n, R)
    # Column 0 is integer, column 1 duplicates it, column 2 is not integer; all rates far outside U(-0.5, 0.5).
    W[:] = np.array([[1.0, -1.0, 0.3], [-1, 1, 0.6], [0, 0, -0.2], [0, 0, 0.1]])
    b_f[:] = [7.0, 6.0, 5.0]
    b_r[:] = [-7.0, -6.0, -5.0]
    state.losses = [np.linspace(1.0, 2.0, 201)]
    trainer.check(state, 200)

    np.testing.assert_array_equal(state.integer_columns, [True, False, False])
    assert b_f[0] == 7.0, "the integer column keeps its rates"
    assert b_r[0] == -7.0, "the integer column keeps its rates"
    if reset_rates:
        assert np.all(np.abs(b_f[1:]) <= 0.5)
        assert np.all(np.abs(b_r[1:]) <= 0.5)
    else:
        np.testing.assert_array_equal(b_f, [7.0, 6.0, 5.0])
        np.testing.assert_array_equal(b_r, [-7.0, -6.0, -5.0])


def test_best_restart_prefers_converged_structure():
    from mmtk.reactions.tool import select_best_restart

    results = [
        {"restart": 0, "structure_converged": True, "train_mse": 1e-3},
        {"restart": 1, "structure_converged": False, "train_mse": 1e-6},
        {"restart": 2, "structure_converged": True, "train_mse": 1e-4},
    ]
    assert select_best_restart(results)["restart"] == 2
    assert select_best_restart(results[1:2])["restart"] == 1
