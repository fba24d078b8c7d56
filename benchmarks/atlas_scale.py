"""Atlas-scale data path: convert an h5ad into a cell store, then stream token batches from it.

For each ``--n-cells`` (default 100,000 and 1,000,000) a synthetic Allen-style atlas of ``--n-genes``
genes (default 20,000; ~1,000–2,000 non-zeros per cell) is written once by the chunked generator
(``write_synthetic_atlas(..., chunk_size=...)``: never the whole matrix in memory) and cached in
``--work-dir``. Then, each row in a fresh child process (its own peak RSS, VmHWM):

- ``convert``: ``neurofm.data.store.convert`` h5ad → store (cells/s, peak RSS);
- ``fit``: ``neurofm.stream.fit_tokenizer`` on a seeded sample (seconds, peak RSS), saved for the next rows;
- ``loader-1proc-{dense,sparse}``: ``CellStream`` iterated in the process (counts → bin batches: dense
  int16 cells × genes, or the non-zeros' bins only), cells/s;
- ``loader-2workers-{dense,sparse}``: ``StreamLoader(num_workers=2)`` (two DataLoader worker processes),
  cells/s; peak RSS of the main process and of the largest worker.

Targets (issue 12): convert ≥ 50,000 cells/s on 2 cores with peak RSS ≤ 2 GB; loader ≥ 5,000 cells/s in
one process and ≥ 20,000 with workers; loader peak RSS flat from 100 k to 1 M cells.

    python benchmarks/atlas_scale.py                          # 100 k and 1 M (needs ~20 GB of disk)
    python benchmarks/atlas_scale.py --n-cells 20000          # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bench import run_row, write_report  # noqa: E402


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM: reset by exec, unlike getrusage's ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _children_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------- worker
def _worker(spec: dict) -> dict:
    result = _measure(spec)
    result["load_average_1min_after"] = os.getloadavg()[0]  # other processes share the cores
    return result


def _measure(spec: dict) -> dict:
    kind = spec["kind"]
    label = {"kind": kind, "n_cells": spec["n_cells"]}
    if kind == "generate":
        from neurofm.data.synthetic import write_synthetic_atlas

        start = time.perf_counter()
        files = write_synthetic_atlas(
            spec["atlas_dir"], n_cells=spec["n_cells"], n_genes=spec["n_genes"], seed=0, chunk_size=10_000
        )
        seconds = time.perf_counter() - start
        import h5py

        with h5py.File(files.counts_h5ad, "r") as handle:
            nnz = int(handle["X/indptr"][-1])
        return {
            **label,
            "seconds": seconds,
            "cells_per_s": spec["n_cells"] / seconds,
            "nnz_per_cell": nnz / spec["n_cells"],
            "file_bytes": files.counts_h5ad.stat().st_size,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    if kind == "convert":
        from neurofm.data.store import convert

        shutil.rmtree(spec["store_dir"], ignore_errors=True)
        start = time.perf_counter()
        manifest = convert(spec["h5ad"], spec["store_dir"], shard_size=spec["shard_size"], seed=0)
        seconds = time.perf_counter() - start
        store_bytes = sum(f.stat().st_size for f in Path(spec["store_dir"]).rglob("*") if f.is_file())
        return {
            **label,
            "seconds": seconds,
            "cells_per_s": manifest["n_cells"] / seconds,
            "n_shards": len(manifest["shards"]),
            "store_bytes": store_bytes,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    import numpy as np

    from neurofm.data.store import CellStore
    from neurofm.stream import CellStream, StreamConfig, StreamLoader, fit_tokenizer, validation_rows
    from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig

    store = CellStore(spec["store_dir"])
    config = StreamConfig(batch_size=spec["batch_size"], seed=0, output=spec.get("output", "dense"))
    if kind == "fit":
        start = time.perf_counter()
        val = validation_rows(store.n_cells, config.val_fraction, config.seed, config.max_val_cells)
        tokenizer = fit_tokenizer(
            store, TokenizerConfig(constant_genes="keep"), exclude_rows=val, max_cells=spec["fit_cells"]
        )
        seconds = time.perf_counter() - start
        tokenizer.save(spec["tokenizer_dir"])
        return {
            **label,
            "seconds": seconds,
            "fit_cells": spec["fit_cells"],
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    tokenizer = ExpressionTokenizer.load(spec["tokenizer_dir"])
    workers = spec["workers"]
    stream = CellStream(store, tokenizer, config, num_workers=workers)
    batches = StreamLoader(stream, num_workers=workers) if workers else stream
    limit = spec["max_cells"]
    n_cells, n_batches = 0, 0
    checksum = 0
    start = time.perf_counter()
    for batch in batches:
        if n_batches == 0:
            first_batch_s = time.perf_counter() - start
        n_cells += len(batch["rows"])
        n_batches += 1
        checksum += int(batch["bins"][:, :50].sum() if "bins" in batch else batch["nonzero_bins"][:500].sum())
        if n_cells >= limit:
            break
    seconds = time.perf_counter() - start
    del batches
    return {
        **label,
        "workers": workers,
        "output": config.output,
        "seconds": seconds,
        "cells": n_cells,
        "cells_per_s": n_cells / seconds,
        "first_batch_s": first_batch_s,
        "batch_size": spec["batch_size"],
        "peak_rss_bytes": _peak_rss_bytes(),
        "workers_peak_rss_bytes": _children_peak_rss_bytes() if workers else None,
        "checksum": checksum,
        "n_genes": int(np.asarray(store.n_genes)),
    }


# ----------------------------------------------------------------------------------------------- driver
def _row(kind: str, spec: dict, cwd: Path) -> dict:
    spec = {**spec, "kind": kind}
    result = run_row(__file__, spec, {"kind": kind, "n_cells": spec["n_cells"]}, cwd)
    _print_row(result)
    return result


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['kind']:>22} {row['n_cells']:>9,}  ERROR {row['error']}", flush=True)
        return
    rate = f"{row['cells_per_s']:>10,.0f}" if "cells_per_s" in row else " " * 10
    worker_rss = row.get("workers_peak_rss_bytes")
    extra = f"  workers' peak RSS {worker_rss / 2**30:.2f} GiB" if worker_rss else ""
    extra += f"  (load {row['load_average_1min_after']:.1f})" if "load_average_1min_after" in row else ""
    print(
        f"{row['kind']:>22} {row['n_cells']:>9,} {row['seconds']:>9.1f} s {rate} cells/s "
        f"peak RSS {row['peak_rss_bytes'] / 2**30:5.2f} GiB{extra}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--n-genes", type=int, default=20_000)
    parser.add_argument("--work-dir", default="/tmp/neurofm_atlas_scale")
    parser.add_argument("--shard-size", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fit-cells", type=int, default=200_000)
    parser.add_argument("--loader-cells", type=int, default=100_000, help="cells streamed per loader row")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "atlas_scale.json"))
    parser.add_argument("--keep", action="store_true", help="keep the stores (atlases are always cached)")
    parser.add_argument("--reuse-store", action="store_true", help="skip convert where a kept store exists")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'row':>22} {'cells':>9} {'time':>11} {'rate':>10}", flush=True)
    rows = []
    for n_cells in args.n_cells:
        atlas_dir = work / f"atlas_{n_cells}x{args.n_genes}"
        spec = {
            "n_cells": n_cells,
            "n_genes": args.n_genes,
            "atlas_dir": str(atlas_dir),
            "h5ad": str(atlas_dir / "counts.h5ad"),
            "store_dir": str(work / f"store_{n_cells}x{args.n_genes}"),
            "tokenizer_dir": str(work / f"tokenizer_{n_cells}x{args.n_genes}"),
            "shard_size": args.shard_size,
            "batch_size": args.batch_size,
            "fit_cells": args.fit_cells,
            "max_cells": args.loader_cells,
        }
        if not (atlas_dir / "cluster_annotation_term.csv").is_file():  # written last by the generator
            rows.append(_row("generate", spec, ROOT))
        if not (args.reuse_store and (Path(spec["store_dir"]) / "manifest.json").is_file()):
            rows.append(_row("convert", spec, ROOT))
        rows.append(_row("fit", spec, ROOT))
        for workers in (0, 2):
            for output in ("dense", "sparse"):
                kind = f"loader-{'1proc' if workers == 0 else '2workers'}-{output}"
                rows.append(_row(kind, {**spec, "workers": workers, "output": output}, ROOT))
        if not args.keep:
            shutil.rmtree(spec["store_dir"], ignore_errors=True)
    report = {
        "benchmark": "atlas_scale",
        "cpu_count": os.cpu_count(),
        "n_genes": args.n_genes,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "rows": rows,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
