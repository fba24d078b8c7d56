"""Streaming training data from a cell store: sparse counts in, token-ready bin batches out.

The atlas never sits in memory: a :class:`CellStream` (a ``torch.utils.data.IterableDataset``) reads a
:class:`~neurofm.data.store.CellStore` in contiguous blocks and bins each shuffle buffer on the fly, the same way
:meth:`ExpressionTokenizer.transform <neurofm.tokenizer.ExpressionTokenizer.transform>` does (bit-identical
bins: per-cell ``target_sum`` normalisation, ``log1p``, per-gene edges; only non-zero counts are binned,
zeros take their gene's precomputed zero bin; :class:`~neurofm.sparse_binning.SparseBinner`).

Order of one epoch (all seeded, so a run is reproducible and resumable):

1. the store's rows are cut into blocks of ``block_size`` consecutive rows (never across shards);
2. the blocks are permuted with ``(seed, epoch)``;
3. DDP rank ``r`` of ``world_size`` takes blocks ``r::world_size``; DataLoader worker ``w`` of ``W`` takes
   ``w::W`` of those (a "logical worker"; files are opened lazily inside each worker);
4. a worker reads ``buffer_blocks`` blocks at a time (its shuffle buffer), drops the validation rows,
   shuffles the remaining rows with ``(seed, epoch, rank, worker, group)`` and cuts its row stream into
   batches of ``batch_size`` (a batch may span two buffers; each worker's last batch may be smaller).

Batches therefore depend on (store, seed, epoch, world size, rank, number of workers, batch, block and
buffer sizes). Ranks can get a few batches more or fewer than each other in an epoch
(:meth:`CellStream.common_batches` gives the count every rank reaches, for DDP step loops).

The validation rows are a fixed seeded set (:func:`validation_rows`), never trained on. The store is
pre-shuffled by ``neurofm convert``, so contiguous blocks are random cells.

Batch format: a dict, described in :mod:`neurofm.batch_format` (which also turns either format into the
dense bins, the raw counts and the observed-genes mask).

:class:`StreamLoader` wraps the DataLoader (workers, pinned memory) and keeps the position (a batch counts
as consumed once it has been yielded): its
``state_dict()`` is ``{"epoch", "batches_consumed", "seed", "world_size", "rank", "num_workers",
"n_cells", "batch_size", "block_size", "buffer_blocks", "draw"}``; ``load_state_dict`` on a fresh loader
continues with exactly the batches an uninterrupted run would have produced.

How batches draw from the files of a multi-file store (``StreamConfig.draw``): ``"proportional"`` (default)
is the plain shuffle — the store's cells are permuted across files, so each file fills a batch in
proportion to its size; ``"balanced"`` draws each training cell a seeded number of times per epoch
(:meth:`CellStream.copies`) so that every file fills about the same share of the epoch (small files
repeat, large ones are subsampled; the epoch keeps about the same number of cells; 16 bytes per cell).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from neurofm.batch_format import batch_observed, densify, densify_counts, observed_mask
from neurofm.data.store import CellStore
from neurofm.errors import NeurofmError
from neurofm.sparse_binning import SparseBinner
from neurofm.store_fit import fit_tokenizer, sample_rows, variable_genes
from neurofm.tokenizer import MIN_CELLS, ExpressionTokenizer
from neurofm.train_config import TrainConfig

__all__ = [  # the stream's names, and those re-exported from neurofm.batch_format and neurofm.store_fit
    "DRAWS",
    "StreamConfig",
    "validation_rows",
    "store_batches",
    "CellStream",
    "densify",
    "observed_mask",
    "partly_observed_genes",
    "batch_observed",
    "densify_counts",
    "StreamLoader",
    "fit_tokenizer",
    "sample_rows",
    "variable_genes",
]

log = logging.getLogger(__name__)

DRAWS = ("proportional", "balanced")


@dataclass
class StreamConfig:
    """How a store becomes batches. The settings it shares with the train section take their defaults from
    :class:`~neurofm.train_config.TrainConfig` (defined once, there); :meth:`from_train` builds the one a
    training run reads its store with."""

    batch_size: int = TrainConfig.batch_size  # cells per batch (per rank)
    block_size: int = (
        TrainConfig.block_size
    )  # consecutive store rows read as one piece (the unit of shuffling
    #                                           and splitting)
    buffer_blocks: int = TrainConfig.buffer_blocks  # blocks read and shuffled together (shuffle buffer =
    #                                                 buffer_blocks × block_size)
    val_fraction: float = TrainConfig.val_fraction  # share of cells held out for validation…
    max_val_cells: int = TrainConfig.max_val_cells  # …but at most this many (atlas scale)
    seed: int = (
        TrainConfig.seed
    )  # seeds the validation set, the block order of every epoch and the buffer shuffles
    output: str = TrainConfig.stream_output  # "dense": (cells × genes) bins; "sparse": bins of the non-zeros
    #                                          only (densify())
    counts: bool = False  # also the raw counts ("counts", or "nonzero_counts" when sparse; densify_counts())
    draw: str = "proportional"  # multi-file store: "proportional" (each file as its size: the plain shuffle)
    #                             or "balanced" (each file an equal share of an epoch's cells, see the docs)
    batch_key: str | None = None  # batches carry each cell's batch code ("batch_index"; store_batches)

    @classmethod
    def from_train(cls, config: TrainConfig, counts: bool = False) -> StreamConfig:
        """The stream a training run with ``config`` reads (``counts``: the raw counts too, for a model
        with a count head, and then the count head's batch covariate, ``train.batch_key``)."""
        return cls(
            batch_size=config.batch_size,
            block_size=config.block_size,
            buffer_blocks=config.buffer_blocks,
            val_fraction=config.val_fraction,
            max_val_cells=config.max_val_cells,
            seed=config.seed,
            output=config.stream_output,
            counts=counts,
            batch_key=config.batch_key if counts else None,
        ).validate()

    def validate(self) -> StreamConfig:
        if self.output not in ("dense", "sparse"):
            raise NeurofmError(f"stream output={self.output!r} is unknown; use 'dense' or 'sparse'")
        if self.draw not in DRAWS:
            raise NeurofmError(f"stream draw={self.draw!r} is unknown; use one of {', '.join(DRAWS)}")
        for name in ("batch_size", "block_size", "buffer_blocks", "max_val_cells"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise NeurofmError(f"stream {name}={getattr(self, name)!r} must be a positive integer")
        if not 0 <= self.val_fraction < 1:
            raise NeurofmError(f"stream val_fraction={self.val_fraction!r} must be in [0, 1)")
        return self


# ------------------------------------------------------------------------------------------ validation
def validation_rows(
    n_cells: int, val_fraction: float, seed: int, max_val_cells: int = TrainConfig.max_val_cells
) -> np.ndarray:
    """The fixed validation store rows (sorted): ``min(int(n_cells * val_fraction), max_val_cells)``
    rows drawn without replacement with ``numpy.random.default_rng([seed, 7])``."""
    n_val = min(int(n_cells * val_fraction), max_val_cells)
    if n_cells - n_val < MIN_CELLS:
        raise NeurofmError(
            f"{n_cells} cells leave fewer than {MIN_CELLS} training cells after {n_val} validation cells; "
            "pass more cells or lower val_fraction"
        )
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(n_cells, size=n_val, replace=False))


# ------------------------------------------------------------------------------------------ genes
def _check_genes(store: CellStore, tokenizer: ExpressionTokenizer) -> None:
    if not np.array_equal(store.gene_ids, tokenizer.gene_ids):
        raise NeurofmError(
            f"the store's {store.n_genes} genes differ from the tokenizer's {tokenizer.n_genes}; fit the "
            "tokenizer on this store (neurofm.stream.fit_tokenizer) or convert with --genes in its order"
        )


# ------------------------------------------------------------------------------------------ the plan
def _blocks(store: CellStore, block_size: int) -> np.ndarray:
    """(n_blocks, 2) [start, stop) store-row ranges, ``block_size`` rows, never across shards."""
    ranges = []
    for offset, rows in zip(store.shard_offsets[:-1], store.shard_rows, strict=True):
        starts = np.arange(offset, offset + rows, block_size)
        ranges.append(np.stack([starts, np.minimum(starts + block_size, offset + rows)], axis=1))
    return np.concatenate(ranges).astype(np.int64)


@dataclass
class _WorkerPlan:
    groups: list[np.ndarray]  # per buffer: (k, 2) block ranges
    group_rows: np.ndarray  # training rows per buffer

    @property
    def n_rows(self) -> int:
        return int(self.group_rows.sum())


def store_batches(store: CellStore, batch_key: str | None) -> tuple[list[str], np.ndarray | None]:
    """(batch names, int64 code of every store row) of the obs column ``batch_key`` — ``"dataset"``: a
    multi-file store's source files — the names sorted, the codes their positions; ``([], None)`` for
    None. A missing column or a cell without a batch is refused in one line."""
    if batch_key is None:
        return [], None
    if batch_key == "dataset" and len(store.dataset_names) > 1:
        return list(store.dataset_names), store.cell_datasets().astype(np.int64)
    import pyarrow.parquet as pq

    from neurofm.data.store import OBS_FILE

    columns = [name for name in pq.read_schema(store.path / OBS_FILE).names if not name.startswith("__")]
    if batch_key not in columns:
        raise NeurofmError(
            f"batch column {batch_key!r} is not in the cells' obs (columns: {', '.join(map(str, columns[:8]))}); "
            "name one of those as train.batch_key"
        )
    values = store.read_obs([batch_key])[batch_key]
    if values.isna().any():
        raise NeurofmError(
            f"{int(values.isna().sum())} cells have no value in batch column {batch_key!r}; fill them in "
            "(e.g. 'unknown') or choose another column"
        )
    codes, names = pd.factorize(values.astype(str), sort=True)
    return [str(name) for name in names], codes.astype(np.int64)


class CellStream(IterableDataset):
    """Token-ready batches streamed from a cell store (see the module docstring for order and format).

    ``rank``/``world_size`` default to ``torch.distributed``'s when it is initialised (else 0/1);
    ``num_workers`` must equal the DataLoader's (``StreamLoader`` passes it). Iterating yields the rest of
    epoch ``self.epoch`` from the position set by :meth:`set_position`.
    """

    def __init__(
        self,
        store: CellStore | str | os.PathLike,
        tokenizer: ExpressionTokenizer,
        config: StreamConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.store = store if isinstance(store, CellStore) else CellStore(Path(store))
        self.config = (config or StreamConfig()).validate()
        _check_genes(self.store, tokenizer)
        self.binner = SparseBinner(tokenizer)
        if world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = torch.distributed.get_world_size() if distributed else 1
            rank = torch.distributed.get_rank() if distributed else 0
        self.rank, self.world_size = int(rank or 0), int(world_size)
        self.num_workers = max(1, int(num_workers))
        self.val_rows = validation_rows(
            self.store.n_cells, self.config.val_fraction, self.config.seed, self.config.max_val_cells
        )
        is_val = np.zeros(self.store.n_cells + 1, dtype=np.int64)
        is_val[self.val_rows] = 1
        self._val_before = np.concatenate([[0], np.cumsum(is_val[:-1])])  # val rows before each row
        self._is_val = is_val[:-1].astype(bool)
        self.cell_datasets = self.store.cell_datasets()
        self.batch_names, self.cell_batches = store_batches(self.store, self.config.batch_key)
        self._draws: tuple[int, np.ndarray, np.ndarray] | None = None  # balanced: (epoch, copies, cumsum)
        self.block_ranges = _blocks(self.store, self.config.block_size)
        self.epoch = 0
        self._numpy_batches = False  # StreamLoader sets it: workers send numpy, the loader converts
        self._skip = [0] * self.num_workers  # batches already consumed, per logical worker
        self._slots = list(range(self.num_workers))  # physical worker slot -> logical worker

    @property
    def n_train_cells(self) -> int:
        return self.store.n_cells - self.val_rows.size

    @property
    def observed_genes(self) -> torch.Tensor:
        """bool (datasets × genes): the genes each dataset of the store measures (batch key ``dataset``
        indexes its rows; :func:`observed_mask` gives a batch's cells × genes mask)."""
        return torch.from_numpy(self.store.observed_genes)

    def copies(self, epoch: int) -> np.ndarray | None:
        """``draw="balanced"``: how many times each store row is drawn in ``epoch`` (validation rows 0),
        else None. A dataset's training rows each get ``w = n_train / (n_datasets × its training rows)``
        draws on average: ``floor(w)``, plus one with probability ``w - floor(w)`` (seeded by
        ``(seed, epoch)``), so every dataset fills about the same share of the epoch."""
        if self.config.draw != "balanced":
            return None
        return self._balanced(epoch)[0]

    def _balanced(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._draws is None or self._draws[0] != epoch:
            train = ~self._is_val
            per_dataset = np.bincount(self.cell_datasets[train], minlength=len(self.store.datasets))
            present = per_dataset > 0
            weight = np.zeros(per_dataset.size)
            weight[present] = train.sum() / (present.sum() * per_dataset[present])
            row_weight = weight[self.cell_datasets]
            draw = np.random.default_rng([self.config.seed, epoch, 17]).random(row_weight.size)
            copies = (np.floor(row_weight) + (draw < row_weight - np.floor(row_weight))).astype(np.int64)
            copies[~train] = 0
            self._draws = (epoch, copies, np.concatenate([[0], np.cumsum(copies)]))
        return self._draws[1], self._draws[2]

    def _train_rows_in(self, ranges: np.ndarray, epoch: int) -> np.ndarray:
        if self.config.draw == "balanced":
            cumulative = self._balanced(epoch)[1]
            return cumulative[ranges[:, 1]] - cumulative[ranges[:, 0]]
        return (ranges[:, 1] - ranges[:, 0]) - (
            self._val_before[ranges[:, 1]] - self._val_before[ranges[:, 0]]
        )

    def worker_plan(self, epoch: int, logical_worker: int, rank: int | None = None) -> _WorkerPlan:
        """Buffers (groups of blocks) of one logical worker of ``rank`` (default: this rank) in ``epoch``."""
        rank = self.rank if rank is None else rank
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.block_ranges))
        mine = order[rank :: self.world_size][logical_worker :: self.num_workers]
        ranges = self.block_ranges[mine]
        groups = [
            ranges[i : i + self.config.buffer_blocks]
            for i in range(0, len(ranges), self.config.buffer_blocks)
        ]
        group_rows = np.array([int(self._train_rows_in(g, epoch).sum()) for g in groups], dtype=np.int64)
        return _WorkerPlan(groups, group_rows)

    def worker_batches(self, epoch: int, rank: int | None = None) -> list[int]:
        """Number of batches each logical worker of ``rank`` (default: this rank) yields in ``epoch``."""
        size = self.config.batch_size
        return [math.ceil(self.worker_plan(epoch, w, rank).n_rows / size) for w in range(self.num_workers)]

    def common_batches(self, epoch: int | None = None) -> int:
        """The fewest batches any DDP rank gets in ``epoch``: ranks' counts can differ by a few (blocks
        hold different numbers of training cells), so a DDP loop steps every rank this many times."""
        epoch = self.epoch if epoch is None else epoch
        return min(sum(self.worker_batches(epoch, rank)) for rank in range(self.world_size))

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return sum(self.worker_batches(self.epoch if epoch is None else epoch))

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batches_consumed: int) -> None:
        """Continue ``epoch`` after its first ``batches_consumed`` batches (as the DataLoader delivers
        them: round-robin over the logical workers, skipping those that ran out)."""
        counts = self.worker_batches(epoch)
        if not 0 <= batches_consumed <= sum(counts):
            raise NeurofmError(
                f"loader position {batches_consumed} is outside epoch {epoch}'s {sum(counts)} batches; "
                "resume with the same store, seed, world size and workers"
            )
        consumed = [0] * self.num_workers
        turn = 0
        for _ in range(batches_consumed):
            while consumed[turn] >= counts[turn]:
                turn = (turn + 1) % self.num_workers
            consumed[turn] += 1
            turn = (turn + 1) % self.num_workers
        active = [(turn + i) % self.num_workers for i in range(self.num_workers)]
        active = [w for w in active if consumed[w] < counts[w]] + [
            w for w in active if consumed[w] >= counts[w]
        ]
        self.epoch, self._skip, self._slots = int(epoch), consumed, active

    # -------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = 0 if info is None else info.id
        if info is not None and info.num_workers != self.num_workers:
            raise NeurofmError(
                f"the DataLoader has {info.num_workers} workers but the stream was built for "
                f"{self.num_workers}; pass the same num_workers to both (StreamLoader does)"
            )
        if info is None and self.num_workers > 1:  # one process plays every worker in DataLoader order
            return self._interleaved()
        logical = self._slots[slot]
        return self._worker_iter(logical, self._skip[logical])

    def _interleaved(self) -> Iterator[dict]:
        iterators = {w: self._worker_iter(w, self._skip[w]) for w in self._slots}
        while iterators:
            for w in list(self._slots):
                if w not in iterators:
                    continue
                batch = next(iterators[w], None)
                if batch is None:
                    del iterators[w]
                else:
                    yield batch

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_draws"] = None  # per-cell draw counts: recomputed in each worker, not sent to it
        return state

    def _worker_iter(self, logical: int, skip_batches: int) -> Iterator[dict]:
        size = self.config.batch_size
        plan = self.worker_plan(self.epoch, logical)
        skip_rows = skip_batches * size
        group_starts = np.concatenate([[0], np.cumsum(plan.group_rows)])
        first_group = int(np.searchsorted(group_starts, skip_rows, side="right") - 1)
        carry: sp.csr_matrix | None = None
        carry_rows = np.zeros(0, dtype=np.int64)
        worker_tag = logical
        for g in range(max(first_group, 0), len(plan.groups)):
            order, matrix = self._read_group(plan.groups[g], g, logical)
            if g == first_group:
                drop = skip_rows - int(group_starts[g])
                order, matrix = order[drop:], matrix[drop:]
            if carry is not None:
                matrix = sp.vstack([carry, matrix], format="csr")
                order = np.concatenate([carry_rows, order])
                carry = None
            n_full = (matrix.shape[0] // size) * size
            for start in range(0, n_full, size):
                yield self._batch(matrix, order, start, start + size, worker_tag)
            if n_full < matrix.shape[0]:
                carry, carry_rows = matrix[n_full:], order[n_full:]
        if carry is not None and carry.shape[0]:
            yield self._batch(carry, carry_rows, 0, carry.shape[0], worker_tag)

    def _read_group(self, ranges: np.ndarray, group: int, logical: int) -> tuple[np.ndarray, sp.csr_matrix]:
        """(store rows, their raw counts as CSR) of one buffer: the training rows of its blocks, shuffled
        together (each batch is binned as it is cut, see :meth:`_batch`)."""
        pieces, rows = [], []
        for start, stop in ranges[np.argsort(ranges[:, 0])]:  # read in store order
            indptr, indices, data = self.store.read_range(int(start), int(stop))
            pieces.append(sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.store.n_genes)))
            rows.append(np.arange(start, stop))
        matrix = sp.vstack(pieces, format="csr") if len(pieces) > 1 else pieces[0]
        rows = np.concatenate(rows)
        train = np.flatnonzero(~self._is_val[rows])
        copies = self.copies(self.epoch)
        if copies is not None:  # balanced: each row as many times as it is drawn this epoch
            train = np.repeat(train, copies[rows[train]])
        rng = np.random.default_rng([self.config.seed, self.epoch, self.rank, logical, group])
        pick = train[rng.permutation(train.size)]
        return rows[pick], matrix[pick]

    def _batch(self, matrix: sp.csr_matrix, rows: np.ndarray, start: int, stop: int, worker_tag) -> dict:
        """One batch of the raw-count CSR ``matrix`` (rows ``start:stop``), binned here: binning is per
        cell, so binning a batch gives the same bins as binning its whole buffer."""
        part = matrix[start:stop]
        bins = self.binner.binned(part.indptr, part.indices, part.data)
        return self._format(part.indptr, part.indices, bins, rows[start:stop], worker_tag, part.data)

    def _format(self, indptr, indices, bins, rows: np.ndarray, worker_tag: int, counts=None) -> dict:
        """A batch from the CSR of its cells' non-zero ``bins`` (already binned) and, with
        ``config.counts``, their raw ``counts`` (the same non-zeros)."""
        rows = np.array(rows, dtype=np.int64)
        batch = {"rows": rows, "dataset": self.cell_datasets[rows].astype(np.int64), "worker": worker_tag}
        if self.cell_batches is not None:
            batch["batch_index"] = self.cell_batches[rows]
        if self.config.output == "dense":
            batch["bins"] = self.binner.densify(indptr, indices, bins)
            if self.config.counts:
                dense = np.zeros((len(indptr) - 1, self.store.n_genes), dtype=np.float32)
                dense[np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), indices] = counts
                batch["counts"] = dense
        else:
            batch["indptr"] = np.asarray(indptr, dtype=np.int64)
            batch["genes"] = np.asarray(indices, dtype=np.int32)
            batch["nonzero_bins"] = np.asarray(bins, dtype=np.int16)
            if self.config.counts:
                batch["nonzero_counts"] = np.asarray(counts, dtype=np.float32)
        # numpy arrays cross from DataLoader workers in the pickle stream (one message); tensors would
        # each need a shared-memory file and a descriptor handshake (StreamLoader picks per format)
        return batch if self._numpy_batches else _as_tensors(batch)

    @property
    def zero_bins(self) -> torch.Tensor:
        """int16 (n_genes,): each gene's bin for a zero count (what ``densify`` fills in)."""
        return torch.from_numpy(self.binner.zero_bins)

    def validation_batches(self, batch_size: int | None = None) -> Iterator[dict]:
        """The fixed validation cells in store order, in batches of the same format (never shuffled)."""
        size = batch_size or self.config.batch_size
        for start in range(0, self.val_rows.size, size):
            rows = self.val_rows[start : start + size]
            part = self.store.rows(rows)
            bins = self.binner.binned(part.indptr, part.indices, part.data)
            yield _as_tensors(self._format(part.indptr, part.indices, bins, rows, -1, part.data))


