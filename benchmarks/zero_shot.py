"""Zero-shot transfer: a pre-trained model applied to data it never saw, beside PCA and scVI fit on that data.

Each (model, target) pair: the target's genes are matched to the model's (by ID, else by symbol,
case-insensitive; ``neurofm.genes``), the cells are embedded with ``neurofm.embed`` twice — model genes the
target lacks left out of the pooling (``unobserved="exclude"``) or pooled as zero counts (``"zero"``) — and
every embedding is scored with the evaluation pipeline's own protocol (``neurofm.evaluate.compare.
evaluate_embeddings``: the fair probe menu, 5-shot macro-F1 over 10 draws, Leiden ARI at resolution 1 over
3 seeds and cluster-optimised), against PCA-50 (scanpy recipe) and scVI trained on the target itself.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/zero_shot.py \\
        --model cortex=runs/cortex/pretrain/best --model zeisel1464=runs/zeisel/pretrain/best \\
        --pairs cortex:zeisel550 cortex:zeisel1464 zeisel1464:zeisel550
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGETS = {  # file, label column, group column (kept apart by the probe split)
    "cortex": ("subset_2523_210_Cerebral-cortex.screened.h5ad", "subtype", None),
    "zeisel1464": ("zeisel2015_1464cells_1000genes.h5ad", "label", "c1_chip"),
    "zeisel550": ("zeisel2015_550cells_gpsfish.h5ad", "class_label", None),
}
METRICS = ("probe_f1", "fewshot5_f1", "ari_res1_mean", "ari_optimised", "nmi_optimised")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR (repeatable)")
    parser.add_argument("--pairs", nargs="+", required=True, help="MODEL_NAME:TARGET, e.g. cortex:zeisel550")
    parser.add_argument("--baselines", nargs="*", default=["pca", "scvi"])
    parser.add_argument("--min-gene-overlap", type=float, default=0.05)
    parser.add_argument("--out", default="benchmarks/results/zero_shot.json")
    args = parser.parse_args(argv)

    import anndata as ad

    import neurofm
    from neurofm.evaluate.baselines import pca_baseline, scvi_baseline
    from neurofm.evaluate.compare import evaluate_embeddings

    models = dict(item.split("=", 1) for item in args.model)
    rows = []
    for target in dict.fromkeys(pair.split(":")[1] for pair in args.pairs):
        file, label_col, group_col = TARGETS[target]
        adata = ad.read_h5ad(DATA / file)
        labels = adata.obs[label_col].astype(str).to_numpy()
        groups = None if group_col is None else adata.obs[group_col].astype(str).to_numpy()
        embeddings, matches = {}, {}
        for baseline in args.baselines:
            started = time.perf_counter()
            embeddings[baseline] = pca_baseline(adata) if baseline == "pca" else scvi_baseline(adata)
            print(f"{target}: {baseline} in {time.perf_counter() - started:.0f} s", flush=True)
        for pair in args.pairs:
            model_name, pair_target = pair.split(":")
            if pair_target != target:
                continue
            for unobserved in ("exclude", "zero"):
                embedded = neurofm.embed(
                    adata, models[model_name], key_added="X_zero_shot", copy=True, progress=False,
                    min_gene_overlap=args.min_gene_overlap, unobserved=unobserved,
                )  # fmt: skip
                method = f"{model_name}-{unobserved}"
                embeddings[method] = embedded.obsm["X_zero_shot"]
                matches[method] = embedded.uns["neurofm"]["gene_match"]
        with tempfile.TemporaryDirectory() as tmp:
            result = evaluate_embeddings(
                embeddings, labels, tmp, groups=groups, figures=False, label_efficiency_shots=[5]
            )
        metrics = result.summary
        for method in embeddings:
            row = {"target": target, "method": method, "n_cells": int(adata.n_obs)}
            row.update({name: metrics.get(f"{method}/{name}") for name in METRICS})
            if method in matches:
                match = matches[method]
                row.update(
                    genes_found=match["n_found"], model_genes=match["n_model_genes"], by=match["data_key"]
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_report({"args": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
