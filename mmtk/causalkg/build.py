"""``build-causal-kg``: responses -> mastery -> bootstrapped skill DAG -> causal edge effects -> files.

Run-folder files (besides the core's recipe.yaml, meta.json, log.txt, summary.json):

- ``network.json``: the network (schema in :mod:`mmtk.causalkg.network`);
- ``network.graphml``: retained edges with effect, interval and frequencies;
- ``network.png`` or ``.svg``: the drawn network;
- ``cpts.txt``: the conditional probability tables as text;
- ``bootstrap.json``: every skill pair seen in a resample with its frequencies;
- ``resamples/structures.json`` and ``resamples/effects.json``: the edge
  list and the effect values of every finished resample (schema in
  :mod:`mmtk.causalkg.resamples`), which ``--resume`` reuses;
- ``mastery.h5`` (schema ``mmtk.causal-kg.mastery/1``): ``mastery_probability``
  float64 (students x skills), ``mastered`` int8 (students x skills),
  ``q_matrix`` int64 (items x skills), ``slip`` and ``guess`` float64 (items,
  DINA only), ``skill_names`` strings (skills).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mmtk.core.errors import DataError, InputError
from mmtk.core.hdf5 import write_datasets
from mmtk.core.io import write_json, write_text
from mmtk.core.logging import get_logger
from mmtk.core.recipe import to_dict
from mmtk.core.runner import RunContext
from mmtk.causalkg.data import ResponseData, load_response_data
from mmtk.causalkg.effects import bootstrap_effects, cpd_tables, edge_effects, fit_network, quiet_pgmpy
from mmtk.causalkg.mastery import DINA, MASTERY_MODELS, MasteryModel
from mmtk.causalkg.network import CausalKnowledgeNetwork, draw_network
from mmtk.causalkg.resamples import ResampleStore, fingerprint
from mmtk.causalkg.recipes import BuildRecipe
from mmtk.causalkg.simulate import simulate_cohort
from mmtk.causalkg.structure import StructureSettings, as_categorical, bootstrap_structures, check_constraints, consensus_dag, default_workers, orient_consensus

log = get_logger(__name__)

MASTERY_SCHEMA = "mmtk.causal-kg.mastery/1"

# Recipe keys that may change on --resume besides the core's: more resamples
# add to the stored ones (each resample is seeded by its index), and the
# number of worker processes does not change any result.
RESUMABLE_KEYS = frozenset({"resamples", "workers"})

# Fewest students a build accepts, the same as the minimum of
# data.simulated_students. Structure learning and bootstrap intervals on
# fewer students carry no information, and pgmpy fails outright on one.
MIN_STUDENTS = 10


def load_data(recipe: BuildRecipe) -> ResponseData:
    """Read the recipe's data, or simulate it; raise InputError on invalid input."""
    section = recipe.data
    if section.source == "simulated":
        given = [f"data.{key}" for key in ("responses", "q_matrix", "skills") if getattr(section, key) is not None]
        if given:
            raise InputError(f"data.source=simulated draws its own students, so {', '.join(given)} would be ignored. Set data.source=files to read them, or set {' '.join(f'{key}=null' for key in given)}.")
        cohort = simulate_cohort(section.simulated_students, recipe.seed)
        names = section.skill_names or cohort.skills
        if len(names) != len(cohort.skills):
            raise InputError(f"data.skill_names has {len(names)} names but the simulated network has {len(cohort.skills)} skills.")
        return ResponseData(cohort.responses, cohort.q_matrix, list(names), [""] * len(names), "simulated arithmetic network")
    if section.responses is None:
        raise InputError("data.responses is not set. Pass the response file or FrcSub folder, for example data.responses=data/frcsub (get FrcSub with mmtk download-frcsub data/frcsub).")
    data = load_response_data(section.responses, section.q_matrix, section.skills, section.skill_names or None)
    if data.n_students < MIN_STUDENTS:
        raise DataError(f"response matrix {data.source} has {data.n_students} student row(s); building a network needs at least {MIN_STUDENTS}. Use the responses of more students.")
    return data


