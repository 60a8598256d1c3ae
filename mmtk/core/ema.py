"""Exponential moving average (EMA) of a model's trainable parameters."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors; checkpoints hold the whole tensor.
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def _like_parameter(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return full.to(device=param.device, dtype=torch.float32)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(dtype=torch.float32), mesh, param.placements)


class EMA:
    """Moving average of the trainable parameters: ``shadow = decay * shadow + (1 - decay) * param``.

    Shadows are float32 copies (on the parameters' device) taken at
    construction and updated by :meth:`update` after every optimizer step.
    Buffers (for example batch-norm running statistics) are not averaged:
    :meth:`swapped_into` leaves the model's own buffers in place.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().to(torch.float32).clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow toward its parameter by ``1 - decay``."""
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().to(torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with the averages."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow.to(params[name].dtype))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the body with the averaged weights in ``model``, then put the trained weights back."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"decay": float, "shadow": {name: full float32 tensor on CPU}}``."""
        return {"decay": self.decay, "shadow": {name: _full_tensor(t).detach().cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shadows from :meth:`state_dict`; the names must match the model's."""
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, full in state["shadow"].items():
            self.shadow[name] = _like_parameter(full, self.params[name])
