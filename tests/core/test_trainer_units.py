"""Trainer building blocks checked against hand-computed values: schedule, EMA, clipping, data order, devices."""

from __future__ import annotations

import importlib.util
import sys
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmtk.core import distributed
from mmtk.core.ema import EMA
from mmtk.core.errors import InputError, RecipeError
from mmtk.core.optim import LRSchedule, default_parameter_groups, lr_factor
from mmtk.core.recipe import build
from mmtk.core.trainer import SeededDataset, StepBatchSampler, TrainConfig, epochs_to_steps, move_to_device, sample_seed

_TASKS_PATH = Path(__file__).with_name("trainer_tasks.py")


def _tasks():
    """Import the tiny task module by path (test folders are not packages), once per session."""
    name = "mmtk_test_trainer_tasks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _TASKS_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------- schedule


def test_warmup_cosine_hand_values():
    # warm-up 4 of 10 steps, floor 0.1: the cosine runs over steps 4..9 with p = (step - 4) / 6.
    expected = {
        0: 0.25,
        1: 0.5,
        3: 1.0,
        4: 1.0,
        7: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),
        9: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)),
    }
    for step, value in expected.items():
        assert lr_factor(step, 10, "cosine", warmup_steps=4, min_lr_ratio=0.1) == pytest.approx(value, abs=1e-12), step
    assert lr_factor(7, 10, "cosine", warmup_steps=4, min_lr_ratio=0.1) == pytest.approx(0.55, abs=1e-12)
    assert lr_factor(9, 10, "cosine", warmup_steps=4, min_lr_ratio=0.1) == pytest.approx(0.16028857, abs=1e-8)


def test_cosine_without_warmup_ends_near_floor():
    assert lr_factor(0, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_step_and_constant_schedules():
    assert lr_factor(2, 10, "step", milestones=[3, 6], gamma=0.1) == 1.0
    assert lr_factor(3, 10, "step", milestones=[3, 6], gamma=0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, "step", milestones=[3, 6], gamma=0.1) == pytest.approx(0.01)
    assert lr_factor(0, 10, "step", warmup_steps=2, milestones=[3]) == pytest.approx(0.5)
    assert lr_factor(8, 10, "constant", warmup_steps=2) == 1.0


def test_schedule_scales_each_group():
    weight = nn.Parameter(torch.zeros(2, 2))
    bias = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [weight], "lr": 0.2}, {"params": [bias]}], lr=0.1)
    schedule = LRSchedule(optimizer, total_steps=10, warmup_steps=4)

    schedule.set_step(1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.05)

    restored = LRSchedule(optimizer, total_steps=10, warmup_steps=4)
    restored.load_state_dict({"step": 0})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert restored.state_dict() == {"step": 0}


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    groups = default_parameter_groups(model, 0.05)
    assert [len(g["params"]) for g in groups] == [1, 2]
    assert groups[0]["params"][0] is model[0].weight
    assert groups[0]["weight_decay"] == 0.05
    assert groups[1]["weight_decay"] == 0.0


# --------------------------------------------------------------------- EMA


def test_ema_hand_values():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(model, decay=0.75)

    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 6.0]]))
    ema.update()
    # 0.75 * [1, 2] + 0.25 * [3, 6]
    assert torch.allclose(ema.shadow["weight"], torch.tensor([[1.5, 3.0]]), atol=1e-7)

    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0]]))
    ema.update()
    # 0.75 * [1.5, 3] + 0.25 * [-1, 0]
    assert torch.allclose(ema.shadow["weight"], torch.tensor([[0.875, 2.25]]), atol=1e-7)