def structure_settings(recipe: BuildRecipe, skills: list[str]) -> StructureSettings:
    """Translate the recipe's structure section, checking its constraints against ``skills``."""
    section = recipe.structure
    for key, edges in (("forbidden_edges", section.forbidden_edges), ("required_edges", section.required_edges)):
        for edge in edges:
            if len(edge) != 2:
                raise InputError(f"structure.{key} entry {edge!r} must be a pair [parent, child].")
    settings = StructureSettings(
        algorithm=section.algorithm,
        score=section.score,
        max_indegree=section.max_indegree,
        ci_test=section.ci_test,
        significance_level=section.significance_level,
        forbidden=[tuple(e) for e in section.forbidden_edges],
        required=[tuple(e) for e in section.required_edges],
        order=[list(t) for t in section.order],
    )
    check_constraints(settings, skills)
    return settings


def with_rate_order(settings: StructureSettings, skills: list[str], rates: np.ndarray) -> StructureSettings:
    """Return ``settings`` that also forbid each edge from a less often to a more often mastered skill.

    Under a noisy-AND prerequisite model a prerequisite is mastered at least
    as often as any skill that needs it. Pairs with equal rates, required
    edges and pairs the order already covers stay unconstrained.
    """
    required = {tuple(e) for e in settings.required}
    tier = {name: level for level, names in enumerate(settings.order) for name in names}
    added = []
    for a, rate_a in zip(skills, rates):
        for b, rate_b in zip(skills, rates):
            ordered = a in tier and b in tier and tier[a] != tier[b]
            if rate_a < rate_b and (a, b) in required:
                log.warning("required edge %s -> %s kept although orient_by_mastery_rate would forbid it (%s is mastered by %.2f of the students, %s by %.2f)", a, b, a, rate_a, b, rate_b)
            elif rate_a < rate_b and not ordered:
                added.append((a, b))
    log.info("orient_by_mastery_rate forbids %d edges; skills by mastery rate: %s", len(added), ", ".join(f"{s} {r:.2f}" for s, r in sorted(zip(skills, rates), key=lambda p: -p[1])))
    return dataclasses.replace(settings, forbidden=[*settings.forbidden, *added])


def fit_mastery(recipe: BuildRecipe, data: ResponseData) -> tuple[MasteryModel, np.ndarray]:
    """Fit the mastery model; return it and P(mastered) (students x skills)."""
    if recipe.mastery.model == "dina":
        model: MasteryModel = DINA(max_iter=recipe.mastery.max_iter, tol=recipe.mastery.tol, prior_smoothing=recipe.mastery.prior_smoothing)
    else:
        model = MASTERY_MODELS[recipe.mastery.model]()
    model.fit(data.responses, data.q_matrix)
    return model, model.mastery_probabilities(data.responses)


def summarise_edges(edges, effects, effect_samples, frequencies, confidence) -> list[dict[str, Any]]:
    """Return one record per edge with its effect, percentile interval and bootstrap frequencies."""
    records = []
    tail = 100 * (1 - confidence) / 2
    for index, (parent, child) in enumerate(edges):
        samples = effect_samples[:, index] if effect_samples.size else np.array([])
        low, high = (np.percentile(samples, [tail, 100 - tail]) if samples.size else (None, None))
        adjacency, direction = frequencies(parent, child)
        records.append({
            "parent": parent,
            "child": child,
            "effect": float(effects[(parent, child)]),
            "ci_low": None if low is None else float(low),
            "ci_high": None if high is None else float(high),
            "frequency": adjacency,
            "direction_frequency": direction,
        })
    return records


