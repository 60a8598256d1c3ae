"""Deterministic seeding and RNG state capture for exact resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's global and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Return the global RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    import torch

    python_state = random.getstate()
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": {
            "name": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`capture_rng_state`."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["name"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """Return a numpy Generator's bit-generator state as plain ints and strings."""
    return _stringify_big_ints(rng.bit_generator.state)


def set_generator_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    """Restore a state returned by :func:`generator_state`."""
    rng.bit_generator.state = _parse_big_ints(state)


def _stringify_big_ints(obj: Any) -> Any:
    # PCG64 states hold 128-bit ints, which torch's safe loader cannot store.
    if isinstance(obj, dict):
        return {k: _stringify_big_ints(v) for k, v in obj.items()}
    if isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) >= 2**63:
        return {"__bigint__": str(obj)}
    return obj


def _parse_big_ints(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__bigint__"}:
            return int(obj["__bigint__"])
        return {k: _parse_big_ints(v) for k, v in obj.items()}
    return obj
