"""Entry points of ``mmtk discover-reactions`` and ``mmtk simulate-reactions``.

Run folder of discover-reactions (beside the common recipe.yaml, meta.json,
log.txt, metrics.jsonl and summary.json):

    data.h5          simulated data (mmtk.reactions.trajectories/1) plus the
                     ``train_rows`` and ``validation_rows`` sample indices
    mechanism.yaml   the discovered mechanism, canonical order, simulable
    loss.png         training loss per epoch
    checkpoints/     ckpt-<step>.pt, step = restart * train.epochs + the epochs
                     that restart has run (the epoch it resumes from)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mmtk.core.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from mmtk.core.errors import InputError, MmtkError, StopRequested
from mmtk.core.logging import get_logger
from mmtk.core.recipe import dump_yaml
from mmtk.core.runner import RunContext
from mmtk.core.seeding import generator_state, set_generator_state
from mmtk.core.signals import StopFlag
from mmtk.reactions.compare import compare_mechanisms, drop_empty_reactions
from mmtk.core.hdf5 import DatasetSpec, read_datasets
from mmtk.reactions.data import SCHEMA, Samples, match_species, read_samples, save_trajectories, split_rows, trajectories_to_samples
from mmtk.reactions.fit import fit_rates, mse
from mmtk.reactions.mechanism import Mechanism, canonicalize, load_mechanism
from mmtk.reactions.model import AdamSettings, NumpyMassAction, OptimizerState, TorchMassAction, unpack
from mmtk.reactions.ppf import FreezeSettings, PPFTrainer, RestartState, new_restart
from mmtk.reactions.recipe import DiscoverRecipe, SimulateRecipe, check_device, check_simulate_device
from mmtk.reactions.report import plot_losses, print_comparison, print_mechanism
from mmtk.reactions.simulate import Trajectories, simulate, time_grid

log = get_logger(__name__)

TOOL = "discover-reactions"
CHECKPOINT_VERSION = 1

# Datasets of a trajectories file written by a run, with exact dc/dt.
TRAJECTORY_SPECS = {
    "species": DatasetSpec(("n_species",), kind="S"),
    "time": DatasetSpec(("n_experiments", "n_times")),
    "concentrations": DatasetSpec(("n_experiments", "n_times", "n_species")),
    "dcdt": DatasetSpec(("n_experiments", "n_times", "n_species")),
}


# ---------------------------------------------------------------- simulate


def simulate_from_recipe(mechanism: Mechanism, recipe: Any, seed: int) -> Trajectories:
    """Simulate ``mechanism`` with the settings of a SimulationRecipe."""
    sim = recipe
    times = time_grid(sim.grid, sim.t_end, sim.points, sim.t_start)
    rng = np.random.default_rng(seed)
    return simulate(mechanism, times, sim.experiments, rng, sim.initial_low, sim.initial_high, sim.method, sim.rtol, sim.atol, sim.noise)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit BLAS to one thread while the block runs.

    The matrices here are tiny, so threads only add overhead. The BLAS thread
    count also changes the last digits of the Radau solution, and PPF's
    trajectory amplifies them, so without the limit the same seed gives other
    results under another OMP_NUM_THREADS. Without threadpoolctl installed
    the limit is skipped.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.debug("threadpoolctl is not installed; BLAS keeps its default thread count")
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def run_simulate(context: RunContext) -> dict[str, Any]:
    """Simulate a mechanism and write trajectories.h5 and mechanism.yaml."""
    with one_blas_thread():
        return _run_simulate(context)


def finished_simulation(context: RunContext) -> dict[str, Any] | None:
    """Return the summary of a finished simulate-reactions run in ``--out`` made with the same recipe, else None.

    The run counts as finished when summary.json, mechanism.yaml and a
    readable trajectories.h5 exist and the stored recipe.yaml equals the
    current recipe. Call it before ``context.start()``, which rewrites recipe.yaml.
    """
    run = context.run
    recipe_path, summary_path, trajectories_path = run.file("recipe.yaml"), run.file("summary.json"), run.file("trajectories.h5")
    if not (recipe_path.is_file() and summary_path.is_file() and trajectories_path.is_file() and run.file("mechanism.yaml").is_file()):
        return None
    if recipe_path.read_text(encoding="utf-8") != dump_yaml(context.recipe):
        log.info("the recipe differs from the one stored in %s; simulating again", recipe_path)
        return None
    try:
        read_datasets(trajectories_path, TRAJECTORY_SPECS, schema=SCHEMA)
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (MmtkError, OSError, json.JSONDecodeError) as exc:
        log.warning("cannot reuse the finished simulation in %s (%s); simulating again", run.path, exc)
        return None
    return {key: value for key, value in summary.items() if key not in ("tool", "run_dir")}


def _run_simulate(context: RunContext) -> dict[str, Any]:
    recipe: SimulateRecipe = context.recipe
    check_simulate_device(recipe)
    mechanism = load_mechanism(recipe.mechanism)
    previous = finished_simulation(context) if context.options.resume else None
    context.start()

    if previous is not None:
        log.info("resumed a finished simulation; reusing %s without simulating again", previous["file"])
        context.console.print(f"reused {previous['experiments']} experiments x {previous['times']} times of {previous['mechanism']} in {previous['file']}")
        return previous

    # Simulating again replaces every output of an unfinished or changed run.
    context.run.truncate_metrics(-1)
    trajectories = simulate_from_recipe(mechanism, recipe.simulation, recipe.seed)
    for stats in trajectories.solver_stats:
        context.run.log_metrics({"step": stats["experiment"], **stats})
    mechanism.save(context.run.file("mechanism.yaml"))
    path = save_trajectories(context.run.file("trajectories.h5"), trajectories, attrs={"mechanism": context.run.file("mechanism.yaml").read_text(encoding="utf-8"), "seed": recipe.seed})
    context.console.print(f"wrote {trajectories.concentrations.shape[0]} experiments x {trajectories.time.shape[1]} times of {mechanism.name} to {path}")
    return {
        "file": str(path),
        "mechanism": mechanism.name,
        "species": mechanism.species,
        "experiments": int(trajectories.concentrations.shape[0]),
        "times": int(trajectories.time.shape[1]),
        "dcdt_method": trajectories.dcdt_method,
    }


# ---------------------------------------------------------------- discover


@dataclass
class PreparedData:
    """Validated samples, their split, the ground truth (if any) and the simulated trajectories."""

    samples: Samples
    train_rows: np.ndarray
    validation_rows: np.ndarray
    truth: Mechanism | None
    trajectories: Trajectories | None
    source: str

    def fingerprint(self) -> str:
        """Return the SHA-256 of the training concentrations and dc/dt."""
        digest = hashlib.sha256()
        for array in (self.samples.concentrations[self.train_rows], self.samples.dcdt[self.train_rows]):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        return digest.hexdigest()


def prepare_data(recipe: DiscoverRecipe, saved_data: Path | None = None) -> PreparedData:
    """Load or simulate the samples and check them; raises InputError before anything is written.

    ``saved_data`` is the ``data.h5`` of the run being resumed. Its samples
    and split are reused instead of simulating again, because the solver's
    last digits can depend on the BLAS build and thread count.
    """
    data = recipe.data
    truth_ref = data.truth or (data.mechanism if data.source == "simulate" else None)
    truth = load_mechanism(truth_ref) if truth_ref is not None else None

    trajectories = None
    split = None
    if data.source == "simulate":
        mechanism = load_mechanism(data.mechanism)
        if truth is not None and truth.species != mechanism.species:
            raise InputError(f"data.truth species {truth.species} differ from data.mechanism species {mechanism.species}.")
        if saved_data is not None and saved_data.is_file():
            trajectories, split = load_run_data(saved_data)
        else:
            trajectories = simulate_from_recipe(mechanism, data.simulation, recipe.seed)
        samples = trajectories_to_samples(trajectories)
        source = f"simulated {mechanism.name}"
    else:
        samples = read_samples(data.file, data.format, data.derivative.method, data.derivative.smoothing, data.negative_tolerance)
        if truth is not None:
            samples = match_species(samples, truth.species, str(data.file), f"the species of the true mechanism {truth.name}")
        source = str(data.file)

    if split is None:
        rng = np.random.default_rng([recipe.seed, 7])
        split = split_rows(samples.concentrations.shape[0], data.validation_fraction, rng)
    return PreparedData(samples, split[0], split[1], truth, trajectories, source)


def load_run_data(path: Path) -> tuple[Trajectories, tuple[np.ndarray, np.ndarray]]:
    """Read a run's data.h5: the simulated trajectories and the train/validation rows."""
    specs = {
        **TRAJECTORY_SPECS,
        "train_rows": DatasetSpec((None,), kind="i"),
        "validation_rows": DatasetSpec((None,), kind="i"),
    }
    arrays, attrs = read_datasets(path, specs, schema=SCHEMA)
    trajectories = Trajectories(list(arrays["species"]), arrays["time"], arrays["concentrations"], arrays["dcdt"], str(attrs.get("dcdt_method", "exact")))
    return trajectories, (arrays["train_rows"], arrays["validation_rows"])


