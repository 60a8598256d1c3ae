"""Mass-action mechanisms: parsing, YAML files, right-hand sides, canonical form.

A mechanism over n species and R reactions is stored as the signed
stoichiometric matrix ``W`` (n x R; reactants negative, products positive)
and the forward and reverse rate constants ``k_forward`` and ``k_reverse``
(length R, in units that make dc/dt come out in concentration per time).
Reactions are elementary, so reaction orders equal the stoichiometric
coefficients, and a species may not appear on both sides of one reaction.

Mechanism YAML::

    name: michaelis-menten
    species: [E, S, ES, P]
    reactions:
      - {equation: "E + S <=> ES", k_forward: 1.0e6, k_reverse: 1.0e3}
      - {equation: "ES -> E + P", k_forward: 10.0}   # '->': k_reverse is 0
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mmtk.core.errors import InputError
from mmtk.core.io import write_text

# Concentrations at or below zero enter log c as log(1e-30), as in the published model.
LOG_FLOOR = 1e-30

_TERM = re.compile(r"^(\d+)?\s*([A-Za-z_(\[][^\s]*)$")
# The accepted arrows; any other arrow-like mark is rejected rather than guessed.
_ARROW = re.compile(r"<=>|->")
_ARROW_MARKS = re.compile(r"[<>=\u2190-\u21ff]")


@dataclass
class Mechanism:
    """A mass-action mechanism: species names, stoichiometry and rate constants.

    ``stoichiometry`` is an int array of shape (n_species, n_reactions),
    ``k_forward`` and ``k_reverse`` float arrays of shape (n_reactions,).
    """

    species: list[str]
    stoichiometry: np.ndarray
    k_forward: np.ndarray
    k_reverse: np.ndarray
    name: str = "mechanism"
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stoichiometry = np.asarray(self.stoichiometry, dtype=np.int64).reshape(len(self.species), -1)
        self.k_forward = np.asarray(self.k_forward, dtype=np.float64).reshape(-1)
        self.k_reverse = np.asarray(self.k_reverse, dtype=np.float64).reshape(-1)
        n_reactions = self.stoichiometry.shape[1]
        if self.k_forward.shape != (n_reactions,) or self.k_reverse.shape != (n_reactions,):
            raise ValueError(f"mechanism has {n_reactions} reactions but {self.k_forward.size} forward and {self.k_reverse.size} reverse rate constants")

    @property
    def n_species(self) -> int:
        return len(self.species)

    @property
    def n_reactions(self) -> int:
        return self.stoichiometry.shape[1]

    def log_rates(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (b_f, b_r) = (log k_f, log k_r); a zero rate gives -inf."""
        with np.errstate(divide="ignore"):
            return np.log(self.k_forward), np.log(self.k_reverse)

    def rhs(self, c: np.ndarray) -> np.ndarray:
        """Return dc/dt for concentrations ``c`` of shape (..., n_species)."""
        return mass_action_rhs(c, self.stoichiometry, self.k_forward, self.k_reverse)

    def jacobian(self, c: np.ndarray) -> np.ndarray:
        """Return d(dc/dt)/dc, shape (n_species, n_species), at one state ``c`` (n_species,)."""
        reactant_orders = np.maximum(-self.stoichiometry, 0)  # n x R
        product_orders = np.maximum(self.stoichiometry, 0)  # n x R
        c = np.asarray(c, dtype=np.float64)
        d_flux = np.zeros((self.n_reactions, self.n_species))  # R x n: d(net flux)/dc
        for orders, rates, sign in ((reactant_orders, self.k_forward, 1.0), (product_orders, self.k_reverse, -1.0)):
            for i in range(self.n_species):
                powers = np.power(c[:, None], orders)  # n x R
                powers[i] = orders[i] * np.power(c[i], np.maximum(orders[i] - 1, 0))
                d_flux[:, i] += sign * rates * np.prod(powers, axis=0)
        return self.stoichiometry @ d_flux

    def equations(self) -> list[str]:
        """Return one chemical equation per reaction, reactants on the left."""
        return [format_equation(self.species, self.stoichiometry[:, r], self.k_reverse[r] > 0) for r in range(self.n_reactions)]

    def to_yaml_dict(self) -> dict[str, Any]:
        """Return the mechanism as the mapping written to a mechanism YAML file."""
        reactions = []
        for r, equation in enumerate(self.equations()):
            reactions.append({"equation": equation, "k_forward": float(self.k_forward[r]), "k_reverse": float(self.k_reverse[r])})
        data: dict[str, Any] = {"name": self.name, "species": list(self.species), "reactions": reactions}
        if self.notes:
            data["notes"] = self.notes
        return data

    def save(self, path: str | Path) -> Path:
        """Write the mechanism YAML atomically."""
        text = yaml.safe_dump(self.to_yaml_dict(), sort_keys=False, default_flow_style=None, width=120)
        return write_text(path, text)


