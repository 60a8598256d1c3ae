"""Shared steps of the weight loaders: build a model without initialising it, then fill it from a state dict."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from mmtk.core.errors import InputError
from mmtk.nn.llm import DecoderConfig, DecoderLM, rope_inverse_frequencies


def model_from_state_dict(config: DecoderConfig, state: Mapping[str, torch.Tensor], source: Path, device: str | torch.device, dtype: torch.dtype) -> DecoderLM:
    """Return a ``DecoderLM`` whose parameters are exactly ``state`` (converted to ``dtype`` on ``device``).

    The model is built on the meta device, so no memory is spent on a random
    initialisation, and the loaded tensors are assigned in place.

    Raises:
        InputError: ``state`` lacks a parameter, has an extra one, a tensor
            of the wrong shape or one with NaN or infinite values; the message
            names ``source``.
    """
    with torch.device("meta"):
        model = DecoderLM(config)
    expected = model.state_dict()
    tied = config.tie_word_embeddings

    state = dict(state)
    if tied:
        state.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise InputError(f"{source}: the checkpoint lacks {len(missing)} tensor(s) the model needs, for example {', '.join(missing[:4])}.")
    if unexpected:
        raise InputError(
            f"{source}: the checkpoint has {len(unexpected)} tensor(s) this decoder does not use, for example {', '.join(unexpected[:4])}; "
            "the model variant is not supported."
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InputError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)} but the configuration implies {tuple(expected[name].shape)}; "
                "the config and the weights do not match."
            )

    for name, tensor in state.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise InputError(f"{source}: tensor {name} contains NaN or infinite values; the checkpoint is damaged or was saved after training diverged.")

    converted = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}
    if tied:
        converted["lm_head.weight"] = converted["embed_tokens.weight"]
    model.load_state_dict(converted, strict=True, assign=True)
    model.tie_weights()
    model.rotary.inv_freq = rope_inverse_frequencies(config).to(device)
    return model.eval()


def all_finite(tensor: torch.Tensor) -> bool:
    """Return whether every element of the floating-point ``tensor`` is finite.

    A NaN or infinity makes the sum non-finite, so a finite sum settles it;
    the element-wise check, many times slower on CPU, runs only when the sum
    is not finite, which large finite values can also cause by overflow.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
