"""Shared helpers of the causal-kg benchmarks: bundled pgmpy networks, codes and graph metrics."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np


def pin_hash_seed() -> None:
    """Restart this script with PYTHONHASHSEED=0 unless the variable is set.

    pgmpy's hill climbing breaks ties in string-set order, which follows the
    hash seed. On asia with 5,000 rows, hash seeds 0, 1 and 2 gave SHD 2, 7
    and 2 for the same data.
    """
    if "PYTHONHASHSEED" not in os.environ:
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def load_network(name: str):
    """Load a network bundled with pgmpy 1.1 (asia, child, alarm, ...) without network access.

    ``pgmpy.utils.get_example_model`` reads BIF files shipped in the wheel;
    it is deprecated and removed in pgmpy 1.3, whose replacement downloads.
    """
    from pgmpy.utils import get_example_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_example_model(name)


def sample_codes(model, n_samples: int, seed: int) -> tuple[np.ndarray, list[str], dict[str, list[int]]]:
    """Forward-sample ``model``; return integer state codes (rows x variables), names and states per variable."""
    frame = model.simulate(n_samples=n_samples, seed=seed, show_progress=False)
    columns = [str(c) for c in frame.columns]
    codes = np.stack([frame[c].cat.codes.to_numpy() if hasattr(frame[c], "cat") else frame[c].to_numpy() for c in frame.columns], axis=1)
    states = {c: list(range(len(model.states[c]))) for c in columns}
    return codes.astype(np.int64), columns, states


def edge_metrics(true_edges, learned_edges) -> dict[str, float]:
    """Structural Hamming distance and F1 of directed edges and of the skeleton.

    SHD counts node pairs whose adjacency differs plus adjacent pairs with
    the wrong orientation (one per pair).
    """
    true_directed = {tuple(e) for e in true_edges}
    learned_directed = {tuple(e) for e in learned_edges}
    true_skeleton = {frozenset(e) for e in true_directed}
    learned_skeleton = {frozenset(e) for e in learned_directed}

    shd = len(true_skeleton ^ learned_skeleton)
    shd += sum(1 for e in learned_directed if frozenset(e) in true_skeleton and e not in true_directed)

    def f1(truth, learned):
        hits = len(truth & learned)
        if hits == 0:
            return 0.0
        precision, recall = hits / len(learned), hits / len(truth)
        return 2 * precision * recall / (precision + recall)

    return {
        "shd": float(shd),
        "f1_directed": f1(true_directed, learned_directed),
        "f1_skeleton": f1(true_skeleton, learned_skeleton),
        "n_edges": float(len(learned_directed)),
    }


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as text."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"
