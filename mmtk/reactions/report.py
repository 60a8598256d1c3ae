"""Tables and the loss-curve figure of a discover-reactions run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mmtk.core.io import atomic_path
from mmtk.reactions.mechanism import Mechanism


def _rate(value: float) -> str:
    return f"{value:.6g}"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def print_mechanism(console: Console, found: Mechanism, title: str) -> None:
    """Print the discovered mechanism (canonical order) as a table."""
    table = Table(title=title)
    for name in ("#", "reaction", "k_forward", "k_reverse"):
        table.add_column(name, justify="right" if name.startswith(("k", "#")) else "left")
    for r, equation in enumerate(found.equations()):
        table.add_row(str(r + 1), equation, _rate(found.k_forward[r]), _rate(found.k_reverse[r]))
    console.print(table)


def print_comparison(console: Console, comparison: dict[str, Any]) -> None:
    """Print each true reaction beside the discovered one with the rate errors."""
    verdict = "exact match" if comparison["stoichiometry_match"] else "does NOT match"
    table = Table(title=f"Comparison with the true mechanism: stoichiometry {verdict}")
    for name in ("true reaction", "k_f true", "k_f found", "rel. err", "k_r true", "k_r found", "rel. err"):
        table.add_column(name, justify="left" if name == "true reaction" else "right")
    for row in comparison["reactions"]:
        if not row["matched"]:
            table.add_row(row["equation"], _rate(row["k_forward_true"]), "not found", "-", _rate(row["k_reverse_true"]), "not found", "-")
            continue
        reverse_error = _error(row["k_reverse_relative_error"])
        if row["k_reverse_true"] == 0 and row.get("k_reverse_to_k_forward") is not None:
            reverse_error = f"k_r/k_f {row['k_reverse_to_k_forward']:.1e}"
        table.add_row(
            row["equation"],
            _rate(row["k_forward_true"]),
            _rate(row["k_forward_found"]),
            _error(row["k_forward_relative_error"]),
            _rate(row["k_reverse_true"]),
            _rate(row["k_reverse_found"]),
            reverse_error,
        )
    console.print(table)
    for equation in comparison["unmatched_found"]:
        console.print(f"extra discovered reaction, not in the true mechanism: {equation}")
    if comparison["max_rate_relative_error"] is not None:
        console.print(f"largest relative rate error: {comparison['max_rate_relative_error']:.2e}")


def plot_losses(path: Path, histories: list[tuple[int, np.ndarray, list[dict[str, Any]]]]) -> Path:
    """Write a PNG of the training loss per epoch for each (restart, losses, events).

    Partial freezes are dotted vertical lines, the full freeze a solid one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    for restart, losses, events in histories:
        if losses.size == 0:
            continue
        stride = max(1, losses.size // 4000)
        epochs = np.arange(0, losses.size, stride)
        line = axis.semilogy(epochs, np.maximum(losses[::stride], 1e-300), linewidth=0.8, label=f"restart {restart}")[0]
        for event in events:
            style = "-" if event["event"] == "full_freeze" else ":"
            axis.axvline(event["epoch"], color=line.get_color(), linestyle=style, linewidth=0.7, alpha=0.7)
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss (MSE of dc/dt + penalty)")
    axis.set_title("PPF training loss (dotted: partial freeze, solid: W frozen)")
    axis.legend(loc="upper right")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
