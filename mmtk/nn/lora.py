"""Low-rank updates of linear layers: trainable LoRA adapters and per-sample deltas.

``AdaptableLinear`` is an ``nn.Linear`` that can carry two kinds of low-rank
update on top of its weight ``W`` (shape ``(out_features, in_features)``):

* a LoRA adapter (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
  Language Models"): trainable ``lora_A`` (r, in) and ``lora_B`` (out, r), so
  ``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T``. ``lora_B`` starts at
  zero, so a fresh adapter leaves the output unchanged. ``merge()`` folds the
  update into ``W`` for inference and ``unmerge()`` takes it out again.
* a per-sample delta set for one forward pass: factors ``down`` (B, r, in)
  and ``up`` (B, out, r) that differ per batch element, so sample ``b`` uses
  ``W + scale * up[b] @ down[b]``. A hypernetwork (for example one that reads
  an image) produces them; gradients flow back into the factors.

The module keeps the ``weight``/``bias`` parameter names of ``nn.Linear``, so
state dicts of plain models load into models built from it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LowRankDelta:
    """Per-sample low-rank weight update ``scale * up[b] @ down[b]`` for one linear layer.

    Attributes:
        down: (B, r, in_features) factor applied first.
        up: (B, out_features, r) factor applied second.
        scale: multiplier of the update (default 1.0).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    def check(self, name: str, in_features: int, out_features: int, batch: int) -> None:
        """Raise ValueError when the factor shapes do not fit a layer and batch."""
        if self.down.dim() != 3 or self.up.dim() != 3:
            raise ValueError(f"low-rank delta for {name}: down and up must be 3-D (B, r, in) and (B, out, r), got {tuple(self.down.shape)} and {tuple(self.up.shape)}")
        b_down, rank, fan_in = self.down.shape
        b_up, fan_out, rank_up = self.up.shape
        if fan_in != in_features or fan_out != out_features or rank != rank_up:
            raise ValueError(
                f"low-rank delta for {name}: expected down (B, r, {in_features}) and up (B, {out_features}, r), "
                f"got {tuple(self.down.shape)} and {tuple(self.up.shape)}"
            )
        if b_down != batch or b_up != batch:
            raise ValueError(f"low-rank delta for {name}: factors hold {b_down} and {b_up} samples but the input batch has {batch}")


class AdaptableLinear(nn.Linear):
    """``nn.Linear`` with an optional LoRA adapter and an optional per-sample low-rank delta."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scaling = 0.0
        self.lora_dropout: nn.Module = nn.Identity()
        self.merged = False
        self.sample_delta: LowRankDelta | None = None
        # The weight before merge(), so unmerge() restores it exactly even in bf16/fp16.
        self.register_buffer("unmerged_weight", None, persistent=False)

    # ---- LoRA adapter ----------------------------------------------------------------

    def add_lora(self, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        """Attach a trainable adapter of rank ``rank``; ``alpha`` defaults to ``rank`` (scaling 1)."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if self.lora_A is not None:
            raise ValueError("this layer already has a LoRA adapter; remove it first")
        alpha = float(rank if alpha is None else alpha)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def remove_lora(self) -> None:
        """Drop the adapter (after taking it out of the weight if it was merged)."""
        if self.merged:
            self.unmerge()
        self.lora_A = None
        self.lora_B = None
        self.lora_scaling = 0.0
        self.lora_dropout = nn.Identity()

    def lora_weight(self) -> torch.Tensor:
        """Return the adapter's dense update ``scaling * B @ A``, shape (out, in)."""
        assert self.lora_A is not None and self.lora_B is not None
        return self.lora_scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter's update into ``weight``; the forward pass then skips the adapter.

        A copy of the weight before the merge is kept (one more weight-sized
        tensor per merged layer), so ``unmerge`` restores it bit for bit.
        """
        if self.lora_A is None or self.merged:
            return
        self.unmerged_weight = self.weight.detach().clone()
        self.weight += self.lora_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight saved by ``merge``, so the forward pass applies the adapter again.

        Changes made to ``weight`` while merged are discarded.
        """
        if self.lora_A is None or not self.merged:
            return
        self.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None
        self.merged = False

    # ---- state dict --------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Save the weight without the adapter, because the adapter factors are saved
        # beside it and a model loading both would otherwise apply the update twice.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self.unmerged_weight if keep_vars else self.unmerged_weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Saved weights never contain the adapter, so take a merged adapter out first;
        # the layer is unmerged after loading.
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``x`` of shape (B, ..., in_features); returns (B, ..., out_features)."""
        y = F.linear(x, self.weight, self.bias)

        if self.lora_A is not None and not self.merged:
            y = y + self.lora_scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

        delta = self.sample_delta
        if delta is not None:
            batch = x.shape[0]
            flat = x.reshape(batch, -1, self.in_features)  # (B, N, in)
            hidden = torch.bmm(flat, delta.down.transpose(1, 2))  # (B, N, r)
            update = torch.bmm(hidden, delta.up.transpose(1, 2))  # (B, N, out)
            y = y + delta.scale * update.reshape(y.shape)
        return y

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.lora_A is not None:
            text += f", lora_rank={self.lora_A.shape[0]}, lora_scaling={self.lora_scaling:g}, merged={self.merged}"
        return text


# ---- model-level helpers ---------------------------------------------------------------


def adaptable_linears(model: nn.Module) -> dict[str, AdaptableLinear]:
    """Return every ``AdaptableLinear`` in ``model`` by its qualified module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaptableLinear)}


