"""Tables and the loss-curve figure of a discover-reactions run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich import box
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
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for name in ("#", "reaction", "k_forward", "k_reverse"):
        table.add_column(name, justify="left" if name == "reaction" else "right", no_wrap=name == "reaction")
    for r, equation in enumerate(found.equations()):
        table.add_row(str(r + 1), equation, _rate(found.k_forward[r]), _rate(found.k_reverse[r]))
    console.print(table)


def print_comparison(console: Console, comparison: dict[str, Any]) -> None:
    """Print each true rate constant beside the discovered one, one row per rate."""
    verdict = "exact match" if comparison["stoichiometry_match"] else "does NOT match"
    table = Table(title=f"Comparison with the true mechanism: stoichiometry {verdict}", box=box.SIMPLE_HEAD)
    for name in ("true reaction", "rate", "true", "found", "rel. error"):
        table.add_column(name, justify="left" if name in ("true reaction", "rate") else "right", no_wrap=True)
    for row in comparison["reactions"]:
        for key, label in (("forward", "k_f"), ("reverse", "k_r")):
            equation = row["equation"] if key == "forward" else ""
            true_value = row[f"k_{key}_true"]
            if not row["matched"]:
                table.add_row(equation, label, _rate(true_value), "not found", "-")
                continue
            error = _error(row[f"k_{key}_relative_error"])
            if key == "reverse" and true_value == 0 and row.get("k_reverse_to_k_forward") is not None:
                error = f"{row['k_reverse_to_k_forward']:.1e} x k_f"
            table.add_row(equation, label, _rate(true_value), _rate(row[f"k_{key}_found"]), error)
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
