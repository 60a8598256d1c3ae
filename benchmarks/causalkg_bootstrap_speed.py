"""Wall time of the mmtk build stages against a sequential loop of the same pgmpy calls.

Network alarm (37 variables), ``--samples`` rows, ``--resamples`` bootstrap
resamples. Both sides run in this one process run, on the same data:

- baseline: a plain loop that calls pgmpy's HillClimbSearch (BIC, with the
  candidate operations sorted by name as mmtk does, so both sides break ties
  the same way) on every resample, builds the consensus, fits the tables and computes the
  interventional effect of every consensus edge on every resample, one
  resample after another;
- mmtk: the same calls through ``bootstrap_structures`` and
  ``bootstrap_effects`` on ``--workers`` processes.

Both sides must return the same consensus graph. Prints a Markdown table
with the ratio mmtk / baseline.

Usage: python benchmarks/causalkg_bootstrap_speed.py [--samples 5000] [--resamples 100] [--workers 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from causalkg_common import load_average, load_network, pin_hash_seed, sample_codes  # noqa: E402


def consensus_from_edge_lists(edge_lists, columns, frame, settings):
    from mmtk.causalkg.structure import BootstrapResult, consensus_dag, orient_consensus

    counts = {}
    for edges in edge_lists:
        for edge in edges:
            counts[edge] = counts.get(edge, 0) + 1
    result = BootstrapResult(n_resamples=len(edge_lists), directed_counts=counts)
    return orient_consensus(frame, consensus_dag(result, columns, 0.5, settings), settings)


def run_baseline(codes, columns, states, resamples, seed):
    """Run the plain pgmpy calls one resample after another."""
    from pgmpy.inference import CausalInference

    from mmtk.causalkg.effects import edge_effect, fit_network
    from mmtk.causalkg.structure import StructureSettings, as_categorical, resample_indices, sorted_hill_climb

    settings = StructureSettings()
    edge_lists = []
    for r in range(resamples):
        rows = resample_indices(len(codes), seed, r)
        learner = sorted_hill_climb()(scoring_method="bic-d", return_type="dag", show_progress=False)
        learner.fit(as_categorical(codes[rows], columns, states))
        edge_lists.append([(str(u), str(v)) for u, v in learner.causal_graph_.edges()])

    frame = as_categorical(codes, columns, states)
    consensus = consensus_from_edge_lists(edge_lists, columns, frame, settings)
    model = fit_network(frame, consensus)
    inference = CausalInference(model)
    for u, v in consensus:
        edge_effect(model, u, v, inference)
    for r in range(resamples):
        rows = resample_indices(len(codes), seed, r)
        model = fit_network(as_categorical(codes[rows], columns, states), consensus)
        inference = CausalInference(model)
        for u, v in consensus:
            edge_effect(model, u, v, inference)
    return consensus


def run_mmtk(codes, columns, states, resamples, seed, workers):
    """Run the build's stages with the resamples spread over worker processes."""
    from mmtk.causalkg.effects import bootstrap_effects, edge_effects, fit_network
    from mmtk.causalkg.structure import StructureSettings, as_categorical, bootstrap_structures, consensus_dag, orient_consensus

    settings = StructureSettings()
    bootstrap = bootstrap_structures(codes, columns, settings, resamples, seed, workers, states)
    frame = as_categorical(codes, columns, states)
    consensus = orient_consensus(frame, consensus_dag(bootstrap, columns, 0.5, settings), settings)
    edge_effects(fit_network(frame, consensus), consensus)
    bootstrap_effects(codes, columns, consensus, resamples, seed, workers, states=states)
    return consensus


def cpu_seconds() -> float:
    """Return user + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    pin_hash_seed()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="alarm")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--resamples", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from mmtk.causalkg.effects import quiet_pgmpy
    from mmtk.causalkg.structure import preload_pgmpy

    quiet_pgmpy()
    preload_pgmpy()
    warnings.simplefilter("ignore")
    codes, columns, states = sample_codes(load_network(args.network), args.samples, args.seed)

    print(f"load average before: {load_average()}", flush=True)
    start, start_cpu = time.perf_counter(), cpu_seconds()
    baseline_graph = run_baseline(codes, columns, states, args.resamples, args.seed)
    baseline_seconds, baseline_cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    print(f"baseline done in {baseline_seconds:.1f} s ({baseline_cpu:.1f} CPU s); load average: {load_average()}", flush=True)

    start, start_cpu = time.perf_counter(), cpu_seconds()
    mmtk_graph = run_mmtk(codes, columns, states, args.resamples, args.seed, args.workers)
    mmtk_seconds, mmtk_cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    print(f"mmtk done in {mmtk_seconds:.1f} s ({mmtk_cpu:.1f} CPU s); load average after: {load_average()}", flush=True)

    if sorted(baseline_graph) != sorted(mmtk_graph):
        raise SystemExit("the two sides returned different consensus graphs; the comparison is invalid")
    print("| network | rows | resamples | workers | consensus edges | baseline s (CPU s) | mmtk s (CPU s) | wall ratio mmtk/baseline |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.network} | {args.samples} | {args.resamples} | {args.workers} | {len(mmtk_graph)} | {baseline_seconds:.1f} ({baseline_cpu:.1f}) | {mmtk_seconds:.1f} ({mmtk_cpu:.1f}) | {mmtk_seconds / baseline_seconds:.2f} |")


if __name__ == "__main__":
    main()