def make_backend(recipe: DiscoverRecipe, samples: Samples, train_rows: np.ndarray):
    """Return (backend, name): numpy on the CPU unless train.backend or device requests torch."""
    train = recipe.train
    adam = AdamSettings(lr=train.lr)
    c, dcdt = samples.concentrations[train_rows], samples.dcdt[train_rows]
    use_torch = train.backend == "torch" or (train.backend == "auto" and recipe.device != "cpu")
    if use_torch:
        return TorchMassAction(c, dcdt, train.reactions, train.penalty, adam, recipe.device), "torch"
    return NumpyMassAction(c, dcdt, train.reactions, train.penalty, adam), "numpy"


def freeze_settings(recipe: DiscoverRecipe) -> FreezeSettings:
    freeze = recipe.train.freeze
    return FreezeSettings(
        check_every=freeze.check_every,
        stall_lag=freeze.stall_lag,
        partial_tolerance=freeze.partial_tolerance,
        full_tolerance=freeze.full_tolerance,
        reinit_range=freeze.reinit_range,
        duplicate_range=(freeze.duplicate_low, freeze.duplicate_high),
        reset_rates=freeze.reset_rates,
        init_range=recipe.train.init_range,
        full_requires_distinct=freeze.full_requires_distinct,
    )


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float64, copy=True))


