"""Device choice and ``torch.distributed`` set-up for runs launched by ``torchrun``.

``torchrun`` (and ``srun`` wrapping it) sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without them every
helper here acts as a single process: rank 0 of a world of size 1, and the
collectives return their input.
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mmtk.core.errors import InputError
from mmtk.core.logging import get_logger

log = get_logger(__name__)

_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Position of this process in the job: global rank, world size, local rank and backend."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and shows progress."""
        return self.rank == 0


# ------------------------------------------------------------------ devices


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device option into a ``torch.device``.

    - ``"auto"``: ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
    - ``"cpu"``.
    - ``"cuda"``: ``cuda:<LOCAL_RANK>``, so each ``torchrun`` process on a
      node takes its own GPU.
    - ``"cuda:N"``: that GPU.
    - any other string ``torch.device`` accepts (for example ``"mps"``) is
      passed through unchecked.

    Raises :class:`InputError` when CUDA is requested but not available, when
    ``cuda:N`` names a GPU that does not exist, or for an invalid string.
    """
    text = str(spec).strip().lower()
    local_rank = get_local_rank()
    if text == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"invalid device {spec!r}; use auto, cpu, cuda or cuda:N.") from exc

    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise InputError(f"device {spec!r} requested, but CUDA is not available in this torch build ({torch.__version__}) or on this machine. Use --device cpu or --device auto.")
    count = torch.cuda.device_count()
    if device.index is None:
        device = torch.device("cuda", local_rank)
    if device.index >= count:
        raise InputError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s), numbered from 0.")
    return device


# --------------------------------------------------------- process groups


def get_rank() -> int:
    """Return this process's global rank (0 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Return the number of processes in the job (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    """Return this process's rank on its node (``LOCAL_RANK``, default 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Return True on rank 0."""
    return get_rank() == 0


def is_distributed() -> bool:
    """Return True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device_type: str | None = None) -> DistInfo:
    """Join the process group described by the ``torchrun`` environment.

    Does nothing when ``WORLD_SIZE`` is unset or 1, and returns the current
    state when a group already exists, so calling it twice is safe. The
    backend is NCCL when ``device_type`` is ``"cuda"`` (or, when
    ``device_type`` is None, whenever CUDA is available) and gloo otherwise.
    On CUDA the current device is set to ``cuda:<LOCAL_RANK>``. The group is
    destroyed at interpreter exit.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), get_local_rank(), dist.get_backend())

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, None)

    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} are missing; launch distributed runs with torchrun, which sets all of {', '.join(_TORCHRUN_VARIABLES)}.")
    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed support.")

    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    local_rank = get_local_rank()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    atexit.register(cleanup)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    log.info("joined process group: rank %d of %d (local rank %d, backend %s)", info.rank, info.world_size, info.local_rank, backend)
    return info


def cleanup() -> None:
    """Destroy the process group, if one is running.

    Garbage is collected first because FSDP keeps gloo work objects in
    reference cycles, and freeing them during interpreter shutdown sometimes
    aborted a process after a successful run. There is no barrier, so a rank
    that failed does not wait for the others.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process reaches this point (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


# -------------------------------------------------------------- collectives


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_metrics(metrics: Mapping[str, Any], op: str = "mean") -> dict[str, float]:
    """Reduce a mapping of scalar metrics (numbers or 0-d tensors) over all processes.

    ``op`` is ``"mean"``, ``"sum"``, ``"max"`` or ``"min"``. Every process
    must pass the same keys. Values are reduced in float64 and returned as
    Python floats in sorted key order.
    """
    if op not in ("mean", "sum", "max", "min"):
        raise ValueError(f"unknown reduction {op!r}; expected mean, sum, max or min")
    keys = sorted(metrics)
    values = [float(metrics[key]) if not isinstance(metrics[key], torch.Tensor) else metrics[key].detach().double().cpu().item() for key in keys]
    if not is_distributed() or not keys:
        return dict(zip(keys, values))

    packed = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(packed, op=reduce_op)
    if op == "mean":
        packed /= dist.get_world_size()
    return dict(zip(keys, packed.cpu().tolist()))


def all_gather_object(obj: Any) -> list[Any]:
    """Return the list of ``obj`` from every rank, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def any_rank(flag: bool) -> bool:
    """Return True on every rank when ``flag`` is True on at least one rank."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ------------------------------------------------------------------ models


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace BatchNorm layers by SyncBatchNorm when the job has several GPU processes.

    SyncBatchNorm computes batch statistics over the global batch. torch
    implements it for GPU inputs only (its forward raises on CPU tensors in a
    process group), so on CPU, or in a single process, the model is returned
    unchanged and each process normalizes with its own batch.
    """
    if not is_distributed():
        return model
    if device.type == "cpu":
        log.info("keeping per-process BatchNorm: SyncBatchNorm needs GPU tensors")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
