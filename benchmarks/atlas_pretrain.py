"""Pre-training streamed from an atlas-sized cell store vs the same model on in-memory data (issue 12).

For each ``--n-cells`` (default 100,000 and 1,000,000) the synthetic Allen-style atlas of
``benchmarks/atlas_scale.py`` (20,000 genes, ~1,300 non-zeros per cell; generated once, cached in
``--work-dir``) is converted to a cell store (kept for reuse), then each row runs in a fresh child process
(its own peak RSS, VmHWM):

- ``in-memory``: the default model pre-trained on the first ``--in-memory-cells`` cells of the 100 k atlas
  read into memory as an AnnData (the small-data path: ``pretrain(adata)`` writes it as a store in
  ``/dev/shm``, so every read is from memory);
- ``streamed``: the same model and settings pre-trained from the store of ``n`` cells
  (``pretrain(store_dir)``), blocks read from disk as training goes.

Every row: ``train.max_steps`` = ``--steps`` with a validation every ``--val-every`` steps, the count
head's own phase off (it is measured in BENCHMARKS.md on real data), the ``train`` settings of
``--config`` (default: the CPU defaults — 2 torch threads, no DataLoader workers). steps/s is taken from
the training time between validations (``epoch_time_s`` of the metrics rows after the first, so start-up
and validation are left out), and the data-wait share is the part of that time the loop spent waiting for
the loader (``data_wait_s``; issue 12's GPU target: < 5 %).

On a GPU node, the GPU rows (``configs/gpu.yaml``: CUDA, bf16, batch 256, 4 loader workers, pinned
memory, sparse batches densified on the device)::

    python benchmarks/atlas_pretrain.py --config configs/gpu.yaml --steps 600 --val-every 200 \
        --out benchmarks/results/atlas_pretrain_gpu.json

Targets: streamed steps/s within 10 % of in-memory; peak RSS ≤ 2 GB at 100 k and at 1 M cells, within
10 % of each other (memory flat in the atlas size).

    python benchmarks/atlas_pretrain.py                      # 100 k and 1 M (generates the 1 M atlas once)
    python benchmarks/atlas_pretrain.py --n-cells 100000     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bench import run_row, write_report  # noqa: E402
from benchmarks.atlas_scale import _peak_rss_bytes  # noqa: E402


def _pretrain_row(spec: dict) -> dict:
    import dataclasses

    import anndata as ad

    from neurofm.config import load_config
    from neurofm.train import TrainConfig, pretrain

    settings = {"num_threads": 2, "num_workers": 0, "device": "cpu"}  # the 2-core CPU default
    if spec.get("config"):
        settings = dataclasses.asdict(load_config(spec["config"]).train)
    settings.update(
        max_steps=spec["steps"],
        val_every_steps=spec["val_every"],
        count_head_epochs=0,
        progress=False,
        seed=0,
    )
    config = TrainConfig(**settings).validate()
    scratch = Path(tempfile.mkdtemp(prefix="neurofm-atlas-pretrain-", dir=spec["scratch"]))
    try:
        start = time.perf_counter()
        if spec["kind"] == "in-memory":
            backed = ad.read_h5ad(spec["h5ad"], backed="r")
            data = backed[: spec["n_cells"]].to_memory()
            backed.file.close()
        else:
            data = spec["store_dir"]
        result = pretrain(data, train_config=config, out_dir=scratch / "run")
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = result.metrics
    timed = rows[1:]  # the first interval includes the loader's start
    train_seconds = sum(row["epoch_time_s"] for row in timed)
    steps = rows[-1]["step"] - rows[0]["step"]
    import torch

    device = "cuda" if config.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    return {
        "kind": spec["kind"],
        "n_cells": spec["n_cells"],
        "seconds": seconds,
        "steps": rows[-1]["step"],
        "steps_per_s": steps / train_seconds,
        "cells_per_s": steps * config.batch_size / train_seconds,
        "data_wait_share": sum(row["data_wait_s"] for row in timed) / train_seconds,
        "device": device,
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "interval_seconds": [round(row["epoch_time_s"], 2) for row in rows],
        "val_perplexity_ratio": rows[-1]["perplexity_ratio"],
        "peak_rss_bytes": _peak_rss_bytes(),
        "load_average_1min_after": os.getloadavg()[0],
    }


def _prepare(kind: str, spec: dict) -> dict:
    from benchmarks.atlas_scale import _measure

    return _measure({**spec, "kind": kind})


def _worker(spec: dict) -> dict:
    if spec["kind"] in ("generate", "convert"):
        return _prepare(spec["kind"], spec)
    return _pretrain_row(spec)


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['kind']:>10} {row['n_cells']:>9,}  ERROR {row['error']}", flush=True)
        return
    rate = f"{row['steps_per_s']:6.3f} steps/s" if "steps_per_s" in row else " " * 14
    if "data_wait_share" in row:
        rate += f"  data wait {100 * row['data_wait_share']:4.1f} %"
    load = f"  (load {row['load_average_1min_after']:.1f})" if "load_average_1min_after" in row else ""
    print(
        f"{row['kind']:>10} {row['n_cells']:>9,} {row['seconds']:>8.1f} s  {rate}  "
        f"peak RSS {row['peak_rss_bytes'] / 2**30:5.2f} GiB{load}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--n-genes", type=int, default=20_000)
    parser.add_argument("--in-memory-cells", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--work-dir", default="/tmp/neurofm_atlas_scale")
    parser.add_argument("--config", help="a YAML config whose train section the rows use (configs/gpu.yaml)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "atlas_pretrain.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    memory_scratch = str(shm if shm.is_dir() and os.access(shm, os.W_OK) else work)
    common = {
        "steps": args.steps,
        "val_every": args.val_every,
        "n_genes": args.n_genes,
        "config": args.config,
    }
    print(f"{'row':>10} {'cells':>9} {'time':>10}", flush=True)
    rows = []

    def row(spec: dict) -> dict:
        result = run_row(__file__, spec, {"kind": spec["kind"], "n_cells": spec["n_cells"]}, ROOT)
        _print_row(result)
        rows.append(result)
        return result

    def atlas(n_cells: int) -> dict:
        atlas_dir = work / f"atlas_{n_cells}x{args.n_genes}"
        spec = {
            **common,
            "n_cells": n_cells,
            "atlas_dir": str(atlas_dir),
            "h5ad": str(atlas_dir / "counts.h5ad"),
            "store_dir": str(work / f"store_{n_cells}x{args.n_genes}"),
            "shard_size": 65536,
        }
        if not (atlas_dir / "cluster_annotation_term.csv").is_file():  # written last by the generator
            row({**spec, "kind": "generate"})
        if not (Path(spec["store_dir"]) / "manifest.json").is_file():
            row({**spec, "kind": "convert"})
        return spec

    first = atlas(min(args.n_cells))
    row({**first, "kind": "in-memory", "n_cells": args.in_memory_cells, "scratch": memory_scratch})
    for n_cells in args.n_cells:
        row({**atlas(n_cells), "kind": "streamed", "scratch": str(work)})
    report = {"benchmark": "atlas_pretrain", "cpu_count": os.cpu_count(), **common, "rows": rows}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
