"""The training loop shared by every neural tool.

A tool describes its training by subclassing :class:`TrainingTask` (build
the model, give the data set, compute the loss of a batch) and embeds
:class:`TrainConfig` as the ``train:`` section of its recipe. :class:`Trainer`
does the rest:

- device and precision: bf16 autocast on CUDA, float32 on CPU;
- gradient accumulation and gradient-norm clipping;
- AdamW or SGD with linear warm-up and cosine (or step, or constant) decay;
- an optional exponential moving average (EMA) of the weights;
- DDP under ``torchrun`` (gloo on CPU, NCCL on GPU), or FSDP for models that
  do not fit one device;
- a deterministic data order: each epoch is a permutation seeded by
  ``(seed, epoch)``, and every global batch is split across ranks and
  accumulation micro-batches. Randomness inside the data set's
  ``__getitem__`` is seeded per sample. The samples and their augmentations
  therefore depend only on the seed and the step, not on the number of
  processes, loader workers or restarts;
- atomic checkpoints (model, optimizer, schedule, EMA, step, every rank's RNG
  state, the partly filled metric window), exact resume with ``--resume``,
  and a checkpoint on SIGTERM before the run stops;
- a progress bar and ``metrics.jsonl`` written by rank 0.

``TrainConfig.batch_size`` is the global batch: the samples that make one
optimizer step, summed over processes and micro-batches. Each process runs
micro-batches of ``batch_size / (world_size * grad_accum)`` samples, so the
same recipe trains the same model on one process or on many.

Minimal use inside a tool's ``main(context)``::

    task = RegressionTask(recipe)            # a TrainingTask subclass
    context.start()
    trainer = Trainer(task, recipe.train, context.run, seed=recipe.seed, device=recipe.device)
    summary = trainer.fit()                  # trainer.model is the trained model
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmtk.core import distributed
from mmtk.core.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from mmtk.core.ema import EMA
from mmtk.core.errors import InputError, MmtkError, StopRequested
from mmtk.core.logging import get_logger
from mmtk.core.optim import LRSchedule, build_optimizer, default_parameter_groups
from mmtk.core.recipe import param, to_dict
from mmtk.core.rundir import RunDir
from mmtk.core.seeding import capture_rng_state, restore_rng_state, seed_everything
from mmtk.core.signals import StopFlag

log = get_logger(__name__)

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------ recipe


@dataclass
class TrainConfig:
    """The ``train:`` section of a neural tool's recipe.

    Embed it with ``train: TrainConfig = field(default_factory=TrainConfig)``.
    To give a tool its own defaults, subclass it and redeclare the fields
    (``lr: float = param(1e-4, ...)``). A factory such as
    ``lambda: TrainConfig(lr=1e-4)`` is not enough, because a recipe that
    sets any ``train`` key builds the section from the class defaults.
    """

    steps: int = param(1000, min=1, help="optimizer steps to train in total")
    batch_size: int = param(32, min=1, help="global batch size: samples per optimizer step, summed over all processes and accumulation micro-batches")
    grad_accum: int = param(1, min=1, help="micro-batches accumulated per optimizer step; each process runs micro-batches of batch_size / (processes * grad_accum) samples")
    shuffle: bool = param(True, help="visit the data set in a new seeded random order every epoch (false: in index order)")
    num_workers: int = param(0, min=0, help="data-loader worker processes per training process (0 loads in the main process)")

    optimizer: Literal["adamw", "sgd"] = param("adamw", help="adamw, or sgd with momentum")
    lr: float = param(3e-4, min=0.0, help="peak learning rate, reached at the end of warm-up")
    betas: tuple[float, ...] = param((0.9, 0.999), help="AdamW's (beta1, beta2)")
    eps: float = param(1e-8, min=0.0, min_exclusive=True, help="AdamW's epsilon")
    momentum: float = param(0.9, min=0.0, max=1.0, help="SGD momentum")
    weight_decay: float = param(0.01, min=0.0, help="decoupled weight decay (AdamW) or L2 penalty (SGD), applied to weight matrices and kernels only")

    schedule: Literal["cosine", "constant", "step"] = param("cosine", help="learning-rate decay after warm-up: cosine to min_lr_ratio * lr, constant, or step (multiply by gamma at each milestone)")
    warmup_steps: int = param(0, min=0, help="optimizer steps of linear warm-up from lr / warmup_steps to lr")
    min_lr_ratio: float = param(0.0, min=0.0, max=1.0, help="final learning rate of the cosine schedule, as a fraction of lr")
    milestones: list[int] = param(default_factory=list, help="optimizer steps at which the step schedule multiplies the learning rate by gamma")
    gamma: float = param(0.1, min=0.0, min_exclusive=True, help="factor applied at each milestone of the step schedule")

    grad_clip: float = param(1.0, min=0.0, help="maximum global L2 norm of the gradients (0 disables clipping)")
    ema_decay: float = param(0.0, min=0.0, max=0.999999999, help="decay of the exponential moving average of the weights (0 disables EMA), for example 0.9999")
    ema_eval: bool = param(True, help="evaluate with the EMA weights when EMA is on")

    precision: Literal["auto", "fp32", "bf16"] = param("auto", help="auto: bf16 autocast on CUDA and float32 elsewhere; fp32; or bf16 autocast on any device")
    parallel: Literal["ddp", "fsdp"] = param("ddp", help="with several processes: ddp replicates the model; fsdp shards parameters, gradients and optimizer state")
    find_unused_parameters: bool = param(False, help="let DDP handle trainable parameters that some steps do not use (slower)")

    log_every: int = param(10, min=1, help="optimizer steps between metrics.jsonl records")
    eval_every: int = param(0, min=0, help="optimizer steps between evaluations (0: evaluate at the end only)")
    checkpoint_every: int = param(1000, min=0, help="optimizer steps between checkpoints (0: at the end and on SIGTERM only)")
    keep_checkpoints: int = param(2, min=1, help="newest checkpoints kept in the run folder")
    progress: bool = param(True, help="show a progress bar on rank 0")

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps}); lower warmup_steps")
        if any(m < 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be non-negative optimizer steps in increasing order, got {list(self.milestones)}")


# ---------------------------------------------------------- tool contract


class TrainingTask:
    """Interface between a tool and :class:`Trainer`: a subclass describes one training job.

    Required: :meth:`build_model`, :meth:`train_dataset` and
    :meth:`training_step`. The rest have working defaults.
    """

    #: 0-based index of the optimizer step in progress, set by the trainer
    #: before each step (for curricula such as a mask-ratio change at a step).
    global_step: int = 0

    def build_model(self) -> nn.Module:
        """Return the model, on the CPU and in float32.

        Called after ``seed_everything(seed)`` on every rank, so all ranks
        start from the same weights. The trainer moves it to the device.
        """
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        """Return a map-style data set (``__len__`` and ``__getitem__``).

        Randomness in ``__getitem__`` must come from Python's ``random``,
        ``numpy.random``'s global functions or torch's default generator: the
        trainer seeds all three from ``(seed, epoch, index)`` before each
        call, which makes augmentations reproducible and resumable.
        """
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> Any:
        """Merge a list of samples into a batch (default: torch's ``default_collate``)."""
        from torch.utils.data import default_collate

        return default_collate(samples)

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
        """Return ``(loss, metrics)`` for one micro-batch, already on the device.

        ``loss`` is a scalar tensor, the mean over the micro-batch's samples,
        so that accumulation and DDP averaging give the loss of the global
        batch. ``metrics`` maps names to scalars (floats or 0-d
        tensors). It must have the same keys on every step, because the
        trainer averages them over steps and ranks and logs them beside
        ``loss``.

        ``model`` is the wrapped model (DDP or FSDP): compute the loss by
        calling ``model(...)``, which runs ``forward``, so that gradients are
        synchronized. Reach attributes and other methods through
        :func:`unwrap_model`. Runs under bf16 autocast where enabled.
        """
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Mapping[str, float] | None:
        """Return evaluation metrics, or None (the default) to skip evaluation.

        Called every ``eval_every`` steps and at the end, on every rank, with
        the unwrapped model in eval mode under ``torch.no_grad`` (and the EMA
        weights when ``ema_eval`` is set). Rank 0's result is logged.
        """
        return None

    def parameter_groups(self, model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
        """Return optimizer parameter groups (default: weight decay on matrices only, frozen parameters left out)."""
        return default_parameter_groups(model, config.weight_decay)

    def fsdp_modules(self, model: nn.Module) -> Sequence[nn.Module]:
        """Return submodules to shard as their own FSDP units (for example transformer blocks); default none."""
        return []


def epochs_to_steps(epochs: float, dataset_size: int, batch_size: int) -> int:
    """Return the optimizer steps in ``epochs`` passes over ``dataset_size`` samples (the last partial batch of each epoch is dropped)."""
    if dataset_size < batch_size:
        raise InputError(f"the data set has {dataset_size} samples, fewer than one global batch of {batch_size}; lower train.batch_size or add data.")
    return max(1, round(epochs * (dataset_size // batch_size)))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside a DDP wrapper (FSDP2 shards in place, so it needs none)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested structure of dicts, lists and tuples to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


# -------------------------------------------------------------- data order


_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    # SplitMix64 finalizer (Steele, Lea and Flood, 2014): a cheap bijective 64-bit mix.
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Return the 32-bit seed for the ``__getitem__`` call of sample ``index`` in ``epoch``.

    Chained SplitMix64 mixing of the three numbers, about a microsecond per
    sample in Python.
    """
    mixed = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    return mixed & 0xFFFFFFFF


class StepBatchSampler:
    """Yield this rank's micro-batches, step after step, from ``start_step`` to ``steps``.

    Epoch ``e`` visits the data set in the order ``randperm(n)`` seeded with
    ``seed + e`` (index order without shuffling) and is cut into
    ``n // batch_size`` global batches, dropping the remainder. Optimizer
    step ``s`` takes global batch ``s mod batches_per_epoch`` of epoch
    ``s // batches_per_epoch``. That batch is split into ``grad_accum *
    world_size`` consecutive slices: micro-batch ``k`` of rank ``r`` is slice
    ``k * world_size + r``. Each yielded item is a list of ``(index, seed)``
    pairs for :class:`SeededDataset`.
    """

    def __init__(self, dataset_size: int, batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int, start_step: int, steps: int, shuffle: bool = True) -> None:
        if dataset_size < batch_size:
            raise ValueError(f"the data set has {dataset_size} samples, fewer than one global batch of {batch_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.steps = steps
        self.shuffle = shuffle
        self.micro_batch_size = batch_size // (grad_accum * world_size)
        self.batches_per_epoch = dataset_size // batch_size
        self._epoch_cache: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Return the sample indices of ``epoch`` in visiting order, shape [dataset_size]."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        self._epoch_cache = (epoch, order)
        return order

    def global_batch(self, step: int) -> tuple[int, torch.Tensor]:
        """Return ``(epoch, indices)`` of the global batch of optimizer ``step``, indices shape [batch_size]."""
        epoch, position = divmod(step, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        return epoch, order[position * self.batch_size : (position + 1) * self.batch_size]

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        """Return this rank's ``grad_accum`` micro-batches of ``step`` as ``(index, seed)`` lists."""
        epoch, indices = self.global_batch(step)
        size = self.micro_batch_size
        result = []
        for k in range(self.grad_accum):
            start = (k * self.world_size + self.rank) * size
            chunk = indices[start : start + size].tolist()
            result.append([(index, sample_seed(self.seed, epoch, index)) for index in chunk])
        return result

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.steps):
            yield from self.micro_batches(step)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum


def _shut_down_workers(batches: Iterator[Any]) -> None:
    # Loader workers ignore SIGTERM, so leaving them to the interpreter's exit
    # handler (which terminates with SIGTERM, then joins) would hang the
    # process after an error. Shut them down through their queues instead.
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _ignore_stop_signals(worker_id: int) -> None:
    # Slurm and Ctrl-C signal every process of the job, loader workers included. Workers ignore the signal
    # so the main process can finish its step and checkpoint; they exit when the main process shuts the loader down.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SeededDataset(Dataset):
    """Wrap a data set so that each ``__getitem__((index, seed))`` runs with seeded global RNGs.

    Python's ``random``, numpy's global generator and torch's CPU generator
    are seeded with ``seed`` for the call and restored afterwards, so data
    loading never disturbs the training RNG streams.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """Load a whole micro-batch, saving and restoring the global RNG states once (the DataLoader calls this)."""
        import random

        python_state = random.getstate()
        numpy_state = np.random.get_state()
        torch_state = torch.default_generator.get_state()
        samples = []
        try:
            for index, seed in keys:
                random.seed(seed)
                np.random.seed(seed)
                torch.default_generator.manual_seed(seed)
                samples.append(self.dataset[index])
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.default_generator.set_state(torch_state)
        return samples


# ------------------------------------------------------------------ trainer


class Trainer:
    """Train a :class:`TrainingTask` under a :class:`TrainConfig`, writing into a :class:`RunDir`.

    The constructor only validates (device, batch split) and writes nothing,
    so a tool may create the trainer before ``context.start()``. :meth:`fit`
    needs the run folder started. When ``run.resume`` is set, :meth:`fit`
    continues from the latest checkpoint in ``run.checkpoints``.

    After :meth:`fit`, ``trainer.model`` is the trained (unwrapped) model,
    ``trainer.ema`` the :class:`EMA` or None, and ``trainer.step`` the number
    of optimizer steps taken.
    """

    def __init__(self, task: TrainingTask, config: TrainConfig, run: RunDir, *, seed: int, device: str | torch.device = "auto", console: Any = None) -> None:
        self.task = task
        self.config = config
        self.run = run
        self.seed = int(seed)
        self.console = console

        self.device = device if isinstance(device, torch.device) else distributed.resolve_device(device)
        self.dist = distributed.init_distributed(self.device.type)

        processes = self.dist.world_size * config.grad_accum
        if config.batch_size % processes != 0:
            raise InputError(
                f"train.batch_size={config.batch_size} cannot be split evenly into {self.dist.world_size} process(es) x "
                f"{config.grad_accum} micro-batch(es); choose a batch_size that is a multiple of {processes}."
            )
        self.micro_batch_size = config.batch_size // processes

        self.autocast_dtype = self._autocast_dtype()
        self.model: nn.Module | None = None
        self.wrapped: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: LRSchedule | None = None
        self.ema: EMA | None = None
        self.step = 0
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._last_checkpoint_step = -1
        self._last_checkpoint: str | None = None

        # Checks that need the data or the checkpoint run here, before the
        # tool starts its run folder, so a rejected run writes nothing.
        self._check_resume_step()
        seed_everything(self.seed)
        self._dataset = self._load_dataset()

    def _check_resume_step(self) -> None:
        if not self.run.resume:
            return
        found = latest_checkpoint(self.run.checkpoints)
        if found is None:
            return
        step = int(found.stem.split("-")[-1])
        if step > self.config.steps:
            raise InputError(f"cannot resume: checkpoint {found} is at step {step}, beyond train.steps={self.config.steps}. Set train.steps to at least {step}.")

    def _load_dataset(self) -> Dataset:
        dataset = self.task.train_dataset()
        size = len(dataset)  # type: ignore[arg-type]
        if size < self.config.batch_size:
            raise InputError(f"the training data set has {size} samples, fewer than one global batch (train.batch_size={self.config.batch_size}); lower train.batch_size or add data.")
        return dataset

    # ------------------------------------------------------------- set-up

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.config.precision
        if precision == "fp32" or (precision == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            if precision == "bf16":
                raise InputError(f"train.precision=bf16 requested, but {torch.cuda.get_device_name(self.device)} does not support bfloat16; use train.precision=fp32.")
            return None
        return torch.bfloat16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _build(self) -> Dataset:
        seed_everything(self.seed)
        model = self.task.build_model()
        if not isinstance(model, nn.Module):
            raise MmtkError(f"{type(self.task).__name__}.build_model returned {type(model).__name__}, not a torch.nn.Module (tool bug).")
        model.to(self.device)
        self.model = model
        self.wrapped = self._wrap(model)

        try:
            groups = self.task.parameter_groups(model, self.config)
            self.optimizer = build_optimizer(groups, self.config.optimizer, self.config.lr, self.config.betas, self.config.eps, self.config.momentum, self.config.weight_decay)
        except ValueError as exc:
            raise MmtkError(f"cannot build the optimizer: {exc} (tool bug).") from exc
        c = self.config
        self.schedule = LRSchedule(self.optimizer, c.steps, c.schedule, c.warmup_steps, c.min_lr_ratio, c.milestones, c.gamma)
        self.ema = EMA(model, c.ema_decay) if c.ema_decay > 0 else None

        return self._dataset

    def _wrap(self, model: nn.Module) -> nn.Module:
        # NOTE: the tests run DDP and FSDP with gloo on CPUs only; the NCCL and CUDA device paths have not been run.
        if self.dist.world_size == 1:
            return model
        if self.config.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for unit in self.task.fsdp_modules(model):
                fully_shard(unit)
            fully_shard(model)
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=self.config.find_unused_parameters)

    def _uses_fsdp(self) -> bool:
        return self.config.parallel == "fsdp" and self.dist.world_size > 1

    # -------------------------------------------------------- checkpoints

    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        assert self.model is not None
        assert self.optimizer is not None
        if self._uses_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=options), get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return self.model.state_dict(), self.optimizer.state_dict()

    def save(self) -> str:
        """Write a checkpoint of the current step (collective: call on every rank); return its path."""
        assert self.schedule is not None
        model_state, optimizer_state = self._model_and_optimizer_state()
        ema_state = self.ema.state_dict() if self.ema is not None else None
        rng_states = distributed.all_gather_object(capture_rng_state())
        # Each rank's metric window contains its own sums until the next all-reduce, so every window is kept.
        windows = distributed.all_gather_object({"sums": {k: v.detach().cpu() for k, v in self._window.items()}, "steps": self._window_steps})
        path = checkpoint_path(self.run.checkpoints, self.step)
        if self.dist.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "tool": self.run.tool,
                "step": self.step,
                "world_size": self.dist.world_size,
                "model": model_state,
                "optimizer": optimizer_state,
                "schedule": self.schedule.state_dict(),
                "rng": rng_states,
                "data": {"seed": self.seed, "batch_size": self.config.batch_size, "shuffle": self.config.shuffle},
                "metric_window": windows,
                "config": to_dict(self.config),
            }
            if ema_state is not None:
                state["ema"] = ema_state
            save_checkpoint(path, state)
            prune_checkpoints(self.run.checkpoints, self.config.keep_checkpoints)
            log.info("saved checkpoint %s (step %d)", path, self.step)
        distributed.barrier()
        self._last_checkpoint_step = self.step
        self._last_checkpoint = str(path)
        return str(path)

    def _restore(self, path: str) -> None:
        assert self.model is not None
        assert self.optimizer is not None
        assert self.schedule is not None
        state = load_checkpoint(path, map_location="cpu", expected_tool=self.run.tool)
        data = state.get("data", {})
        if data.get("batch_size") != self.config.batch_size or data.get("seed") != self.seed or data.get("shuffle", True) != self.config.shuffle:
            log.warning(
                "resuming with a different data order: the checkpoint used seed=%s batch_size=%s shuffle=%s, this run seed=%s batch_size=%s shuffle=%s",
                data.get("seed"), data.get("batch_size"), data.get("shuffle"), self.seed, self.config.batch_size, self.config.shuffle,
            )

        if self._uses_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            try:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise InputError(f"checkpoint {path} does not fit this model and recipe: {exc}") from exc
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                log.warning("checkpoint %s contains no EMA weights; the EMA restarts from the current weights", path)

        self.step = int(state["step"])
        same_layout = int(state.get("world_size", 1)) == self.dist.world_size
        windows = state["metric_window"]
        window = windows[self.dist.rank] if same_layout else windows[0]
        self._window = {k: v.to(self.device) for k, v in window["sums"].items()}
        self._window_steps = int(window["steps"])

        rng_states = state["rng"]
        if same_layout:
            restore_rng_state(rng_states[self.dist.rank])
        else:
            log.warning("the checkpoint was written by %s process(es) and this run has %d: random streams are reseeded, so the run will not match an uninterrupted one", state.get("world_size"), self.dist.world_size)
            seed_everything(self.seed + self.step * 1_000_003 + self.dist.rank)
        self._last_checkpoint_step = self.step
        self._last_checkpoint = path
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------ metrics

    def _accumulate(self, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            value = value.to(device=self.device, dtype=torch.float64).reshape(())
            self._window[key] = self._window[key] + value if key in self._window else value
        self._window_steps += 1

    def _flush_window(self, lr: float, dataset_size: int) -> dict[str, Any]:
        means = {key: value / self._window_steps for key, value in self._window.items()}
        means = distributed.all_reduce_metrics(means, op="mean")
        self._window = {}
        self._window_steps = 0
        record = {"step": self.step, "epoch": self.step * self.config.batch_size / dataset_size, "lr": lr, **means}
        if not math.isfinite(record.get("loss", 0.0)):
            self.run.log_metrics(record)
            remedies = [f"lower train.lr (now {self.config.lr:g})"]
            if self.config.grad_clip <= 0:
                remedies.append("set train.grad_clip")
            if self.autocast_dtype is not None:
                remedies.append("use train.precision=fp32")
            raise MmtkError(f"the training loss became {record['loss']} at step {self.step}; {' or '.join(remedies)}.")
        self.run.log_metrics(record)
        return record

    def _evaluate(self, write: bool = True) -> dict[str, float] | None:
        assert self.model is not None
        model = self.model
        use_ema = self.ema is not None and self.config.ema_eval
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                if use_ema:
                    assert self.ema is not None
                    with self.ema.swapped_into(model):
                        result = self.task.evaluate(model)
                else:
                    result = self.task.evaluate(model)
        finally:
            model.train()
        if result is None:
            return None
        record = {"step": self.step, **{f"eval/{key}": float(value) for key, value in result.items()}}
        if write:
            self.run.log_metrics(record)
        log.info("evaluation at step %d: %s", self.step, ", ".join(f"{k}={v:.6g}" for k, v in result.items()))
        return {key: float(value) for key, value in result.items()}

    # ---------------------------------------------------------------- loop

    def _micro_step(self, batch: Any, sync: bool, scale: float) -> dict[str, torch.Tensor]:
        assert self.wrapped is not None
        batch = move_to_device(batch, self.device)
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) and not sync:
            sync_context: contextlib.AbstractContextManager = self.wrapped.no_sync()
        else:
            sync_context = contextlib.nullcontext()
            if self._uses_fsdp():
                self.wrapped.set_requires_gradient_sync(sync)  # type: ignore[operator]

        with sync_context:
            with self._autocast():
                loss, metrics = self.task.training_step(self.wrapped, batch)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise MmtkError(f"{type(self.task).__name__}.training_step must return a scalar loss tensor, got {type(loss).__name__} (tool bug).")
            (loss * scale).backward()

        values = {"loss": loss.detach().float()}
        for key, value in metrics.items():
            values[key] = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        return values

    def _clip_gradients(self) -> torch.Tensor:
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)
        return full() if callable(full) else norm

    def _progress(self) -> Any:
        if not (self.config.progress and self.dist.is_main):
            return None
        if not log.isEnabledFor(logging.INFO):
            return None  # -q: warnings and errors only
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = self.console if self.console is not None else Console(stderr=True)
        return Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )

    def fit(self) -> dict[str, Any]:
        """Train to ``config.steps`` optimizer steps and return a summary.

        Summary keys: ``steps`` (optimizer steps done), ``start_step`` (0, or
        the step resumed from), ``loss`` (last logged training loss),
        ``metrics`` (last metrics.jsonl record), ``eval`` (last evaluation or
        None), ``checkpoint`` (path of the final checkpoint), ``world_size``,
        ``device``, ``precision``, ``elapsed_s`` and ``samples_per_s``.

        Raises :class:`StopRequested` after saving a checkpoint when SIGTERM
        or SIGINT arrives.
        """
        c = self.config
        if self.dist.is_main and not self.run.path.is_dir():
            raise MmtkError("Trainer.fit needs a started run folder: call context.start() (or RunDir.start) before fit (tool bug).")

        dataset = self._build()
        assert self.schedule is not None
        assert self.optimizer is not None
        assert self.model is not None

        if self.run.resume:
            found = latest_checkpoint(self.run.checkpoints)
            if found is None:
                log.warning("no checkpoint in %s; training starts from step 0", self.run.checkpoints)
                seed_everything(self.seed + self.dist.rank)
            else:
                self._restore(str(found))
                self.run.truncate_metrics(after_step=self.step)
        else:
            seed_everything(self.seed + self.dist.rank)
        start_step = self.step

        sampler = StepBatchSampler(len(dataset), c.batch_size, c.grad_accum, self.dist.rank, self.dist.world_size, self.seed, start_step, c.steps, shuffle=c.shuffle)  # type: ignore[arg-type]
        loader = DataLoader(
            SeededDataset(dataset), batch_sampler=sampler, collate_fn=self.task.collate,
            num_workers=c.num_workers, pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_stop_signals,
            # The loader draws its worker base seed from this generator, not from the global RNG that was just restored.
            generator=torch.Generator().manual_seed(self.seed),
        )
        batches = iter(loader)

        log.info(
            "training %d steps from step %d: global batch %d = %d process(es) x %d micro-batch(es) x %d, device %s, %s",
            c.steps, start_step, c.batch_size, self.dist.world_size, c.grad_accum, self.micro_batch_size, self.device,
            "bf16 autocast" if self.autocast_dtype is not None else "float32",
        )
        self._record: dict[str, Any] = {}
        started = time.perf_counter()
        self.model.train()

        progress = self._progress()
        try:
            self._train_steps(batches, progress, dataset, start_step)
        finally:
            _shut_down_workers(batches)

        # A resumed run that had already finished evaluates again without adding a duplicate record.
        eval_result = self._evaluate(write=self.step > start_step)
        if self._last_checkpoint_step != self.step:
            self.save()
        elapsed = time.perf_counter() - started
        trained = self.step - start_step
        log.info("training finished at step %d (%d steps in %.1f s)", self.step, trained, elapsed)
        return {
            "steps": self.step,
            "start_step": start_step,
            "loss": self._record.get("loss"),
            "metrics": self._record,
            "eval": eval_result,
            "checkpoint": self._last_checkpoint,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "precision": "bf16" if self.autocast_dtype is not None else "fp32",
            "elapsed_s": round(elapsed, 3),
            "samples_per_s": round(trained * c.batch_size / elapsed, 3) if elapsed > 0 else None,
        }

    def _train_steps(self, batches: Iterator[Any], progress: Any, dataset: Dataset, start_step: int) -> None:
        """Run optimizer steps up to ``config.steps``, logging, evaluating and checkpointing on schedule."""
        c = self.config
        assert self.schedule is not None
        assert self.optimizer is not None
        with StopFlag() as stop, (progress if progress is not None else contextlib.nullcontext()):
            bar = progress.add_task("train", total=c.steps, completed=start_step, status="") if progress is not None else None
            while self.step < c.steps:
                factor = self.schedule.set_step(self.step)
                self.task.global_step = self.step
                step_values: dict[str, torch.Tensor] = {}
                for k in range(c.grad_accum):
                    values = self._micro_step(next(batches), sync=k == c.grad_accum - 1, scale=1.0 / c.grad_accum)
                    for key, value in values.items():
                        step_values[key] = step_values.get(key, 0.0) + value / c.grad_accum

                step_values["grad_norm"] = self._clip_gradients().detach().float()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update()
                self.step += 1
                self._accumulate(step_values)

                if self.step % c.log_every == 0 or self.step == c.steps:
                    self._record = self._flush_window(c.lr * factor, len(dataset))  # type: ignore[arg-type]
                    if progress is not None:
                        progress.update(bar, status=f"loss {self._record['loss']:.4g}")
                    if self.dist.is_main and (progress is None or not progress.console.is_terminal):
                        log.info("step %d/%d: %s", self.step, c.steps, ", ".join(f"{k}={v:.5g}" for k, v in self._record.items() if k != "step"))
                if progress is not None:
                    progress.update(bar, completed=self.step)

                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    self._evaluate()
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < c.steps:
                    self.save()

                if distributed.any_rank(stop.requested):
                    path = self.save() if self._last_checkpoint_step != self.step else self._last_checkpoint
                    raise StopRequested(f"stopped on {stop.signal_name or 'a signal on another rank'} at step {self.step}; checkpoint {path}. Continue with --resume.")

