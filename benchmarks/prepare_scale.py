"""Scale benchmark for the data-preparation subset: backed (chunked h5py row reads) vs a naive full read.

Generates once, and caches, a synthetic atlas of 200,000 cells × 20,000 genes (≥ 1.5 GB on disk) with
the chunked writer, then in separate child processes (so each peak RSS is its own) times

- ``backed``: :func:`neurofm.data.backed.subset_by_clusters` of two clusters (X never loaded whole);
- ``naive``: ``anndata.read_h5ad`` of the whole file, metadata join, ``adata[keep].copy()``;

and prints a table and writes JSON. Both children report a checksum of the subset so the two are
checked to agree.

    python benchmarks/prepare_scale.py                 # full size (generation takes a few minutes once)
    python benchmarks/prepare_scale.py --small         # 20,000 × 2,000 quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM belongs to the process image (reset by exec), whereas getrusage's
    ru_maxrss survives fork+exec and would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _child(mode: str, h5ad: str, metadata: str, clusters: list[int]) -> None:
    """Run one subset in this process and print one JSON line with its time and peak RSS."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from neurofm import keys
    from neurofm.data.backed import subset_by_clusters

    rss_after_imports = _peak_rss_bytes()
    start = time.perf_counter()
    if mode == "backed":
        subset = subset_by_clusters(h5ad, metadata, clusters)
    else:
        adata = ad.read_h5ad(h5ad)
        table = pd.read_csv(metadata, usecols=[keys.CELL_LABEL, keys.CLUSTER_ALIAS]).set_index(
            keys.CELL_LABEL
        )
        keep = table[keys.CLUSTER_ALIAS].reindex(adata.obs_names).isin(clusters).to_numpy()
        subset = adata[keep].copy()
        del adata
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "mode": mode,
                "seconds": round(seconds, 2),
                "peak_rss_bytes": _peak_rss_bytes(),
                "rss_after_imports_bytes": rss_after_imports,
                "n_cells": int(subset.n_obs),
                "n_genes": int(subset.n_vars),
                "nnz": int(subset.X.nnz),
                "checksum": float(np.asarray(subset.X.sum(dtype=np.float64))),
            }
        )
    )


def _ensure_atlas(work_dir: Path, n_cells: int, n_genes: int, seed: int) -> tuple[dict, dict]:
    """The cached atlas' file paths and generation info; generated on first use."""
    from neurofm.data.synthetic import AtlasFiles, write_synthetic_atlas

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / ".gitignore").write_text("*\n")  # the cache never enters git
    atlas_dir = work_dir / f"atlas_{n_cells}x{n_genes}_s{seed}"
    marker = atlas_dir / "done.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        return info["files"], info
    print(f"generating {n_cells:,} × {n_genes:,} synthetic atlas in {atlas_dir} (once) …", flush=True)
    start = time.perf_counter()
    files: AtlasFiles = write_synthetic_atlas(
        atlas_dir, n_cells=n_cells, n_genes=n_genes, seed=seed, chunk_size=5000, progress=True
    )
    info = {
        "files": {name: str(path) for name, path in files.as_dict().items()},
        "n_cells": n_cells,
        "n_genes": n_genes,
        "seed": seed,
        "generation_seconds": round(time.perf_counter() - start, 1),
        "h5ad_bytes": files.counts_h5ad.stat().st_size,
    }
    marker.write_text(json.dumps(info, indent=2))
    return info["files"], info


def _run_child(mode: str, files: dict, clusters: list[int]) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--h5ad", files["counts_h5ad"]]
    command += ["--metadata", files["cell_metadata_csv"], "--clusters", *map(str, clusters)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare_scale.json")
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clusters", type=int, nargs="+", default=[2523, 210])
    parser.add_argument("--small", action="store_true", help="20,000 cells × 2,000 genes quick check")
    parser.add_argument("--skip-naive", action="store_true", help="only time the backed subset")
    parser.add_argument("--child", choices=["backed", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--h5ad", help=argparse.SUPPRESS)
    parser.add_argument("--metadata", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.h5ad, args.metadata, args.clusters)
        return 0
    if args.small:
        args.cells, args.genes = 20_000, 2_000

    files, info = _ensure_atlas(args.work_dir, args.cells, args.genes, args.seed)
    results = [_run_child("backed", files, args.clusters)]
    if not args.skip_naive:
        results.append(_run_child("naive", files, args.clusters))
    if len(results) == 2:
        same = all(results[0][k] == results[1][k] for k in ("n_cells", "n_genes", "nnz", "checksum"))
        if not same:
            raise SystemExit(f"backed and naive subsets differ: {results}")

    gib = 1024**3
    print(
        f"\natlas {info['n_cells']:,} cells × {info['n_genes']:,} genes, counts.h5ad "
        f"{info['h5ad_bytes'] / gib:.2f} GiB (generated in {info['generation_seconds']} s); "
        f"clusters {args.clusters}"
    )
    print(f"{'method':<8} {'seconds':>8} {'peak RSS':>12} {'RSS after imports':>18} {'cells':>7} {'nnz':>12}")
    for row in results:
        print(
            f"{row['mode']:<8} {row['seconds']:>8.2f} {row['peak_rss_bytes'] / gib:>8.2f} GiB "
            f"{row['rss_after_imports_bytes'] / gib:>14.2f} GiB {row['n_cells']:>7,} {row['nnz']:>12,}"
        )
    record = {
        "command": "python benchmarks/prepare_scale.py" + (" --small" if args.small else ""),
        "atlas": info,
        "clusters": args.clusters,
        "cpu_count": os.cpu_count(),
        "results": results,
        "target_peak_rss_bytes": int(1.5 * 1e9),
        "backed_within_target": results[0]["peak_rss_bytes"] <= 1.5e9,
    }
    out = args.out if not args.small else args.out.with_name(args.out.stem + "_small.json")
    sys.path.insert(0, str(ROOT))
    from neurofm.io import write_json

    write_json(record, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
