"""Checkpoints: atomic ``torch.save`` and safe loading (``weights_only=True``)."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

from mmtk.core.errors import InputError
from mmtk.core.io import atomic_path
from mmtk.core.logging import get_logger

log = get_logger(__name__)

_STEP_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save ``state`` (tensors, numbers, strings, lists, dicts) atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", expected_tool: str | None = None) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects.

    When ``expected_tool`` is given, the checkpoint's ``"tool"`` entry must
    match it, so a checkpoint of another tool is rejected with a clear error.
    """
    import torch

    path = Path(path)
    expected_file = f"a checkpoint of {expected_tool}" if expected_tool else "an mmtk checkpoint"
    if path.is_dir():
        raise InputError(f"checkpoint {path} is a folder; pass the checkpoint file inside it ({expected_file}).")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, KeyError) as exc:
        # torch's own text suggests weights_only=False, which would run arbitrary code, so it is not passed on.
        if "Weights only load failed" in str(exc) and _looks_like_pickle_or_zip(path):
            reason = "it holds Python objects other than tensors and plain containers"
        elif "Weights only load failed" in str(exc):
            reason = "corrupt, truncated or another kind of file: it starts like neither a torch archive nor a pickle"
        else:
            reason = f"corrupt, truncated or another kind of file: {type(exc).__name__}: {_first_sentence(str(exc))}"
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({reason}); pass {expected_file}.") from exc
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} does not contain a state mapping, so it is not an mmtk checkpoint; pass {expected_file}.")
    if expected_tool is not None and state.get("tool") != expected_tool:
        if state.get("tool"):
            raise InputError(f"checkpoint {path} was written by {state['tool']!r}, not by {expected_tool!r}; pass {expected_file}.")
        raise InputError(f"checkpoint {path} names no mmtk tool that wrote it (a plain state dict or a file from another program?); pass {expected_file}.")
    return state


def _looks_like_pickle_or_zip(path: Path) -> bool:
    """Return True when ``path`` starts like a torch zip archive or a pickle of protocol 2 or later."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def _first_sentence(text: str, limit: int = 200) -> str:
    """Return the first sentence of the first line of ``text``, at most ``limit`` characters (cut at a word)."""
    lines = text.strip().splitlines()
    if not lines:
        return "no details"
    sentence = lines[0].split(". ")[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def state_dict_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], names_shown: int = 3) -> str | None:
    """Describe how the tensors ``found`` differ from a model's ``expected`` state dict, or return None when they fit.

    The description counts missing, unexpected and differently shaped
    tensors and names the first few of each, so it stays short for a
    file that lacks every weight.
    """

    def first_names(names: list[str]) -> str:
        joined = ", ".join(names[:names_shown])
        return f"{joined}, ..." if len(names) > names_shown else joined

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(name for name in set(expected) & set(found) if tuple(expected[name].shape) != tuple(found[name].shape))
    details = []
    if missing:
        details.append(f"{len(missing)} missing tensors ({first_names(missing)})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected tensors ({first_names(unexpected)})")
    if wrong_shape:
        name = wrong_shape[0]
        details.append(f"{len(wrong_shape)} tensors of another shape (first: {name} {tuple(found[name].shape)} instead of {tuple(expected[name].shape)})")
    return "; ".join(details) or None


def checkpoint_path(folder: str | Path, step: int) -> Path:
    """Return the file name used for the checkpoint at ``step``."""
    return Path(folder) / f"ckpt-{step:09d}.pt"


def latest_checkpoint(folder: str | Path) -> Path | None:
    """Return the checkpoint with the highest step in ``folder``, if any."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints in ``folder``."""
    folder = Path(folder)
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_PATTERN.match(p.name)))
    for _, path in found[: max(0, len(found) - keep)]:
        path.unlink(missing_ok=True)
        log.debug("removed old checkpoint %s", path)