def run_build(context: RunContext) -> dict[str, Any]:
    """Entry point of ``mmtk build-causal-kg`` (called by the core runner)."""
    recipe: BuildRecipe = context.recipe
    quiet_pgmpy()

    # Validate everything before the run folder exists.
    data = load_data(recipe)
    settings = structure_settings(recipe, data.skill_names)
    workers = recipe.bootstrap.workers or default_workers()
    context.start()
    log.info("data: %d students x %d items, %d skills from %s", data.n_students, data.n_items, data.n_skills, data.source)

    # Skill mastery.
    mastery_model, probabilities = fit_mastery(recipe, data)  # (N, K)
    mastered = (probabilities >= recipe.mastery.threshold).astype(np.int8)  # (N, K)
    rates = mastered.mean(axis=0)
    for name, rate in zip(data.skill_names, rates):
        if rate in (0.0, 1.0):
            log.warning("skill %s is mastered by %s student; it cannot take part in any edge", name, "every" if rate == 1.0 else "no")

    if recipe.structure.orient_by_mastery_rate:
        settings = with_rate_order(settings, data.skill_names, rates)

    # Structure: bootstrap, then the consensus DAG.
    structure_store = ResampleStore(
        context.run.file("resamples/structures.json"), "structure", fingerprint(mastered, data.skill_names, recipe.seed, settings), load=context.run.resume,
    )
    bootstrap = bootstrap_structures(mastered, data.skill_names, settings, recipe.bootstrap.resamples, recipe.seed, workers, store=structure_store)
    frame = as_categorical(mastered, data.skill_names)
    consensus = orient_consensus(frame, consensus_dag(bootstrap, data.skill_names, recipe.bootstrap.threshold, settings), settings)
    log.info("consensus DAG: %d edges at frequency >= %.2f", len(consensus), recipe.bootstrap.threshold)

    # Causal effects of the consensus edges, with bootstrap intervals.
    consensus_model = fit_network(frame, consensus, recipe.effects.equivalent_sample_size)
    effects = edge_effects(consensus_model, consensus)
    effect_inputs = {"edges": consensus, "equivalent_sample_size": recipe.effects.equivalent_sample_size}
    effect_store = ResampleStore(context.run.file("resamples/effects.json"), "effect", fingerprint(mastered, data.skill_names, recipe.seed, effect_inputs), load=context.run.resume)
    samples = bootstrap_effects(mastered, data.skill_names, consensus, recipe.bootstrap.resamples, recipe.seed, workers, recipe.effects.equivalent_sample_size, store=effect_store)  # (R, E)

    def frequencies(u: str, v: str) -> tuple[float, float]:
        return bootstrap.adjacency_frequency(u, v), bootstrap.direction_frequency(u, v)

    records = summarise_edges(consensus, effects, samples, frequencies, recipe.effects.confidence)
    # Required edges stay whatever their effect, because the user asserted them.
    required = set(settings.required)
    kept = [r for r in records if r["effect"] >= recipe.effects.min_effect or (r["parent"], r["child"]) in required]
    dropped = [{**r, "reason": f"effect {r['effect']:+.3f} below min_effect {recipe.effects.min_effect}"} for r in records if r not in kept]
    for r in kept:
        if r["effect"] < recipe.effects.min_effect:
            log.warning("required edge %s -> %s kept although its effect %+.3f is below min_effect %s", r["parent"], r["child"], r["effect"], recipe.effects.min_effect)

    # Final tables on the retained edges.
    final_model = fit_network(frame, [(r["parent"], r["child"]) for r in kept], recipe.effects.equivalent_sample_size)
    network = CausalKnowledgeNetwork(
        skills=[{"name": n, "description": d, "mastery_rate": float(r)} for n, d, r in zip(data.skill_names, data.skill_descriptions, rates)],
        edges=kept,
        dropped_edges=dropped,
        cpds=cpd_tables(final_model),
        mastery_model=mastery_model.parameters(),
        mastery_threshold=recipe.mastery.threshold,
        settings={"structure": to_dict(recipe.structure), "bootstrap": to_dict(recipe.bootstrap), "effects": to_dict(recipe.effects), "data_source": data.source, "n_students": data.n_students},
    )
    files = write_outputs(context, recipe, network, final_model, bootstrap, data, mastery_model, probabilities, mastered)
    if isinstance(mastery_model, DINA):
        print_item_parameters(context, mastery_model, data.skill_names)
    print_summary(context, network, data)

    summary = {
        "n_students": data.n_students,
        "n_items": data.n_items,
        "n_skills": data.n_skills,
        "mastery_model": mastery_model.name,
        "mastery_log_likelihood": getattr(mastery_model, "log_likelihood", None),
        "workers": workers,
        "n_consensus_edges": len(consensus),
        "n_edges": len(kept),
        "n_dropped_edges": len(dropped),
        "edges": [{k: r[k] for k in ("parent", "child", "effect", "ci_low", "ci_high", "frequency")} for r in kept],
        "dropped_edges": [f"{r['parent']}->{r['child']}" for r in dropped],
        "files": files,
    }
    context.run.log_metrics({"n_edges": len(kept), "n_dropped_edges": len(dropped), "n_consensus_edges": len(consensus)})
    return summary