def restart_to_checkpoint(state: RestartState) -> dict[str, Any]:
    """Return the restart's state in a form torch.load(weights_only=True) accepts."""
    return {
        "restart": state.restart,
        "epoch": state.epoch,
        "adam_step": state.optimizer.step,
        "theta": _tensor(state.optimizer.theta),
        "exp_avg": _tensor(state.optimizer.exp_avg),
        "exp_avg_sq": _tensor(state.optimizer.exp_avg_sq),
        "integer_columns": [bool(x) for x in state.integer_columns],
        "frozen": state.frozen,
        "frozen_epoch": state.frozen_epoch,
        "rng": generator_state(state.rng),
        "losses": _tensor(state.loss_history()),
        "events": list(state.events),
    }


def restart_from_checkpoint(entry: dict[str, Any]) -> RestartState:
    rng = np.random.default_rng()
    set_generator_state(rng, entry["rng"])
    optimizer = OptimizerState(theta=entry["theta"].numpy().copy(), exp_avg=entry["exp_avg"].numpy().copy(), exp_avg_sq=entry["exp_avg_sq"].numpy().copy(), step=int(entry["adam_step"]))
    return RestartState(
        restart=int(entry["restart"]),
        optimizer=optimizer,
        integer_columns=np.array(entry["integer_columns"], dtype=bool),
        rng=rng,
        epoch=int(entry["epoch"]),
        frozen=bool(entry["frozen"]),
        frozen_epoch=entry["frozen_epoch"],
        losses=[entry["losses"].numpy().copy()],
        events=list(entry["events"]),
    )


