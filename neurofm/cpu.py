"""How neurofm's threads are counted, and how they wait.

Measured on the 2-core machines (BENCHMARKS "The first run"):

- **Torch computes with a fixed number of threads** (torch's default, the cores this process may run
  on, or ``train.num_threads``), never one read from the machine's load: a float sum depends on how it is
  split between threads (62 of a small model's 66 tensors differ after training on 1 thread vs 2), so a
  count that followed the load would give a re-run of the same commit other figures.
- **How waiting threads behave follows the load** (:func:`set_thread_policy`): on a busy machine
  OpenMP's threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning on a core
  another process needs — pre-training beside one CPU-bound job ran 3.5x slower spinning, 1.5x
  sleeping. On an idle machine they spin, which is faster there (sleeping cost a third of the
  pre-training speed). Waiting changes no result, only time.
- **Independent work is spread over the cores that are free** (:func:`free_cores`): the evaluation's
  few-shot probe fits run in that many worker processes. Each fit is single-threaded and does not depend
  on which worker runs it, so the figures are the same whatever the load.
"""

from __future__ import annotations

import os


def set_thread_policy() -> str:
    """Before torch is imported: make OpenMP's waiting threads sleep when other processes keep cores
    busy (a value the user set is kept). Returns the policy in force."""
    if "OMP_WAIT_POLICY" not in os.environ and free_cores() < available_cores():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "ACTIVE (OpenMP's default)")


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