def mass_action_rhs(c: np.ndarray, stoichiometry: np.ndarray, k_forward: np.ndarray, k_reverse: np.ndarray) -> np.ndarray:
    """Return dc/dt = W (k_f prod c^P - k_r prod c^Q) for ``c`` of shape (..., n)."""
    c = np.asarray(c, dtype=np.float64)
    reactant_orders = np.maximum(-stoichiometry, 0)
    product_orders = np.maximum(stoichiometry, 0)
    forward = k_forward * np.prod(np.power(c[..., :, None], reactant_orders), axis=-2)  # ... x R
    reverse = k_reverse * np.prod(np.power(c[..., :, None], product_orders), axis=-2)  # ... x R
    return (forward - reverse) @ stoichiometry.T  # ... x n


def format_equation(species: list[str], column: np.ndarray, reversible: bool = True) -> str:
    """Format one stoichiometric column as 'A + 2 B <=> C' (reactants are negative entries)."""

    def side(indices: np.ndarray) -> str:
        terms = []
        for i in indices:
            count = abs(int(column[i]))
            terms.append(species[i] if count == 1 else f"{count} {species[i]}")
        return " + ".join(terms) if terms else "0"

    column = np.asarray(column)
    left = side(np.flatnonzero(column < 0))
    right = side(np.flatnonzero(column > 0))
    return f"{left} {'<=>' if reversible else '->'} {right}"


def parse_equation(text: str, species: list[str], where: str) -> tuple[np.ndarray, bool]:
    """Parse 'A + 2 B <=> C' into a signed column over ``species`` and a reversibility flag."""
    arrows = _ARROW.findall(text)
    if len(arrows) > 1:
        raise InputError(f"{where}: equation {text!r} has {len(arrows)} arrows; write one reaction per entry with one arrow, '<=>' (reversible) or '->' (irreversible).")
    marks = _ARROW_MARKS.findall(_ARROW.sub(" ", text))
    if marks:
        raise InputError(f"{where}: equation {text!r} contains the unknown arrow mark {''.join(marks)!r}; the accepted arrows are '<=>' (reversible) and '->' (irreversible).")
    if not arrows:
        raise InputError(f"{where}: equation {text!r} has no arrow; write 'A + B <=> C' (reversible) or 'A -> B' (irreversible).")
    arrow = arrows[0]
    left, _, right = text.partition(arrow)
    column = np.zeros(len(species), dtype=np.int64)
    sides = {}
    for sign, part in ((-1, left), (1, right)):
        seen = set()
        for term in part.split("+"):
            term = term.strip()
            if not term or term == "0":
                continue
            match = _TERM.match(term)
            if match is None or match.group(2) not in species:
                known = ", ".join(species)
                raise InputError(f"{where}: cannot read term {term!r} of equation {text!r}; write a count and a species name such as '2 H'. Known species: {known}.")
            count = int(match.group(1) or 1)
            index = species.index(match.group(2))
            if count == 0:
                raise InputError(f"{where}: term {term!r} of equation {text!r} has a zero coefficient.")
            column[index] += sign * count
            seen.add(index)
        sides[sign] = seen
    both = sides[-1] & sides[1]
    if both:
        names = ", ".join(species[i] for i in sorted(both))
        raise InputError(f"{where}: species {names} appears on both sides of {text!r}; mass-action layers in mmtk support no catalysis, so write the net reaction.")
    if not column.any():
        raise InputError(f"{where}: equation {text!r} changes no species.")
    return column, arrow == "<=>"


