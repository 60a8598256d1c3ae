"""Comparison of a discovered mechanism with a ground-truth mechanism.

Both are put in canonical form. The stoichiometry matches when every true
reaction has exactly one discovered reaction with the same column or its
negation (a negated column is the same reaction written backwards, so its
rates are swapped before comparing), and no discovered reaction is left over.
Each rate constant k > 0 gets the relative error |k_found - k| / k. A true
rate of 0 (an irreversible reaction) has no relative error; its found value
and the ratio to the reaction's forward rate are reported instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmtk.reactions.mechanism import Mechanism, canonicalize, format_equation


def drop_empty_reactions(mechanism: Mechanism) -> Mechanism:
    """Remove reactions whose stoichiometric column is all zeros."""
    keep = np.any(mechanism.stoichiometry != 0, axis=0)
    return Mechanism(
        species=list(mechanism.species),
        stoichiometry=mechanism.stoichiometry[:, keep],
        k_forward=mechanism.k_forward[keep],
        k_reverse=mechanism.k_reverse[keep],
        name=mechanism.name,
        notes=dict(mechanism.notes),
    )


def relative_error(found: float, true: float) -> float | None:
    """Return |found - true| / true, or None when ``true`` is 0."""
    return abs(found - true) / true if true > 0 else None


def compare_mechanisms(found: Mechanism, truth: Mechanism) -> dict[str, Any]:
    """Return the comparison summary (JSON-ready) of ``found`` against ``truth``.

    Keys: ``stoichiometry_match`` (bool), ``canonical_matrix_equal`` (bool),
    ``max_rate_relative_error`` (over matched reactions and true rates > 0,
    None when nothing matched), ``unmatched_found`` (equations) and
    ``reactions``: one entry per true reaction in canonical order.
    """
    if list(found.species) != list(truth.species):
        raise ValueError(f"species differ: {found.species} vs {truth.species}")
    found = canonicalize(drop_empty_reactions(found))
    truth = canonicalize(truth)

    used: set[int] = set()
    rows = []
    errors = []
    for t in range(truth.n_reactions):
        column = truth.stoichiometry[:, t]
        row: dict[str, Any] = {
            "equation": format_equation(truth.species, column, truth.k_reverse[t] > 0),
            "column": column.tolist(),
            "k_forward_true": float(truth.k_forward[t]),
            "k_reverse_true": float(truth.k_reverse[t]),
            "matched": False,
        }
        for f in range(found.n_reactions):
            if f in used:
                continue
            if np.array_equal(found.stoichiometry[:, f], column):
                k_f, k_r = found.k_forward[f], found.k_reverse[f]
            elif np.array_equal(found.stoichiometry[:, f], -column):
                k_f, k_r = found.k_reverse[f], found.k_forward[f]
            else:
                continue
            used.add(f)
            row.update(matched=True, k_forward_found=float(k_f), k_reverse_found=float(k_r))
            for key, true_value, found_value in (("forward", truth.k_forward[t], k_f), ("reverse", truth.k_reverse[t], k_r)):
                error = relative_error(float(found_value), float(true_value))
                row[f"k_{key}_relative_error"] = error
                if error is not None:
                    errors.append(error)
            if truth.k_reverse[t] == 0:
                row["k_reverse_to_k_forward"] = float(k_r / k_f) if k_f > 0 else None
            break
        rows.append(row)

    unmatched = [format_equation(found.species, found.stoichiometry[:, f]) for f in range(found.n_reactions) if f not in used]
    matched_all = all(row["matched"] for row in rows) and not unmatched
    canonical_equal = found.stoichiometry.shape == truth.stoichiometry.shape and bool(np.array_equal(found.stoichiometry, truth.stoichiometry))
    return {
        "stoichiometry_match": bool(matched_all),
        "canonical_matrix_equal": canonical_equal,
        "max_rate_relative_error": max(errors) if errors else None,
        "unmatched_found": unmatched,
        "reactions": rows,
    }
