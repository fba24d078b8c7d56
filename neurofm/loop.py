"""The phase runner: the one training loop every phase of a run goes through (pre-training in
``neurofm.train``, the count head's phase in ``neurofm.count_phase``).

A phase is a :class:`Phase`: a module whose forward a step function calls, an optimizer, a streaming
loader, a :class:`Schedule` (steps per epoch, total steps, learning rate, when to validate, patience) and
a validation function. :func:`run_phase` owns what they share: device moves, the per-step seed
(a function of (seed, step, rank) only, so a resumed run needs no generator state), DDP (under
``torchrun`` the module is wrapped in ``DistributedDataParallel``, which averages the gradients; every
rank takes ``Schedule.epoch_steps`` steps per epoch, the fewest batches any rank gets), gradient
clipping, the progress bar, the training losses and time between validations, the loader position a
checkpoint records, resuming from such a position, and early stopping. What a phase writes at each
validation (checkpoints, the resume state, a kept best head) is its ``after_validation`` hook.

The KL weight's warm-up (:func:`kl_weight_at`) is the one schedule both phases share.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from neurofm import runtime
from neurofm.data.store import CellStore
from neurofm.stream import CellStream, StreamConfig, StreamLoader
from neurofm.tokenizer import ExpressionTokenizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- schedules
def kl_weight_at(step: int, total_steps: int, weight: float, warmup: float) -> float:
    """The count head's KL weight at ``step`` (from 0) of ``total_steps``: linear from 0 to ``weight`` over
    the first ``warmup`` share of the steps (scVI's warm-up, so the latent learns the profile before it is
    pulled to the prior); ``weight`` from the first step when ``warmup`` is 0."""
    ramp = warmup * total_steps
    return weight * (1.0 if ramp <= 0 else min(1.0, step / ramp))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's random draws (gene samples, masks, dropout, latent samples): a function of
    (seed, step, rank) only, so a resumed run needs no generator state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Schedule:
    """When a phase steps, validates and stops."""

    total_steps: int  # optimisation steps of the phase
    epoch_steps: Callable[
        [int], int
    ]  # steps every rank takes in epoch e (from 0; a rank-uneven tail is skipped)
    learning_rate: Callable[[int], float] | None = None  # the rate of step s (None: the optimizer's own)
    val_every_steps: int | None = None  # validate every this many steps (None: at each epoch end); and at the
    #                                     last step
    patience: int = 0  # stop once this many validations in a row did not improve on the best (0: never)


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class PhaseState:
    """Where a phase stands after its latest validation; a resume starts from one (``checkpoints``)."""

    step: int = 0  # steps taken
    best_val_loss: float = math.inf  # the lowest validation loss so far
    metrics: list[dict] = field(default_factory=list)  # what each validation returned, in order
    loader: dict = field(default_factory=dict)  # the loader's position (StreamLoader.state_dict)
    best_index: int = -1  # the position in ``metrics`` of the best validation (-1: none in this call)
    epoch: int = 0  # the epoch (from 1) of the latest step


@dataclass(frozen=True)
class Window:
    """Training since the previous validation, as the validation function sees it."""

    epoch: int  # the epoch (from 1) of the latest step
    step: int  # steps taken
    sums: dict[str, float]  # the step function's reported values summed over the window's steps (this rank)
    n_steps: int  # steps in the window
    lr: float  # the learning rate of the latest step
    seconds: float  # wall time since the previous validation
    data_wait: float  # the part of it spent waiting for the loader


@dataclass(frozen=True)
class StepAt:
    """The step a step function is asked to take."""

    index: int  # from 0 in the phase
    seed: int  # step_seed(phase seed, index, rank): torch's global generator is already seeded with it


# (module, batch on the device, step) -> (the loss to minimise, values to report: summed per window, shown)
StepFunction = Callable[[torch.nn.Module, dict, StepAt], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Phase:
    """One phase of training (see the module docstring)."""

    name: str  # the progress bar's label
    module: torch.nn.Module  # whose forward the step calls (wrapped in DDP under torchrun)
    optimizer: torch.optim.Optimizer
    loader: StreamLoader
    schedule: Schedule
    step: StepFunction
    validate: Callable[[Window], tuple[float, dict]] | None = None  # (loss to minimise, metrics row)
    # (state, row, is best) after each validation, on every rank: checkpoints, a kept best head
    after_validation: Callable[[PhaseState, dict, bool], None] | None = None
    seed: int = 0  # the per-step seeds' base
    grad_clip: float = 0.0  # max global gradient norm (0: none)
    device: torch.device = torch.device("cpu")
    progress: bool = True


def stream_and_loader(
    store: CellStore,
    tokenizer: ExpressionTokenizer,
    stream_config: StreamConfig,
    *,
    num_workers: int,
    pin_memory: bool,
    device: torch.device,
) -> tuple[CellStream, StreamLoader]:
    """This rank's stream of ``store`` and the loader over it (pinned memory on CUDA only)."""
    context = runtime.current()
    stream = CellStream(
        store,
        tokenizer,
        stream_config,
        rank=context.rank,
        world_size=context.world_size,
        num_workers=num_workers,
    )
    loader = StreamLoader(stream, num_workers=num_workers, pin_memory=pin_memory and device.type == "cuda")
    return stream, loader


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for name, value in batch.items()
    }


