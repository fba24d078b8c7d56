"""`neurofm map` on a million cells: wall time and peak RSS of the command, streamed from a backed file.

The query is M1 donor 2 (33,805 nuclei × 141 genes) tiled ``--copies`` times (30: 1,014,150 cells) into
one .h5ad written block by block (never whole in memory); the model is one pre-trained on donor 1
(``--model``, e.g. a ``benchmarks/mapping_heads.py`` model) with a reference built from donor 1 at both
label levels and the default label head (which reads the genes and the embedding: the query's expression
is a second streamed pass). The command runs as a user runs it, in a subprocess; its peak RSS is the
child's ``ru_maxrss``. Rows: the whole donor (1×) and the tiled file, so cells/s can be compared.

    python benchmarks/map_scale.py --model /tmp/bench/models/donor1_seed0/model --copies 30
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402
from benchmarks.reference_mapping import DONORS  # noqa: E402


def tiled(source: Path, copies: int, out: Path) -> int:
    """Write ``copies`` of ``source``'s cells (raw counts, obs names made unique) to ``out``; the matrix is
    written as a CSR in one HDF5 group, block by block."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    cells = ad.read_h5ad(source)
    matrix = sp.csr_matrix(cells.X)
    n = cells.n_obs
    obs = pd.DataFrame(index=[f"{name}-{copy}" for copy in range(copies) for name in cells.obs_names])
    with h5py.File(out, "w") as handle:
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", cells.var)
        group = handle.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n * copies, cells.n_vars)})
        nnz = matrix.nnz
        data = group.create_dataset("data", (nnz * copies,), dtype=matrix.data.dtype)
        indices = group.create_dataset("indices", (nnz * copies,), dtype=np.int32)
        indptr = group.create_dataset("indptr", (n * copies + 1,), dtype=np.int64)
        for copy in range(copies):
            data[copy * nnz : (copy + 1) * nnz] = matrix.data
            indices[copy * nnz : (copy + 1) * nnz] = matrix.indices
            indptr[copy * n : (copy + 1) * n] = matrix.indptr[:-1].astype(np.int64) + copy * nnz
        indptr[n * copies] = nnz * copies
        for name in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            write_elem(handle, name, {})
    return n * copies


def timed_map(query: Path, model: Path, out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(["neurofm", "map", str(query), "--model", str(model), "--out", str(out)], check=True,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far (KiB)
    said = [line for line in done.stdout.splitlines() if line.startswith(("wrote", "obs["))]
    return {"map_s": round(seconds, 1), "peak_rss_gb": round(peak / 2**20, 2), "peak_grew": peak > before,
            "neurofm_map_said": said}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a model pre-trained on donor 1")
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/map_scale.json")
    args = parser.parse_args(argv)
    from neurofm.io import read_h5ad
    from neurofm.mapping import ReferenceConfig, add_reference

    work = Path(args.work or tempfile.mkdtemp(prefix="neurofm-map-scale-"))
    model = work / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(args.model, model)
    started = time.perf_counter()
    add_reference(model, read_h5ad(DONORS["donor1"]), ReferenceConfig(label_columns=("subclass_approx", "cluster_label")),
                  progress=False)  # fmt: skip
    reference_s = time.perf_counter() - started
    rows = []
    for copies in (1, args.copies):  # the smaller first: the peak RSS of a child is a running maximum
        query = work / f"donor2_x{copies}.h5ad"
        n_cells = tiled(DONORS["donor2"], copies, query)
        row = {"copies": copies, "n_cells": n_cells, **timed_map(query, model, work / f"mapped_x{copies}.h5ad")}
        row["cells_per_s"] = round(n_cells / row["map_s"])
        rows.append(row)
        print(f"{n_cells:>9,d} cells: {row['map_s']:7.1f} s, {row['cells_per_s']:,} cells/s, peak RSS "
              f"{row['peak_rss_gb']:.2f} GB", flush=True)  # fmt: skip
        (work / f"mapped_x{copies}.h5ad").unlink(missing_ok=True)
        query.unlink(missing_ok=True)
    write_report({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "model": str(args.model),
                  "reference_s": round(reference_s, 1), "head": "reference.head defaults (features: auto)",
                  "rows": rows}, args.out)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
