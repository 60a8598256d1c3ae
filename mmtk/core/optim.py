"""Optimizers and learning-rate schedules for the shared trainer.

The schedule is a pure function of the optimizer step, :func:`lr_factor`, so
a resumed run needs only the step to restore it. :class:`LRSchedule` applies
that factor to every parameter group's base learning rate.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    import torch


def lr_factor(
    step: int,
    total_steps: int,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Return the multiplier of the base learning rate for the 0-based optimizer ``step``.

    - Warm-up: for ``step < warmup_steps`` the factor rises linearly as
      ``(step + 1) / warmup_steps``, reaching 1 at the last warm-up step.
    - ``"cosine"``: afterwards it decays from 1 to ``min_lr_ratio`` along half
      a cosine, ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2``
      with ``p = (step - warmup_steps) / (total_steps - warmup_steps)``, so
      the final step (``total_steps - 1``) is just above ``min_lr_ratio``.
    - ``"constant"``: 1 after warm-up.
    - ``"step"``: ``gamma ** k`` where ``k`` counts the milestones ``<= step``
      (milestones are optimizer steps), the schedule of SGD recipes such as
      "lr x0.1 at epochs 100 and 200".
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps

    if schedule == "constant":
        return 1.0
    if schedule == "step":
        passed = sum(1 for milestone in milestones if step >= milestone)
        return gamma**passed
    if schedule == "cosine":
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected 'cosine', 'constant' or 'step'")


class LRSchedule:
    """Set each parameter group's ``lr`` to its ``initial_lr`` times :func:`lr_factor`.

    The trainer calls :meth:`set_step` before every optimizer step. The only
    state is the step, so :meth:`state_dict` is a plain mapping.
    """

    def __init__(self, optimizer: "torch.optim.Optimizer", total_steps: int, schedule: str = "cosine", warmup_steps: int = 0, min_lr_ratio: float = 0.0, milestones: Sequence[int] = (), gamma: float = 0.1) -> None:
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.milestones = list(milestones)
        self.gamma = gamma
        self.step = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def factor(self, step: int) -> float:
        """Return the learning-rate multiplier at the 0-based optimizer ``step``."""
        return lr_factor(step, self.total_steps, self.schedule, self.warmup_steps, self.min_lr_ratio, self.milestones, self.gamma)

    def set_step(self, step: int) -> float:
        """Set the learning rates for optimizer ``step``; return the factor applied."""
        self.step = step
        factor = self.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return factor

    def state_dict(self) -> dict[str, Any]:
        """Return the schedule state (the current step)."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` and set the learning rates for it."""
        self.set_step(int(state["step"]))


def default_parameter_groups(model: "torch.nn.Module", weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a non-decayed group.

    Matrices and convolution kernels (``ndim >= 2``) get ``weight_decay``;
    biases, norm scales and other vectors get none, the usual split for
    AdamW on transformers and CNNs. Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    groups: Iterable[dict[str, Any]],
    name: str = "adamw",
    lr: float = 3e-4,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> "torch.optim.Optimizer":
    """Create AdamW (``name="adamw"``) or SGD with momentum (``name="sgd"``).

    ``groups`` are torch parameter groups; a group without ``weight_decay``
    uses ``weight_decay``, and a group may set its own ``lr``.
    """
    import torch

    groups = [dict(group) for group in groups]
    if not groups or not any(group["params"] for group in groups):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(betas[0], betas[1]), eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'sgd'")