def run_phase(phase: Phase, start: PhaseState | None = None) -> PhaseState:
    """Run ``phase`` to ``schedule.total_steps`` steps (or its early stop) from ``start`` (a resumed
    position; None: the loader's own) and return where it ended. At each validation the loader's position
    goes into the state before ``after_validation`` sees it, so a checkpoint written there resumes exactly.
    """
    context = runtime.current()
    state = replace(start) if start is not None else PhaseState(loader=phase.loader.state_dict())
    if start is not None and start.loader:
        phase.loader.load_state_dict({**start.loader, "rank": context.rank})
    module = phase.module
    if context.enabled:
        device_ids = [phase.device.index] if phase.device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(phase.module, device_ids=device_ids)
    progress = tqdm(
        total=phase.schedule.total_steps,
        initial=state.step,
        desc=phase.name,
        unit="step",
        disable=not (phase.progress and context.is_main),
    )
    runner = _Runner(phase, module, state, progress, context)
    try:
        runner.run()
    finally:
        progress.close()
    return state


class _Runner:
    """The loop of :func:`run_phase` and the window since the last validation."""

    def __init__(self, phase: Phase, module, state: PhaseState, progress, context: runtime.DistContext):
        self.phase, self.module, self.state = phase, module, state
        self.progress, self.context = progress, context
        self.started = time.perf_counter()
        self.lr = phase.schedule.learning_rate(state.step) if phase.schedule.learning_rate else math.nan
        self._new_window()

    def _new_window(self) -> None:
        self.sums: dict[str, float] = {}
        self.n_steps, self.since, self.data_wait = 0, time.perf_counter(), 0.0

    def run(self) -> None:
        loader, schedule, state = self.phase.loader, self.phase.schedule, self.state
        first_epoch = loader.epoch
        while state.step < schedule.total_steps:
            epoch = loader.epoch
            n_epoch = schedule.epoch_steps(epoch)
            if loader.batches_consumed >= n_epoch:  # this epoch is done (a rank-uneven tail is skipped)
                loader.epoch, loader.batches_consumed = epoch + 1, 0
                continue
            stop = self._epoch(epoch, n_epoch)
            if loader.batches_consumed >= n_epoch:
                loader.epoch, loader.batches_consumed = epoch + 1, 0
            if stop:
                break
            if epoch == first_epoch and state.step < schedule.total_steps:
                pace = (time.perf_counter() - self.started) / max(1, state.step)
                left = schedule.total_steps - state.step
                log.info(
                    "%s: %.0f ms a step, at most %.0f s for the remaining %d steps",
                    self.phase.name,
                    1000 * pace,
                    pace * left,
                    left,
                )

    def _epoch(self, epoch: int, n_epoch: int) -> bool:
        """The rest of ``epoch``'s steps (or up to the phase's end); True when early stopping ended it."""
        phase, state = self.phase, self.state
        phase.module.train()
        batches = iter(phase.loader)
        try:
            waiting = time.perf_counter()
            for raw in batches:
                self.data_wait += time.perf_counter() - waiting
                self._step(raw, epoch)
                epoch_done = phase.loader.batches_consumed >= n_epoch
                last = state.step >= phase.schedule.total_steps
                every = phase.schedule.val_every_steps
                if phase.validate is not None and (
                    last or (epoch_done if every is None else state.step % every == 0)
                ):
                    if self._validate(epoch, epoch_done):
                        return True
                if epoch_done or last:
                    break
                waiting = time.perf_counter()
        finally:
            batches.close()
        return False

    def _step(self, raw: dict, epoch: int) -> None:
        phase, state = self.phase, self.state
        index = state.step
        if phase.schedule.learning_rate is not None:
            self.lr = phase.schedule.learning_rate(index)
            for group in phase.optimizer.param_groups:
                group["lr"] = self.lr
        seed = step_seed(phase.seed, index, self.context.rank)
        torch.manual_seed(seed)  # dropout, latent samples
        loss, reported = phase.step(self.module, to_device(raw, phase.device), StepAt(index, seed))
        phase.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if phase.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(phase.module.parameters(), phase.grad_clip)
        phase.optimizer.step()
        values = {name: value.item() for name, value in reported.items()}
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.n_steps += 1
        state.step, state.epoch = index + 1, epoch + 1
        self.progress.update(1)
        self.progress.set_postfix(epoch=epoch + 1, **{name: f"{value:.4f}" for name, value in values.items()})

    def _validate(self, epoch: int, epoch_done: bool) -> bool:
        """Validate, record, hand to ``after_validation``; True when the patience has run out."""
        phase, state = self.phase, self.state
        position = phase.loader.state_dict()
        if epoch_done:
            position.update(epoch=epoch + 1, batches_consumed=0)
        window = Window(
            epoch=epoch + 1,
            step=state.step,
            sums=dict(self.sums),
            n_steps=self.n_steps,
            lr=self.lr,
            seconds=time.perf_counter() - self.since,
            data_wait=self.data_wait,
        )
        loss, row = phase.validate(window)
        phase.module.train()
        state.metrics.append(row)
        is_best = loss < state.best_val_loss
        if is_best:
            state.best_index = len(state.metrics) - 1
        state.best_val_loss = min(state.best_val_loss, loss)
        state.loader = position
        if phase.after_validation is not None:
            phase.after_validation(state, row, is_best)
        self._new_window()
        patience = phase.schedule.patience
        if patience > 0 and len(state.metrics) - 1 - state.best_index >= patience:
            log.info("%s: no better validation loss for %d validations, stopped", phase.name, patience)
            self.progress.total = state.step  # the bar ends where the phase did
            self.progress.refresh()
            return True
        return False