def write_outputs(context, recipe, network, final_model, bootstrap, data, mastery_model, probabilities, mastered) -> dict[str, str]:
    """Write the network files, tables, bootstrap frequencies, mastery store and figure."""
    run = context.run
    network.write_json(run.file("network.json"))
    network.write_graphml(run.file("network.graphml"))
    write_text(run.file("cpts.txt"), "\n\n".join(str(final_model.get_cpds(node)) for node in data.skill_names) + "\n")

    # Ties are ordered by name: set order depends on the string-hash seed, which differs between processes.
    pairs = sorted({tuple(sorted(edge)) for edge in bootstrap.directed_counts}, key=lambda p: (-bootstrap.adjacency_frequency(*p), p))
    write_json(run.file("bootstrap.json"), {
        "n_resamples": bootstrap.n_resamples,
        "pairs": [{"u": u, "v": v, "frequency": bootstrap.adjacency_frequency(u, v), "u_to_v": bootstrap.direction_frequency(u, v), "v_to_u": bootstrap.direction_frequency(v, u)} for u, v in pairs],
    })

    datasets: dict[str, Any] = {
        "mastery_probability": probabilities,
        "mastered": mastered,
        "q_matrix": data.q_matrix,
        "skill_names": data.skill_names,
    }
    if isinstance(mastery_model, DINA):
        datasets["slip"] = mastery_model.slip
        datasets["guess"] = mastery_model.guess
    write_datasets(run.file("mastery.h5"), datasets, schema=MASTERY_SCHEMA)

    figure = run.file(f"network.{recipe.figure_format}")
    draw_network(network, figure)
    return {name: str(run.file(name)) for name in ("network.json", "network.graphml", figure.name, "cpts.txt", "bootstrap.json", "mastery.h5")}


def print_item_parameters(context: RunContext, model: DINA, skill_names: list[str]) -> None:
    """Print the fitted DINA slip and guess of every item."""
    from rich.table import Table

    table = Table("item", "skills needed", "slip", "guess", title=f"DINA item parameters (log-likelihood {model.log_likelihood:.2f})")
    for item, (row, slip, guess) in enumerate(zip(model.q_matrix, model.slip, model.guess), start=1):
        table.add_row(str(item), " ".join(skill_names[k] for k in np.flatnonzero(row)), f"{slip:.3f}", f"{guess:.3f}")
    context.console.print(table)


def print_summary(context: RunContext, network: CausalKnowledgeNetwork, data: ResponseData) -> None:
    """Print the retained and dropped edges as tables."""
    from rich.table import Table

    table = Table("parent", "child", "effect (ACE)", "interval", "bootstrap freq.", title=f"Causal knowledge network: {len(network.edges)} edges over {data.n_skills} skills")
    for r in network.edges:
        interval = f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]" if r["ci_low"] is not None else "-"
        table.add_row(r["parent"], r["child"], f"{r['effect']:+.3f}", interval, f"{r['frequency']:.2f}")
    context.console.print(table)
    if network.dropped_edges:
        dropped = ", ".join(f"{r['parent']}->{r['child']} ({r['effect']:+.3f})" for r in network.dropped_edges)
        context.console.print(f"Dropped (effect below threshold): {dropped}")