def finish_restart(recipe: DiscoverRecipe, state: RestartState, prepared: PreparedData) -> dict[str, Any]:
    """Round W when it is not frozen, fit the rates if requested and score the restart."""
    n = prepared.samples.concentrations.shape[1]
    W, b_f, b_r = unpack(state.optimizer.theta.copy(), n, recipe.train.reactions)
    if not state.frozen:
        distance = float(np.max(np.abs(W - np.rint(W))))
        log.warning("restart %d: W is not integer after %d epochs (largest distance to an integer %.3g); reporting the rounded matrix", state.restart, state.epoch, distance)
    W = np.rint(W)

    train_c = prepared.samples.concentrations[prepared.train_rows]
    train_dcdt = prepared.samples.dcdt[prepared.train_rows]
    fit_info: dict[str, Any] = {"method": recipe.rate_fit.method}
    if recipe.rate_fit.method == "least_squares" or not state.frozen:
        fitted = fit_rates(W, train_c, train_dcdt, b_f, b_r, recipe.rate_fit.max_evaluations, recipe.rate_fit.tolerance)
        b_f, b_r = fitted.log_forward, fitted.log_reverse
        fit_info.update(method="least_squares", evaluations=fitted.evaluations, message=fitted.message)

    validation_mse = None
    if prepared.validation_rows.size:
        validation_mse = mse(W, b_f, b_r, prepared.samples.concentrations[prepared.validation_rows], prepared.samples.dcdt[prepared.validation_rows])
    return {
        "restart": state.restart,
        "seed": [recipe.seed, state.restart],
        "epochs_run": state.epoch,
        "structure_converged": state.frozen,
        "frozen_epoch": state.frozen_epoch,
        "train_mse": mse(W, b_f, b_r, train_c, train_dcdt),
        "validation_mse": validation_mse,
        "rate_fit": fit_info,
        "events": list(state.events),
        "W": W,
        "log_forward": np.asarray(b_f),
        "log_reverse": np.asarray(b_r),
    }


def _result_to_checkpoint(result: dict[str, Any]) -> dict[str, Any]:
    entry = {k: v for k, v in result.items() if k not in ("W", "log_forward", "log_reverse")}
    for key in ("W", "log_forward", "log_reverse"):
        entry[key] = _tensor(result[key])
    return entry


def _result_from_checkpoint(entry: dict[str, Any]) -> dict[str, Any]:
    """Turn a finished restart's checkpoint entry back into numpy arrays (W, rates and loss history)."""
    result = dict(entry)
    for key in ("W", "log_forward", "log_reverse", "losses"):
        if key in entry:
            result[key] = entry[key].numpy().copy()
    return result


def run_discover(context: RunContext) -> dict[str, Any]:
    """Validate the input, run PPF restarts with checkpoints and report the mechanism."""
    with one_blas_thread():
        return _run_discover(context)


