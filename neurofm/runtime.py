"""Where this process sits in a data-parallel run: the process-group context and its collectives.

The training loop (:mod:`neurofm.train`) uses these whether or not it runs under ``torchrun``; the
launcher that starts it in several processes (:mod:`neurofm.distributed`) sits above the loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from neurofm.errors import NeurofmError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the process group (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current() -> DistContext:
    """The process group this process belongs to; a single-process context when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def backend_for(name: str) -> str:
    """``auto`` → NCCL when CUDA is available, else gloo."""
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


def shard(n_rows: int, context: DistContext) -> slice:
    """This rank's contiguous share of ``n_rows`` rows (sizes differ by at most one; may be empty)."""
    base, extra = divmod(n_rows, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return slice(start, start + base + (context.rank < extra))


def all_reduce_sums(values: list[float], context: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64; unchanged in one process)."""
    if not context.enabled:
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → cuda if available, else mps, else cpu; other names are checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise NeurofmError(f"device {name!r} is not a torch device; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NeurofmError(f"device {name!r} asked for but CUDA is not available; use device='auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NeurofmError(f"device {name!r} asked for but MPS is not available; use device='auto' or 'cpu'")
    return device
