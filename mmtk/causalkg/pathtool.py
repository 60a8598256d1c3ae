"""``recommend-path``: learning paths for one student or a file of students, plus the simulated evaluation.

Run-folder files: ``paths.json`` (one entry per student: name, mastery,
steps), ``paths.txt`` (the same as readable text), and with evaluation on,
``evaluation.json`` and ``evaluation.png`` (mean score after k steps per
strategy).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from mmtk.core.errors import DataError, InputError
from mmtk.core.io import atomic_path, write_json, write_text
from mmtk.core.logging import get_logger
from mmtk.core.runner import RunContext
from mmtk.causalkg.data import check_responses, read_matrix
from mmtk.causalkg.effects import quiet_pgmpy
from mmtk.causalkg.mastery import mastery_model_from_parameters
from mmtk.causalkg.network import CausalKnowledgeNetwork
from mmtk.causalkg.recipes import RecommendRecipe
from mmtk.causalkg.recommend import InterventionalQueries, check_target, evaluate_paths, explain_path, recommend_path

log = get_logger(__name__)


def _mastery_from_responses(network: CausalKnowledgeNetwork, responses: np.ndarray, where: str) -> np.ndarray:
    model = mastery_model_from_parameters(network.mastery_model)
    n_items = model.q_matrix.shape[0]
    if responses.shape[1] != n_items:
        raise DataError(f"{where} has {responses.shape[1]} responses per student but the network's mastery model has {n_items} items.")
    check_responses(responses, where)
    return model.mastery_probabilities(responses)  # (N, K)


def _read_mastery_csv(path: Path, skills: list[str]) -> tuple[list[str], np.ndarray]:
    """Read a CSV of P(mastered) with a header of skill names and an optional ``student`` column.

    A skill without a column, or an empty cell, counts as 0. Messages give
    line numbers of the file (the header is line 1).
    """
    if not path.is_file():
        raise DataError(f"students file not found: {path}. Check the path.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [cell.strip() for cell in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read mastery file {path} as UTF-8 CSV ({exc}). student.file_kind=mastery expects a CSV whose header names the skills; use student.file_kind=responses for a response matrix.") from exc
    if not rows:
        raise DataError(f"mastery file {path} has no rows; it needs a header naming the skills and one row per student.")
    unknown = [c for c in header if c not in skills and c != "student"]
    if unknown:
        raise DataError(f"mastery file {path} names unknown skill(s) {', '.join(map(repr, unknown))}; the network's skills are {', '.join(skills)}.")
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise DataError(f"mastery file {path} names the column(s) {', '.join(map(repr, duplicates))} more than once in its header. Keep one column per skill.")
    if not any(c in skills for c in header):
        raise DataError(f"mastery file {path} has no skill column (header: {', '.join(header)}); name one or more of the network's skills {', '.join(skills)} in the header.")

    values = np.zeros((len(rows), len(skills)))  # (N, K)
    for index, (line, row) in enumerate(rows):
        if len(row) != len(header):
            raise DataError(f"mastery file {path}: line {line} has {len(row)} cells but the header has {len(header)}. Give one cell per header column.")
        for column, cell in zip(header, row):
            if column == "student" or not cell.strip():
                continue
            try:
                value = float(cell)
            except ValueError:
                raise DataError(f"mastery file {path}: line {line}, skill {column} contains {cell.strip()!r}, which is not a number. Give P(mastered) between 0 and 1.") from None
            if not 0.0 <= value <= 1.0:
                raise DataError(f"mastery file {path}: line {line}, skill {column} contains {cell.strip()}; P(mastered) must be between 0 and 1.")
            values[index, skills.index(column)] = value
    names = [(row[header.index("student")].strip() if "student" in header else "") or f"student-{i + 1}" for i, (_, row) in enumerate(rows)]
    return names, values


def load_students(recipe: RecommendRecipe, network: CausalKnowledgeNetwork) -> tuple[list[str], np.ndarray]:
    """Return student names and P(mastered) (students x skills) from the recipe's student section."""
    section = recipe.student
    skills = network.skill_names
    given = [name for name, present in (("student.responses", bool(section.responses)), ("student.mastery", bool(section.mastery)), ("student.file", section.file is not None)) if present]
    if len(given) != 1:
        raise InputError(f"give exactly one of student.responses, student.mastery or student.file; got {', '.join(given) or 'none'}.")

    if section.responses:
        responses = np.array([[np.nan if v is None else float(v) for v in section.responses]])
        return [section.name], _mastery_from_responses(network, responses, "student.responses")
    if section.mastery:
        unknown = [s for s in section.mastery if s not in skills]
        if unknown:
            raise InputError(f"student.mastery names unknown skill(s) {', '.join(unknown)}; the network's skills are {', '.join(skills)}.")
        values = [section.mastery.get(s, 0.0) for s in skills]
        bad = [f"{s}={v!r}" for s, v in zip(skills, values) if not 0.0 <= v <= 1.0]
        if bad:
            raise InputError(f"student.mastery values must be probabilities between 0 and 1; got {', '.join(bad)}.")
        return [section.name], np.array([values])
    if section.file_kind == "mastery":
        return _read_mastery_csv(section.file, skills)
    responses, _ = read_matrix(section.file, "responses")
    probabilities = _mastery_from_responses(network, responses, str(section.file))
    return [f"student-{i + 1}" for i in range(len(probabilities))], probabilities