def select_linears(model: nn.Module, targets: Iterable[str], blocks: Iterable[int] | None = None) -> dict[str, AdaptableLinear]:
    """Return the adaptable linears whose last name part is in ``targets``.

    Args:
        targets: short names such as ``("q_proj", "v_proj")``.
        blocks: block indices to keep (the number after ``layers.`` in the
            name); None keeps all blocks.
    """
    targets = set(targets)
    block_set = None if blocks is None else {int(b) for b in blocks}
    selected = {}
    for name, module in adaptable_linears(model).items():
        parts = name.split(".")
        if parts[-1] not in targets:
            continue
        if block_set is not None:
            index = _block_index(parts)
            if index is None or index not in block_set:
                continue
        selected[name] = module
    if not selected:
        raise ValueError(f"no adaptable linear layer matches targets {sorted(targets)} in blocks {sorted(block_set) if block_set else 'all'}")
    return selected


def _block_index(parts: list[str]) -> int | None:
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def add_lora(
    model: nn.Module,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    blocks: Iterable[int] | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Attach LoRA adapters to the chosen linears of ``model``; returns their names.

    With ``freeze_base`` (default), every parameter of the model that is not
    an adapter factor stops requiring gradients, so an optimiser over
    ``lora_parameters(model)`` trains the adapters only. Adapters added by
    earlier calls stay trainable.
    """
    selected = select_linears(model, targets, blocks)
    if freeze_base:
        for name, parameter in model.named_parameters():
            if not name.endswith((".lora_A", ".lora_B")):
                parameter.requires_grad_(False)
    for module in selected.values():
        module.add_lora(rank, alpha, dropout)
    return sorted(selected)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the adapter parameters (``lora_A`` and ``lora_B``) of every layer."""
    params = []
    for module in adaptable_linears(model).values():
        if module.lora_A is not None:
            params += [module.lora_A, module.lora_B]
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return only the adapter tensors of ``model``'s state dict, for small adapter files.

    ``model.state_dict()`` always stores weights without the adapters, merged
    or not, so loading it with the adapter factors gives the same model.
    """
    return {key: value for key, value in model.state_dict().items() if key.endswith((".lora_A", ".lora_B"))}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight."""
    for module in adaptable_linears(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter out of its layer's weight again."""
    for module in adaptable_linears(model).values():
        module.unmerge()


@contextlib.contextmanager
def sample_deltas(model: nn.Module, deltas: Mapping[str, LowRankDelta] | None, batch: int | None = None) -> Iterator[None]:
    """Apply per-sample low-rank deltas to named linears of ``model`` for the duration of the block.

    Args:
        deltas: module name (as in ``model.named_modules()``, for example
            ``"layers.3.self_attn.q_proj"``) to its delta.
        batch: batch size of the coming input, checked against the factors when given.

    Raises:
        ValueError: a name is not an adaptable linear, or the factor shapes do not fit.
    """
    if not deltas:
        yield
        return
    modules = adaptable_linears(model)
    applied = []
    try:
        for name, delta in deltas.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"low-rank delta names {name!r}, which is not an adaptable linear layer of the model (for example {next(iter(modules), 'none')!r})")
            delta.check(name, module.in_features, module.out_features, delta.down.shape[0] if batch is None else batch)
            module.sample_delta = delta
            applied.append(module)
        yield
    finally:
        for module in applied:
            module.sample_delta = None