def _run_discover(context: RunContext) -> dict[str, Any]:
    recipe: DiscoverRecipe = context.recipe
    check_device(recipe)
    if recipe.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"device {recipe.device!r} requested but CUDA is not available on this machine; use --device cpu.")
    prepared = prepare_data(recipe, context.run.file("data.h5") if context.options.resume else None)
    species = prepared.samples.species
    n, R = len(species), recipe.train.reactions

    resume_state = None
    if context.options.resume:
        found = latest_checkpoint(context.run.checkpoints)
        if found is None:
            raise InputError(f"cannot resume: no checkpoint in {context.run.checkpoints}.")
        resume_state = load_checkpoint(found, expected_tool=TOOL)
        if resume_state.get("data_fingerprint") != prepared.fingerprint():
            raise InputError(f"cannot resume from {found}: the training data differ from those of the checkpointed run (seed, data or recipe changed). Start a new run in another --out folder.")
        if resume_state.get("shape") != [n, R]:
            raise InputError(f"cannot resume from {found}: it contains a {resume_state.get('shape')} (species x reactions) model but the recipe requests {[n, R]}.")

    context.start()
    started = time.perf_counter()
    if prepared.trajectories is not None and resume_state is None:
        split = {"train_rows": prepared.train_rows, "validation_rows": prepared.validation_rows}
        save_trajectories(context.run.file("data.h5"), prepared.trajectories, attrs={"seed": recipe.seed}, extra=split)

    backend, backend_name = make_backend(recipe, prepared.samples, prepared.train_rows)
    log.info("PPF on %d training and %d validation samples of %s (dc/dt %s), %d reactions, %s backend on %s", prepared.train_rows.size, prepared.validation_rows.size, prepared.source, prepared.samples.dcdt_method, R, backend_name, recipe.device)
    trainer = PPFTrainer(backend, n, R, freeze_settings(recipe), recipe.train.epochs, stop_after_freeze=recipe.rate_fit.method == "least_squares", event_every=math.gcd(1_000, recipe.train.log_every, recipe.train.checkpoint_every))

    results: list[dict[str, Any]] = []
    current: RestartState | None = None
    if resume_state is not None:
        results = [_result_from_checkpoint(e) for e in resume_state["finished"]]
        if resume_state.get("current") is not None:
            current = restart_from_checkpoint(resume_state["current"])
        step = (current.restart * recipe.train.epochs + current.epoch) if current is not None else len(results) * recipe.train.epochs
        context.run.truncate_metrics(step - 1)
        log.info("resumed from checkpoint at restart %d, epoch %d", current.restart if current else len(results), current.epoch if current else 0)

    histories: dict[int, tuple[np.ndarray, list]] = {r["restart"]: (r.pop("losses"), r["events"]) for r in results if "losses" in r}

    def save(state: RestartState | None) -> None:
        # The name's step is restart * train.epochs + the epochs that restart has
        # run, so it grows through the run; a finished restart keeps its final count.
        if state is not None:
            restart, epoch = state.restart, state.epoch
        else:
            restart, epoch = results[-1]["restart"], results[-1]["epochs_run"]
        step = restart * recipe.train.epochs + epoch
        entry = {
            "tool": TOOL,
            "version": CHECKPOINT_VERSION,
            "restart": restart,
            "epoch": epoch,
            "data_fingerprint": prepared.fingerprint(),
            "shape": [n, R],
            "finished": [_result_to_checkpoint({**r, "losses": histories[r["restart"]][0]}) for r in results],
            "current": restart_to_checkpoint(state) if state is not None else None,
        }
        for finished in entry["finished"]:
            finished["losses"] = _tensor(finished["losses"])
        save_checkpoint(checkpoint_path(context.run.checkpoints, step), entry)
        prune_checkpoints(context.run.checkpoints, keep=2)

    with StopFlag() as stop, _progress(context, recipe) as progress:
        for restart in range(len(results), recipe.train.restarts):
            state = current if current is not None and current.restart == restart else new_restart(restart, recipe.seed, n, R, recipe.train.init_range)
            current = None
            task = progress.add_task(f"restart {restart}", total=recipe.train.epochs, completed=state.epoch) if progress else None

            def on_event(s: RestartState, epoch: int) -> None:
                if progress is not None:
                    progress.update(task, completed=s.epoch)
                if epoch % recipe.train.log_every == 0:
                    loss = float(s.loss_history()[epoch])
                    context.run.log_metrics({"step": s.restart * recipe.train.epochs + epoch, "restart": s.restart, "epoch": epoch, "loss": loss, "integer_columns": int(s.integer_columns.sum()), "frozen": s.frozen})
                    log.debug("restart %d epoch %d loss %.6g integer set %s", s.restart, epoch, loss, np.flatnonzero(s.integer_columns).tolist())
                if epoch > 0 and epoch % recipe.train.checkpoint_every == 0:
                    save(s)

            finished = trainer.run(state, stop, on_event)
            if not finished:
                save(state)
                raise StopRequested(f"stopped by {stop.signal_name or 'request'} at restart {state.restart}, epoch {state.epoch}; checkpoint saved. Continue with --resume --out {context.run.path}.")
            log.info("restart %d finished after %d epochs (W frozen: %s)", restart, state.epoch, state.frozen)
            result = finish_restart(recipe, state, prepared)
            results.append(result)
            histories[restart] = (state.loss_history(), state.events)
            save(None)

    return report(context, recipe, prepared, results, histories, backend_name, time.perf_counter() - started)


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(context: RunContext, recipe: DiscoverRecipe):
    if context.options.verbosity < 0:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True), transient=True)


