"""Embedding speed: the per-token reference path against ``neurofm.embedding.embed``, from raw counts.

Usage (from the repository root, CPU threads default to 2 like the project's machines)::

    python benchmarks/embed_speed.py \
        [--data ../shared/data/subset_2523_210_Cerebral-cortex.screened.h5ad] [--model MODEL_DIR]
        [--threads 2] [--rounds 3] [--repeats 3] [--batch-size 256]

Without ``--model`` the default architecture (``ModelConfig()``, random weights: weights do not change
the speed) and a tokenizer fit on all cells are used; with it, the model directory's model and tokenizer.
Without the data file (``../shared`` absent) a synthetic dataset of the same shape (1,152 cells × 2,000
genes) is generated instead. Rows, each timed from the raw-count AnnData (tokenization included) over
every cell and every gene:

- ``reference``: the straightforward path the package took before, written out here (not in the
  package): binning that compares every value with all its gene's edges at once in float64, then
  ``model.cell_embedding`` over every (cell, gene) token, ``batch_size`` cells at a time;
- ``embed()``: ``neurofm.embedding.embed(..., pooling="mean")`` as shipped.

Each round runs every row in its own subprocess, one after the other (so each peak RSS is its own and
load changes on a shared machine hit both rows alike); a subprocess warms up, then times ``repeats``
full passes, then ``repeats`` tokenizations alone (the reference's bins must equal
``tokenizer.transform``'s). The table gives median and best cells/s over all passes and the ratio of
the medians; the two paths' embeddings are compared (max absolute difference). Prints a table and
writes ``benchmarks/results/embed_speed.json`` (``embed_speed_synthetic.json`` for the synthetic data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench import run_row, write_report  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "subset_2523_210_Cerebral-cortex.screened.h5ad"
RESULTS = ROOT / "benchmarks" / "results"
SYNTHETIC_SHAPE = (1152, 2000)  # the shared cortex data's cells × genes
ROWS = {"reference": "reference (per-token cell_embedding)", "embed": "embed() (feature table)"}


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not inherit the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _load(spec: dict):
    """(adata, model, tokenizer) as the spec asks: data file or synthetic, model directory or default."""
    from neurofm.embedding import random_encoder_like
    from neurofm.io import read_h5ad
    from neurofm.model import ModelConfig, load_pretrained
    from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig

    if spec["data"] is None:
        from neurofm.data.synthetic import make_synthetic_counts

        n_cells, n_genes = SYNTHETIC_SHAPE
        adata = make_synthetic_counts(n_cells=n_cells, n_genes=n_genes, seed=0)
    else:
        adata = read_h5ad(spec["data"])
    if spec["model"] is not None:
        model, tokenizer = load_pretrained(spec["model"])
        return adata, model, tokenizer
    tokenizer = ExpressionTokenizer(TokenizerConfig()).fit(adata)
    config = ModelConfig(n_genes=adata.n_vars, n_bins=tokenizer.config.n_bins)
    return adata, random_encoder_like(config, seed=0), tokenizer


def reference_bins(tokenizer, adata):
    """``tokenizer.transform`` as the package computed it before: every value compared with every edge
    of its gene at once in float64 (a cells × genes × edges array), in blocks of 2,048 cells."""
    import numpy as np

    from neurofm.tokenizer import normalise_counts

    config, edges = tokenizer.config, tokenizer.bin_edges
    values = normalise_counts(
        tokenizer.aligned_counts(adata), config.target_sum, config.log1p, config.check_integer_counts
    )
    out = np.empty(values.shape, dtype=np.int16)
    for start in range(0, values.shape[0], 2048):
        count = (values[start : start + 2048, :, None] >= edges[None, :, :]).sum(axis=2, dtype=np.int32)
        out[start : start + 2048] = np.clip(count - 1, 0, config.n_bins - 1)
    return out


def reference_embed(model, tokenizer, adata, batch_size: int):
    """Mean-pooled cell embeddings the straightforward way: :func:`reference_bins`, then every (cell,
    gene) token through the model's ``cell_embedding``, ``batch_size`` cells at a time."""
    import numpy as np
    import torch

    bins = torch.from_numpy(reference_bins(tokenizer, adata)).long()
    out = np.empty((adata.n_obs, model.config.d_model), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, adata.n_obs, batch_size):
            cells = bins[start : start + batch_size]
            gene_ids = torch.arange(cells.shape[1]).expand(cells.shape[0], -1)
            out[start : start + len(cells)] = model.cell_embedding(gene_ids, cells).numpy()
    return out


