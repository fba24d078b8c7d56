"""How many CPU cores neurofm uses, and how its threads wait.

Two rules, measured on the 2-core machines (BENCHMARKS "The first run"):

- **Torch computes with a fixed number of threads**, never one read from the machine's load: the
  transformer's pre-training with torch's default (the cores this process may run on) or
  ``train.num_threads``; small-operation work with :data:`SMALL_OPS_THREADS`. The reason: a float sum depends on how it is split between threads
  (62 of a small model's 66 tensors differ after training on 1 thread vs 2), so a thread count that
  followed the load would give a re-run of the same commit other figures. Its OpenMP threads wait
  *passively* (``OMP_WAIT_POLICY=PASSIVE``, set before torch is imported): a thread that spins while
  another process holds the core made pre-training 3.5x slower beside one CPU-bound job; sleeping
  instead, 1.5x.
- **Independent work is spread over the cores that are free** (:func:`free_cores`): the evaluation's
  probe fits run in that many worker processes. Each fit is single-threaded and does not depend on
  which worker runs it, so the figures are the same whatever the load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Small-operation work (the count head's phase, the scVI baseline: batches of ~128 cells through a few
# dense layers) runs single-threaded: a second thread gains nothing there (20 count-head epochs: 2.2 s on
# 1 thread, 2.4 s on 2) and, waiting passively, loses more (scVI 41 s -> 67 s).
SMALL_OPS_THREADS = 1


def set_thread_policy() -> None:
    """Ask OpenMP (torch, scikit-learn) to sleep, not spin, while waiting; call before torch is imported.
    A value the user set is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n_threads)`` for the block only (the setting is process-global); None: as
    it is."""
    if n_threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not counting other processes' load."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def free_cores(sample_seconds: float = 0.2) -> int:
    """The cores that other processes leave idle, sampled over ``sample_seconds`` (at least 1).

    ``NEUROFM_WORKERS`` overrides the reading (e.g. ``1`` on a shared machine)."""
    if (override := os.environ.get("NEUROFM_WORKERS")) is not None:
        try:
            return max(1, int(override))
        except ValueError:
            pass
    import psutil

    cores = available_cores()
    busy = psutil.cpu_percent(interval=sample_seconds) / 100 * (psutil.cpu_count() or cores)
    return max(1, min(cores, round(cores - busy)))
