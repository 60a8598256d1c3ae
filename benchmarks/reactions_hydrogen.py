"""Time PPF on hydrogen oxidation: mmtk's numpy path against a plain torch autograd loop.

One data set (100 initial conditions, 10 times on [0, 1], Radau, exact dc/dt,
800 training rows) is generated from the seed. Then, with one thread:

1. mmtk: the PPF schedule with the numpy backend until W is frozen, then the
   least-squares rate fit. Reports the wall time until the stoichiometry is
   exact and every rate is within 1e-3, and the errors reached.
2. Per-epoch cost of both implementations over the same epoch budget: the
   numpy backend, and a straightforward torch version of the same epoch
   (nn.Parameter tensors, autograd, torch.optim.Adam, rounding of frozen
   columns under no_grad). Its time for the whole run is extrapolated from
   the per-epoch cost and printed as an extrapolation.
3. With --adam-to-convergence: the published schedule with Adam on the rates
   after the freeze, up to --epochs, and the rate errors it reaches.

Usage: python benchmarks/reactions_hydrogen.py [--seed 1] [--budget 20000] [--adam-to-convergence]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import json
import platform
import subprocess
import time

import numpy as np
import torch

from mmtk.reactions.compare import compare_mechanisms
from mmtk.reactions.data import split_rows
from mmtk.reactions.fit import fit_rates
from mmtk.reactions.mechanism import Mechanism, canonicalize, load_mechanism
from mmtk.reactions.model import AdamSettings, NumpyMassAction, log_concentrations, unpack
from mmtk.reactions.ppf import FreezeSettings, PPFTrainer, new_restart
from mmtk.reactions.simulate import simulate, time_grid


def cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def make_data(seed: int):
    truth = load_mechanism("hydrogen-oxidation")
    trajectories = simulate(truth, time_grid("linear", 1.0, 10), 100, np.random.default_rng(seed))
    c = trajectories.concentrations.reshape(-1, 6)
    dcdt = trajectories.dcdt.reshape(-1, 6)
    train, _ = split_rows(c.shape[0], 0.2, np.random.default_rng([seed, 7]))
    return truth, c[train], dcdt[train]


def score(truth: Mechanism, W: np.ndarray, b_f: np.ndarray, b_r: np.ndarray) -> dict:
    found = Mechanism(truth.species, np.rint(W).astype(np.int64), np.exp(b_f), np.exp(b_r))
    comparison = compare_mechanisms(canonicalize(found), truth)
    return {"stoichiometry_match": comparison["stoichiometry_match"], "max_rate_relative_error": comparison["max_rate_relative_error"]}


def run_mmtk(truth, c, dcdt, seed: int, epochs: int, adam_after_freeze: bool) -> dict:
    """Run the numpy PPF path; return timings and errors."""
    backend = NumpyMassAction(c, dcdt, 6, 1e-8, AdamSettings())
    trainer = PPFTrainer(backend, 6, 6, FreezeSettings(), epochs, stop_after_freeze=not adam_after_freeze, event_every=10_000)
    state = new_restart(0, seed, 6, 6, 0.5)
    frozen_at = {}

    def on_event(s, epoch):
        if s.frozen and "seconds" not in frozen_at:
            frozen_at.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start, epoch=epoch)

    start = time.perf_counter()
    cpu_start = time.process_time()
    trainer.run(state, None, on_event)
    adam_seconds = time.perf_counter() - start
    W, b_f, b_r = unpack(state.optimizer.theta.copy(), 6, 6)
    result = {
        "epochs_run": state.epoch,
        "frozen_epoch": state.frozen_epoch,
        "seconds_to_freeze": frozen_at.get("seconds"),
        "cpu_seconds_to_freeze": frozen_at.get("cpu_seconds"),
        "adam_seconds": adam_seconds,
        "adam_cpu_seconds": time.process_time() - cpu_start,
        "at_freeze_or_end": score(truth, W, b_f, b_r),
    }
    if not adam_after_freeze and state.frozen:
        fit_start = time.perf_counter()
        fitted = fit_rates(np.rint(W), c, dcdt, b_f, b_r)
        result["fit_seconds"] = time.perf_counter() - fit_start
        result["total_seconds"] = time.perf_counter() - start
        result["total_cpu_seconds"] = time.process_time() - cpu_start
        result["after_fit"] = score(truth, W, fitted.log_forward, fitted.log_reverse)
    return result


class TorchPPFLayer(torch.nn.Module):
    """Straightforward torch version of the mass-action layer, for the baseline timing."""

    def __init__(self, n_species: int, n_reactions: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.empty(n_species, n_reactions, dtype=torch.float64).uniform_(-0.5, 0.5))
        self.b_f = torch.nn.Parameter(torch.empty(n_reactions, dtype=torch.float64).uniform_(-0.5, 0.5))
        self.b_r = torch.nn.Parameter(torch.empty(n_reactions, dtype=torch.float64).uniform_(-0.5, 0.5))

    def forward(self, log_c: torch.Tensor) -> torch.Tensor:
        z_f = torch.exp(log_c @ torch.relu(-self.W) + self.b_f)  # B x R
        z_r = torch.exp(log_c @ torch.relu(self.W) + self.b_r)  # B x R
        return (z_f - z_r) @ self.W.T  # B x n


def time_torch_baseline(c, dcdt, budget: int) -> tuple[float, float]:
    """Return (wall, CPU) seconds per epoch of the plain torch loop (loss, backward, Adam, rounding)."""
    torch.manual_seed(0)
    layer = TorchPPFLayer(6, 6)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    log_c = torch.tensor(log_concentrations(c))
    target = torch.tensor(dcdt)
    integer_columns = torch.tensor([0, 2])
    losses = []
    start = time.perf_counter()
    cpu_start = time.process_time()
    for _ in range(budget):
        optimizer.zero_grad()
        loss = torch.mean((layer(log_c) - target) ** 2) + 1e-8 * sum(p.abs().sum() + p.norm() for p in layer.parameters())
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            layer.W[:, integer_columns] = torch.round(layer.W[:, integer_columns])
        losses.append(loss.item())
    return (time.perf_counter() - start) / budget, (time.process_time() - cpu_start) / budget


def time_numpy(c, dcdt, budget: int) -> tuple[float, float]:
    """Return (wall, CPU) seconds per epoch of the numpy backend."""
    backend = NumpyMassAction(c, dcdt, 6, 1e-8, AdamSettings())
    state = new_restart(0, 0, 6, 6, 0.5)
    columns = np.zeros(6, dtype=bool)
    columns[[0, 2]] = True
    start = time.perf_counter()
    cpu_start = time.process_time()
    backend.run(state.optimizer, budget, columns, False, None)
    return (time.perf_counter() - start) / budget, (time.process_time() - cpu_start) / budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1_000_000)
    parser.add_argument("--budget", type=int, default=20_000, help="epochs for the per-epoch timing of both implementations")
    parser.add_argument("--adam-to-convergence", action="store_true", help="also run Adam on the rates after the freeze up to --epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    truth, c, dcdt = make_data(args.seed)
    report = {"machine": cpu_model(), "load_average_at_start": os.getloadavg(), "threads": 1, "torch": torch.__version__, "numpy": np.__version__, "seed": args.seed, "train_rows": int(c.shape[0])}

    report["mmtk"] = run_mmtk(truth, c, dcdt, args.seed, args.epochs, adam_after_freeze=False)
    print(json.dumps({"mmtk": report["mmtk"]}), flush=True)

    numpy_epoch, numpy_cpu = time_numpy(c, dcdt, args.budget)
    torch_epoch, torch_cpu = time_torch_baseline(c, dcdt, args.budget)
    epochs_needed = report["mmtk"]["frozen_epoch"] or args.epochs
    report["per_epoch"] = {
        "budget_epochs": args.budget,
        "numpy_us": numpy_epoch * 1e6,
        "numpy_cpu_us": numpy_cpu * 1e6,
        "torch_autograd_us": torch_epoch * 1e6,
        "torch_autograd_cpu_us": torch_cpu * 1e6,
        "ratio_torch_over_numpy": torch_epoch / numpy_epoch,
        "ratio_torch_over_numpy_cpu": torch_cpu / numpy_cpu,
        "torch_extrapolated_seconds_to_freeze": torch_epoch * (epochs_needed + 1),
        "torch_extrapolated_seconds_1e6_epochs": torch_epoch * 1e6,
    }
    print(json.dumps({"per_epoch": report["per_epoch"]}), flush=True)

    if args.adam_to_convergence:
        report["mmtk_adam_to_convergence"] = run_mmtk(truth, c, dcdt, args.seed, args.epochs, adam_after_freeze=True)
        report["mmtk_adam_to_convergence"]["final"] = report["mmtk_adam_to_convergence"].pop("at_freeze_or_end")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