def _worker(spec: dict) -> dict:
    """Run one row in this process (warm-up, then ``repeats`` timed passes) and return its measurements."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from neurofm.embedding import embed_matrix

    torch.set_num_threads(spec["threads"])
    adata, model, tokenizer = _load(spec)
    model = model.eval()
    batch_size = spec["batch_size"]

    def run(cells):
        if spec["kind"] == "reference":
            return reference_embed(model, tokenizer, cells, batch_size)
        return embed_matrix(model, tokenizer, cells, batch_size=batch_size, device="cpu", progress=False)

    run(adata[:64].copy())  # warm-up
    seconds = []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        embedding = run(adata)
        seconds.append(time.perf_counter() - started)
    tokenize_seconds = []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        bins = reference_bins(tokenizer, adata) if spec["kind"] == "reference" else tokenizer.transform(adata)
        tokenize_seconds.append(time.perf_counter() - started)
    if not np.array_equal(bins, tokenizer.transform(adata)):
        raise SystemExit("reference_bins differ from tokenizer.transform")
    np.save(spec["embedding_path"], embedding)
    return {
        "kind": spec["kind"],
        "seconds": seconds,
        "tokenize_seconds": tokenize_seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "d_model": model.config.d_model,
    }


def _run_row(spec: dict) -> dict:
    return run_row(__file__, spec, {"kind": spec["kind"]}, ROOT)


def _summarise(kind: str, runs: list[dict]) -> dict:
    errors = [run["error"] for run in runs if "error" in run]
    if errors:
        return {"name": ROWS[kind], "error": errors[0]}
    n_cells = runs[0]["n_cells"]
    speeds = [n_cells / s for run in runs for s in run["seconds"]]
    return {
        "name": ROWS[kind],
        "cells_per_s_median": statistics.median(speeds),
        "cells_per_s_best": max(speeds),
        "cells_per_s_all": speeds,
        "tokenize_s_median": statistics.median(s for run in runs for s in run["tokenize_seconds"]),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "n_cells": n_cells,
        "n_genes": runs[0]["n_genes"],
        "d_model": runs[0]["d_model"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument(
        "--model", default=None, help="model directory (default: ModelConfig(), random weights)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    synthetic = not Path(args.data).is_file()
    if synthetic:
        print(
            f"data file {args.data} not found: using synthetic data of shape {SYNTHETIC_SHAPE}",
            file=sys.stderr,
        )
    out = Path(args.out or RESULTS / ("embed_speed_synthetic.json" if synthetic else "embed_speed.json"))

    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {kind: [] for kind in ROWS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for kind in ROWS:
                print(f"round {round_index + 1}/{args.rounds}: {ROWS[kind]} …", file=sys.stderr, flush=True)
                spec = {
                    "kind": kind,
                    "data": None if synthetic else str(args.data),
                    "model": args.model,
                    "threads": args.threads,
                    "repeats": args.repeats,
                    "batch_size": args.batch_size,
                    "embedding_path": str(Path(scratch) / f"{kind}.npy"),
                }
                runs[kind].append(_run_row(spec))
        paths = {kind: Path(scratch) / f"{kind}.npy" for kind in ROWS}
        max_abs_diff = (
            float(np.abs(np.load(paths["embed"]) - np.load(paths["reference"])).max())
            if all(path.is_file() for path in paths.values())
            else None
        )
    rows = [_summarise(kind, kind_runs) for kind, kind_runs in runs.items()]
    reference, ours = rows
    ok = "error" not in reference and "error" not in ours
    ratio = ours["cells_per_s_median"] / reference["cells_per_s_median"] if ok else None

    print(f"\n{'path':40s} {'cells/s median':>15s} {'best':>9s} {'tokenize s':>11s} {'peak RSS MB':>12s}")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:40s} failed: {row['error']}")
            continue
        print(
            f"{row['name']:40s} {row['cells_per_s_median']:15.0f} {row['cells_per_s_best']:9.0f} "
            f"{row['tokenize_s_median']:11.3f} {row['peak_rss_mb']:12.0f}"
        )
    if ok:
        print(f"\nembed() / reference cells/s (medians): {ratio:.1f}x")
        target = "met" if ours["cells_per_s_median"] >= 2000 else "NOT met"
        print(f"embed() median {ours['cells_per_s_median']:.0f} cells/s (target >= 2,000: {target})")
    if max_abs_diff is not None:
        print(f"max |embed() - reference| = {max_abs_diff:.2e}")
    report = {
        "rows": rows,
        "speedup_median_cells_per_s": ratio,
        "max_abs_diff": max_abs_diff,
        "threads": args.threads,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "data": "synthetic" if synthetic else str(args.data),
        "model": args.model or "ModelConfig() with random weights",
        "command": " ".join(["python benchmarks/embed_speed.py", *sys.argv[1:]]),
    }
    write_report(report, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