def _as_tensors(batch: dict) -> dict:
    return {
        name: value
        if isinstance(value, torch.Tensor)
        else torch.from_numpy(value)
        if isinstance(value, np.ndarray)
        else torch.tensor(value)
        for name, value in batch.items()
    }


def _keep_as_is(batch: dict) -> dict:
    return batch


def partly_observed_genes(stream: CellStream) -> torch.Tensor | None:
    """The observed-genes mask, ``stream.observed_genes`` (datasets × genes), where some dataset leaves genes
    unmeasured, else None (a single-file
    store: every gene measured, so the training code takes its unmasked path, unchanged)."""
    observed = stream.observed_genes
    return None if bool(observed.all()) else observed


class StreamLoader:
    """A DataLoader over a :class:`CellStream` that knows its position (epoch, batches consumed).

    Iterating yields the rest of the current epoch and then moves to the next epoch; ``state_dict()``
    taken between batches and given to ``load_state_dict`` of a fresh loader (same store, config, world
    size and ``num_workers``) continues with exactly the batches of an uninterrupted run.
    """

    def __init__(
        self,
        stream: CellStream,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        if max(1, num_workers) != stream.num_workers:
            raise NeurofmError(
                f"StreamLoader num_workers={num_workers} but the stream was built for {stream.num_workers}; "
                "build both with the same number"
            )
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.epoch = stream.epoch
        self.batches_consumed = 0

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.stream.batches_per_epoch(self.epoch) - self.batches_consumed

    def __iter__(self) -> Iterator[dict]:
        self.stream.set_position(self.epoch, self.batches_consumed)
        kwargs = {} if self.num_workers == 0 else {"prefetch_factor": self.prefetch_factor or 2}
        # sparse batches are small: sent as numpy in the pickle stream (one message); dense ones are large:
        # sent as tensors in shared memory
        self.stream._numpy_batches = self.stream.config.output == "sparse"
        try:
            loader = DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_as_is, **kwargs
            )
            for batch in loader:
                batch = _as_tensors(batch)
                if self.pin_memory:
                    batch = {name: value.pin_memory() for name, value in batch.items()}
                self.batches_consumed += 1
                yield batch
        finally:
            self.stream._numpy_batches = False
        self.epoch += 1
        self.batches_consumed = 0

    def state_dict(self) -> dict:
        config = self.stream.config
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "seed": config.seed,
            "world_size": self.stream.world_size,
            "rank": self.stream.rank,
            "num_workers": self.stream.num_workers,
            "n_cells": self.stream.store.n_cells,
            "batch_size": config.batch_size,
            "block_size": config.block_size,
            "buffer_blocks": config.buffer_blocks,
            "draw": config.draw,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in (
            "seed",
            "world_size",
            "rank",
            "num_workers",
            "n_cells",
            "batch_size",
            "block_size",
            "buffer_blocks",
            "draw",
        ):
            if state.get(key, mine[key] if key == "draw" else None) != mine[key]:
                raise NeurofmError(
                    f"the saved loader position was made with {key}={state.get(key)!r}, this loader has "
                    f"{mine[key]!r}; resume with the same settings"
                )
        self.stream.set_position(int(state["epoch"]), int(state["batches_consumed"]))
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