def run_recommend(context: RunContext) -> dict[str, Any]:
    """Entry point of ``mmtk recommend-path`` (called by the core runner)."""
    recipe: RecommendRecipe = context.recipe
    quiet_pgmpy()

    network = CausalKnowledgeNetwork.read(recipe.network)
    check_target(network, recipe.target)
    names, probabilities = load_students(recipe, network)
    context.start()

    queries = InterventionalQueries(network)
    skills = network.skill_names
    entries, texts = [], []
    for name, row in zip(names, probabilities):
        mastery = {s: float(p) for s, p in zip(skills, row)}
        steps = recommend_path(network, mastery, recipe.target, queries)
        entries.append({"student": name, "mastery": mastery, "target": recipe.target, "steps": [s.to_dict() for s in steps]})
        texts.append(explain_path(steps, recipe.target, name, network.settings.get("effects", {}).get("confidence", 0.95)))
    write_json(context.run.file("paths.json"), {"target": recipe.target, "mastery_threshold": network.mastery_threshold, "students": entries})
    write_text(context.run.file("paths.txt"), "\n".join(texts))
    context.console.print(texts[0] if len(texts) == 1 else f"{len(texts)} paths written; first:\n{texts[0]}", markup=False, highlight=False, soft_wrap=True)

    summary: dict[str, Any] = {
        "target": recipe.target,
        "n_students": len(entries),
        "path": [s["skill"] for s in entries[0]["steps"]],
        "mean_path_length": float(np.mean([len(e["steps"]) for e in entries])),
    }
    if recipe.evaluate.enabled:
        evaluation = evaluate_paths(network, recipe.target, recipe.evaluate.students, recipe.evaluate.steps, recipe.seed, recipe.evaluate.p_ready, recipe.evaluate.p_unready)
        write_json(context.run.file("evaluation.json"), evaluation)
        plot_evaluation(evaluation, recipe.target, context.run.file("evaluation.png"))
        print_evaluation(context, evaluation)
        summary["evaluation"] = {name: values["mean"][-1] for name, values in evaluation["strategies"].items()}
        summary["evaluation_steps"] = recipe.evaluate.steps
        for step, _ in enumerate(evaluation["strategies"]["recommended"]["mean"]):
            context.run.log_metrics({"step": step, **{name: values["mean"][step] for name, values in evaluation["strategies"].items()}})
    summary["files"] = [str(context.run.file(n)) for n in ("paths.json", "paths.txt", "evaluation.json", "evaluation.png") if context.run.file(n).exists()]
    return summary


def print_evaluation(context: RunContext, evaluation: dict[str, Any]) -> None:
    """Print the mean target score after each number of steps, per strategy."""
    from rich.table import Table

    strategies = evaluation["strategies"]
    table = Table("steps k", *strategies, title=f"Expected P(target mastered) over {evaluation['n_students']} simulated students")
    for step in range(evaluation["max_steps"] + 1):
        table.add_row(str(step), *(f"{strategies[n]['mean'][step]:.3f} ± {strategies[n]['stderr'][step]:.3f}" for n in strategies))
    context.console.print(table)


def plot_evaluation(evaluation: dict[str, Any], target: str, path: Path) -> None:
    """Plot mean score against steps with standard-error bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    steps = np.arange(evaluation["max_steps"] + 1)
    for name, values in evaluation["strategies"].items():
        mean, stderr = np.asarray(values["mean"]), np.asarray(values["stderr"])
        axes.plot(steps, mean, marker="o", label=name)
        axes.fill_between(steps, mean - stderr, mean + stderr, alpha=0.2)
    axes.set_xlabel("learning steps k")
    axes.set_ylabel(f"expected P({target} mastered)")
    axes.set_ylim(0, 1)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