def select_best_restart(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the restart to report: converged structures first, then the lowest training MSE.

    A restart whose W became integer beats any that did not, whatever their
    MSE, because an unconverged W is not a mechanism.
    """
    return min(results, key=lambda r: (not r["structure_converged"], r["train_mse"]))


def report(context: RunContext, recipe: DiscoverRecipe, prepared: PreparedData, results: list[dict[str, Any]], histories: dict, backend_name: str, seconds: float) -> dict[str, Any]:
    """Pick the best restart, write mechanism.yaml and loss.png, print tables; return the summary."""
    best = select_best_restart(results)
    species = prepared.samples.species
    raw = Mechanism(species=species, stoichiometry=best["W"].astype(np.int64), k_forward=np.exp(best["log_forward"]), k_reverse=np.exp(best["log_reverse"]), name="discovered")
    found = canonicalize(drop_empty_reactions(raw))
    found.notes = {
        "tool": TOOL,
        "source": prepared.source,
        "dcdt": prepared.samples.dcdt_method,
        "structure_converged": bool(best["structure_converged"]),
        "train_mse": float(best["train_mse"]),
    }
    mechanism_path = found.save(context.run.file("mechanism.yaml"))
    plot_path = plot_losses(context.run.file("loss.png"), [(r, histories[r][0], histories[r][1]) for r in sorted(histories)])

    title = f"Discovered mechanism (restart {best['restart']}, training MSE {best['train_mse']:.3g})"
    if not best["structure_converged"]:
        title += " - W did not become integer; coefficients are rounded"
    print_mechanism(context.console, found, title)
    comparison = None
    if prepared.truth is not None:
        comparison = compare_mechanisms(found, prepared.truth)
        print_comparison(context.console, comparison)
    context.console.print(f"dc/dt: {prepared.samples.dcdt_method}. Mechanism written to {mechanism_path}, loss curve to {plot_path}.")

    summary: dict[str, Any] = {
        "data": {
            "source": prepared.source,
            "species": species,
            "train_samples": int(prepared.train_rows.size),
            "validation_samples": int(prepared.validation_rows.size),
            "dcdt": prepared.samples.dcdt_method,
        },
        "backend": backend_name,
        "device": recipe.device,
        "seconds": seconds,
        "best_restart": best["restart"],
        "structure_converged": bool(best["structure_converged"]),
        "restarts": [{k: v for k, v in r.items() if k not in ("W", "log_forward", "log_reverse")} for r in results],
        "mechanism": [{"equation": eq, "k_forward": float(kf), "k_reverse": float(kr)} for eq, kf, kr in zip(found.equations(), found.k_forward, found.k_reverse)],
        "mechanism_file": str(mechanism_path),
        "loss_plot": str(plot_path),
        "comparison": comparison,
    }
    return summary