def mechanism_from_dict(data: Any, source: str) -> Mechanism:
    """Validate a parsed mechanism YAML mapping (see the module docstring)."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: a mechanism file must hold a mapping with 'species' and 'reactions'.")
    unknown = set(data) - {"name", "species", "reactions", "notes"}
    if unknown:
        raise InputError(f"{source}: unknown mechanism key(s) {', '.join(sorted(map(str, unknown)))}; accepted keys: name, species, reactions, notes.")
    species = data.get("species")
    if not isinstance(species, list) or not species or not all(isinstance(s, str) and s for s in species):
        raise InputError(f"{source}: 'species' must be a non-empty list of names, got {species!r}.")
    if len(set(species)) != len(species):
        raise InputError(f"{source}: species names must be unique, got {species}.")
    reactions = data.get("reactions")
    if not isinstance(reactions, list) or not reactions:
        raise InputError(f"{source}: 'reactions' must be a non-empty list of {{equation, k_forward, k_reverse}} entries.")

    columns, k_forward, k_reverse = [], [], []
    for r, entry in enumerate(reactions):
        where = f"{source}: reactions[{r}]"
        if not isinstance(entry, dict) or "equation" not in entry or not isinstance(entry["equation"], str):
            raise InputError(f"{where} must be a mapping with an 'equation' string, got {entry!r}.")
        extra = set(entry) - {"equation", "k_forward", "k_reverse"}
        if extra:
            raise InputError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))}; accepted: equation, k_forward, k_reverse.")
        column, reversible = parse_equation(entry["equation"], species, where)
        forward = _rate(entry.get("k_forward"), f"{where}.k_forward", required=True)
        reverse = _rate(entry.get("k_reverse", 0.0 if not reversible else None), f"{where}.k_reverse", required=reversible)
        if not reversible and reverse != 0.0:
            raise InputError(f"{where}: '->' marks an irreversible reaction, so k_reverse must be 0 (got {reverse}); write '<=>' for a reversible one.")
        columns.append(column)
        k_forward.append(forward)
        k_reverse.append(reverse)

    name = str(data.get("name", Path(source).stem))
    notes = data.get("notes") if isinstance(data.get("notes"), dict) else {}
    return Mechanism(species=list(species), stoichiometry=np.stack(columns, axis=1), k_forward=np.array(k_forward), k_reverse=np.array(k_reverse), name=name, notes=notes)


def _rate(value: Any, where: str, required: bool) -> float:
    if value is None:
        if required:
            raise InputError(f"{where} is missing; give a rate constant >= 0.")
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where} must be a number >= 0, got {value!r}.") from None
    if not np.isfinite(number) or number < 0:
        raise InputError(f"{where} must be a finite number >= 0, got {value!r}.")
    return number


def bundled_mechanisms() -> list[str]:
    """Return the names of the mechanisms shipped in ``mmtk/reactions/mechanisms``."""
    root = importlib.resources.files("mmtk.reactions") / "mechanisms"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_mechanism(ref: str | Path) -> Path:
    """Find a mechanism given as a YAML path or the name of a bundled mechanism."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InputError(f"mechanism file not found: {path}. Give a YAML path or one of the bundled mechanisms: {', '.join(bundled_mechanisms())}.")
        return path
    bundled = Path(str(importlib.resources.files("mmtk.reactions") / "mechanisms" / f"{ref}.yaml"))
    if not bundled.is_file():
        raise InputError(f"mechanism not found: {ref!r} is neither a file nor a bundled mechanism ({', '.join(bundled_mechanisms())}).")
    return bundled


def load_mechanism(ref: str | Path) -> Mechanism:
    """Load and validate a mechanism YAML file or bundled mechanism name."""
    path = resolve_mechanism(ref)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read mechanism {path}: {exc}") from exc
    return mechanism_from_dict(data, str(path))


# ------------------------------------------------------------ canonical form


TIE_RTOL = 1e-9
"""Forward and reverse rate constants this close (relative) count as a tie in the canonical form."""


def canonical_order(stoichiometry: np.ndarray, forward: np.ndarray, reverse: np.ndarray, tie_rtol: float = TIE_RTOL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Put reactions in canonical form; return (W, forward, reverse) reordered and reoriented.

    ``forward`` and ``reverse`` are rate constants (non-negative).

    1. A reaction with forward < reverse is reversed (column negated, rates
       swapped), so the forward direction is the faster one.
    2. A tie, |forward - reverse| <= ``tie_rtol`` * max(forward, reverse)
       (default 1e-9), is oriented so that the first non-zero entry of the
       column is negative. Fitted rates of a truly tied reaction differ in
       the last digits, so an exact comparison would orient them at random.
    3. Reactions are sorted by forward rate, largest first; equal forward
       rates are ordered by comparing their columns lexicographically.
    """
    W = np.array(stoichiometry, copy=True)
    forward = np.array(forward, dtype=np.float64, copy=True)
    reverse = np.array(reverse, dtype=np.float64, copy=True)
    for r in range(W.shape[1]):
        column = W[:, r]
        nonzero = np.flatnonzero(column)
        first_positive = nonzero.size > 0 and column[nonzero[0]] > 0
        tied = abs(forward[r] - reverse[r]) <= tie_rtol * max(forward[r], reverse[r])
        if (forward[r] < reverse[r] and not tied) or (tied and first_positive):
            W[:, r] = -column
            forward[r], reverse[r] = reverse[r], forward[r]
    keys = [(-forward[r], tuple(W[:, r].tolist())) for r in range(W.shape[1])]
    order = sorted(range(W.shape[1]), key=lambda r: keys[r])
    return W[:, order], forward[order], reverse[order]


def canonicalize(mechanism: Mechanism) -> Mechanism:
    """Return the mechanism in canonical form (see :func:`canonical_order`)."""
    W, k_forward, k_reverse = canonical_order(mechanism.stoichiometry, mechanism.k_forward, mechanism.k_reverse)
    return Mechanism(species=list(mechanism.species), stoichiometry=W, k_forward=k_forward, k_reverse=k_reverse, name=mechanism.name, notes=dict(mechanism.notes))