def test_ema_swap_restores_weights():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    trained = model.weight.detach().clone()
    ema.shadow["weight"].fill_(7.0)

    with ema.swapped_into(model):
        assert torch.all(model.weight == 7.0)
    assert torch.equal(model.weight, trained)

    copy = EMA(model, decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert torch.all(copy.shadow["weight"] == 7.0)


def test_ema_rejects_mismatched_state():
    ema = EMA(nn.Linear(2, 1), decay=0.5)
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict({"decay": 0.5, "shadow": {"weight": torch.zeros(1, 2)}})


# --------------------------------------------------------------- data order


def test_sampler_splits_global_batch():
    world, accum, batch = 2, 2, 8
    samplers = [StepBatchSampler(20, batch, accum, rank, world, seed=5, start_step=0, steps=6) for rank in range(world)]
    for step in range(6):
        epoch, expected = samplers[0].global_batch(step)
        pieces = [[i for i, _ in micro] for sampler in samplers for micro in sampler.micro_batches(step)]
        assert all(len(p) == batch // (world * accum) for p in pieces)
        assert sorted(i for p in pieces for i in p) == sorted(expected.tolist())
        assert epoch == step // 2


def test_sampler_epochs_are_permutations():
    sampler = StepBatchSampler(10, 5, 1, 0, 1, seed=3, start_step=0, steps=4)
    first = torch.cat([sampler.global_batch(0)[1], sampler.global_batch(1)[1]])
    second = torch.cat([sampler.global_batch(2)[1], sampler.global_batch(3)[1]])
    assert sorted(first.tolist()) == list(range(10))
    assert sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)


def test_sampler_resume_continues_stream():
    full = list(StepBatchSampler(12, 4, 2, 0, 1, seed=1, start_step=0, steps=7))
    resumed = list(StepBatchSampler(12, 4, 2, 0, 1, seed=1, start_step=3, steps=7))
    assert len(full) == 14
    assert resumed == full[6:]


def test_sampler_without_shuffle_in_order():
    sampler = StepBatchSampler(6, 3, 1, 0, 1, seed=1, start_step=0, steps=3, shuffle=False)
    assert [[i for i, _ in b] for b in sampler] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


def test_seeded_dataset_repeatable_and_isolated():
    tasks = _tasks()
    dataset = SeededDataset(tasks.NoisyRegression())
    key = (4, sample_seed(0, 2, 4))

    torch.manual_seed(99)
    np.random.seed(99)
    first = dataset[key]
    after_load = torch.rand(3)
    torch.manual_seed(99)
    untouched = torch.rand(3)

    assert torch.equal(first["x"], dataset[key]["x"])
    assert not torch.equal(first["x"], dataset[(4, sample_seed(0, 3, 4))]["x"])
    assert torch.equal(after_load, untouched)


def test_move_to_device_nested():
    batch = {"a": torch.ones(1), "b": [torch.zeros(2), "text"], "c": (torch.ones(1),)}
    moved = move_to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["b"][0], torch.zeros(2))
    assert moved["b"][1] == "text"
    assert isinstance(moved["c"], tuple)


# ---------------------------------------------------------- recipe section


def test_train_config_from_recipe():
    config = build(TrainConfig, {"lr": "1e-3", "betas": [0.9, 0.95], "milestones": [10, 20], "schedule": "step"})
    assert config.lr == 1e-3
    assert config.betas == (0.9, 0.95)
    assert config.milestones == [10, 20]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"betas": [0.9]}, "betas"),
        ({"steps": 10, "warmup_steps": 20}, "warmup_steps"),
        ({"milestones": [20, 10]}, "milestones"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"learning_rate": 0.1}, "unknown recipe key"),
        ({"warmup": 3}, "Did you mean 'warmup_steps'"),
        ({"precision": "fp16"}, "fp16"),
    ],
)
def test_train_config_rejects_invalid(data, message):
    with pytest.raises(RecipeError, match=message):
        build(TrainConfig, data)


# ----------------------------------------------------------------- devices


def test_resolve_device_cpu_and_auto():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1", "CUDA:0"])
def test_resolve_device_cuda_absent(spec):
    with pytest.raises(InputError, match="CUDA is not available"):
        distributed.resolve_device(spec)


def test_resolve_device_invalid_string():
    with pytest.raises(InputError, match="invalid device 'gpu0'"):
        distributed.resolve_device("gpu0")


def test_single_process_helpers():
    assert distributed.init_distributed("cpu").world_size == 1
    assert distributed.get_rank() == 0
    assert distributed.all_reduce_metrics({"b": torch.tensor(2.5), "a": 1}) == {"a": 1.0, "b": 2.5}
    assert distributed.any_rank(True) is True
    model = nn.Sequential(nn.BatchNorm1d(3))
    assert distributed.convert_sync_batchnorm(model, torch.device("cpu")) is model
    with pytest.raises(ValueError, match="median"):
        distributed.all_reduce_metrics({"a": 1.0}, op="median")


def test_epochs_to_steps():
    assert epochs_to_steps(3, dataset_size=100, batch_size=32) == 9
    assert epochs_to_steps(0.5, dataset_size=100, batch_size=32) == 2
    with pytest.raises(InputError, match="10 samples"):
        epochs_to_steps(1, dataset_size=10, batch_size=32)
