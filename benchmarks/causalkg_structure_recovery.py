"""Structure recovery on pgmpy's bundled networks: mmtk's bootstrapped pipeline against plain hill climbing.

For each network and seed, samples rows from the true network, then learns
(a) pgmpy's HillClimbSearch with default settings (return_type='dag' so a
DAG comes back) and (b) the mmtk build pipeline on the same variables:
bootstrap hill climbing with BIC, consensus at frequency >= 0.5 oriented by
hill climbing on all rows within that skeleton, then
dropping edges whose interventional effect is below ``--min-effect``.
Prints a Markdown table of SHD and edge F1 (directed and skeleton).

Usage: python benchmarks/causalkg_structure_recovery.py [--networks asia child alarm]
       [--samples 5000] [--seeds 0] [--resamples 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from causalkg_common import edge_metrics, load_average, load_network, pin_hash_seed, sample_codes  # noqa: E402


def run_baseline(codes, columns, states):
    from pgmpy.causal_discovery import HillClimbSearch

    from mmtk.causalkg.structure import as_categorical

    learner = HillClimbSearch(return_type="dag", show_progress=False)
    learner.fit(as_categorical(codes, columns, states))
    return [(str(u), str(v)) for u, v in learner.causal_graph_.edges()]


def run_mmtk(codes, columns, states, resamples, workers, seed, min_effect):
    from mmtk.causalkg.effects import edge_effects, fit_network
    from mmtk.causalkg.structure import StructureSettings, as_categorical, bootstrap_structures, consensus_dag, orient_consensus

    settings = StructureSettings(algorithm="hill-climb", score="bic")
    bootstrap = bootstrap_structures(codes, columns, settings, resamples, seed, workers, states)
    frame = as_categorical(codes, columns, states)
    consensus = orient_consensus(frame, consensus_dag(bootstrap, columns, 0.5, settings), settings)
    model = fit_network(frame, consensus)
    effects = edge_effects(model, consensus)
    return [edge for edge in consensus if effects[edge] >= min_effect]


def main() -> None:
    pin_hash_seed()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["asia", "child", "alarm"])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--resamples", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--min-effect", type=float, default=0.01, help="effect threshold (total-variation distance for multi-state variables)")
    args = parser.parse_args()

    from mmtk.causalkg.effects import quiet_pgmpy
    from mmtk.causalkg.structure import preload_pgmpy

    quiet_pgmpy()
    preload_pgmpy()
    warnings.simplefilter("ignore")
    print(f"load average before: {load_average()}")
    print("| network | n | seed | method | SHD | F1 directed | F1 skeleton | edges (true) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.networks:
        model = load_network(name)
        true_edges = [(str(u), str(v)) for u, v in model.edges()]
        for seed in args.seeds:
            codes, columns, states = sample_codes(model, args.samples, seed)
            for method in ("pgmpy hill climb (defaults)", f"mmtk bootstrap x{args.resamples} + effects"):
                start = time.perf_counter()
                if method.startswith("pgmpy"):
                    learned = run_baseline(codes, columns, states)
                else:
                    learned = run_mmtk(codes, columns, states, args.resamples, args.workers, seed, args.min_effect)
                seconds = time.perf_counter() - start
                m = edge_metrics(true_edges, learned)
                print(f"| {name} | {args.samples} | {seed} | {method} | {m['shd']:.0f} | {m['f1_directed']:.3f} | {m['f1_skeleton']:.3f} | {m['n_edges']:.0f} ({len(true_edges)}) | {seconds:.1f} |", flush=True)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
