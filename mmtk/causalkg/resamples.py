"""Finished bootstrap resamples kept in the run folder, so ``--resume`` computes only the missing ones.

Each resample is indexed and seeded on its own (resample r draws its rows
with ``numpy.random.default_rng([seed, r])``), so a stored result is the
result an uninterrupted run computes for that index. A store file contains
one kind of result (structure edge lists or effect values)::

    {"schema": "mmtk.causal-kg.resamples/1", "kind": "structure",
     "fingerprint": "<sha256 of the inputs>", "results": {"0": ..., "1": ...}}

The fingerprint covers the inputs of a resample's result (the mastery
matrix, the variables, the seed and the learner or edge settings), but not
the pgmpy version, nor ``PYTHONHASHSEED``, on which PC and GES graphs may
depend. A store whose fingerprint differs, for example because the data
file changed between the runs, is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmtk.core.io import write_json
from mmtk.core.logging import get_logger

log = get_logger(__name__)

SCHEMA = "mmtk.causal-kg.resamples/1"

# Finished resamples between two writes of the store; a crash loses at most this many.
SAVE_EVERY = 10


def fingerprint(values: np.ndarray, columns: list[str], seed: int, settings: Any) -> str:
    """Return the SHA-256 hex digest of a bootstrap's inputs.

    ``settings`` is a dataclass or any JSON-serialisable value (for example
    the edge list and the equivalent sample size of the effect bootstrap).
    """
    values = np.ascontiguousarray(values)
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        settings = dataclasses.asdict(settings)
    digest = hashlib.sha256()
    digest.update(json.dumps({"shape": list(values.shape), "dtype": str(values.dtype), "columns": list(columns), "seed": seed, "settings": settings}, sort_keys=True, default=str).encode("utf-8"))
    digest.update(values.tobytes())
    return digest.hexdigest()


class ResampleStore:
    """Results of finished resamples of one kind, written atomically to a JSON file every :data:`SAVE_EVERY` additions.

    With ``load=True`` (a resumed run) the results already in ``path`` are
    read, provided the file has the same kind and fingerprint.
    """

    def __init__(self, path: str | Path, kind: str, fingerprint: str, load: bool = False, save_every: int = SAVE_EVERY) -> None:
        self.path = Path(path)
        self.kind = kind
        self.fingerprint = fingerprint
        self.save_every = save_every
        self.results: dict[int, Any] = {}
        self._unsaved = 0
        if load:
            self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("stored resamples %s are unreadable (%s); computing all %s resamples again", self.path, exc, self.kind)
            return
        if stored.get("schema") != SCHEMA or stored.get("kind") != self.kind:
            log.warning("%s is not a store of %s resamples; computing them again", self.path, self.kind)
            return
        if stored.get("fingerprint") != self.fingerprint:
            log.warning("stored %s resamples in %s were computed from other data or settings; computing them again", self.kind, self.path)
            return
        self.results = {int(key): value for key, value in stored.get("results", {}).items()}
        log.info("read %d stored %s resamples from %s", len(self.results), self.kind, self.path)

    def missing(self, n_resamples: int) -> list[int]:
        """Return the indices in ``range(n_resamples)`` without a stored result."""
        return [r for r in range(n_resamples) if r not in self.results]

    def add(self, resample: int, result: Any) -> None:
        """Record the result of ``resample``; write the store after every ``save_every`` additions."""
        self.results[resample] = result
        self._unsaved += 1
        if self._unsaved >= self.save_every:
            self.save()

    def save(self) -> None:
        """Write all results so far, unless nothing was added since the last write."""
        if self._unsaved == 0:
            return
        results = {str(r): self.results[r] for r in sorted(self.results)}
        write_json(self.path, {"schema": SCHEMA, "kind": self.kind, "fingerprint": self.fingerprint, "results": results})
        self._unsaved = 0
        log.debug("stored %d %s resamples in %s", len(results), self.kind, self.path)
