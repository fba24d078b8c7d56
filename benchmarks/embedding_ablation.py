"""Embedding ablation: neurofm variants vs PCA-50 / scVI / random encoder under ONE fair protocol.

Protocol (the same for every method): a stratified 80/20 split (group-aware on Zeisel's chips); the full
probe picks its classifier on the training cells by inner 5-fold CV from logistic regression (unscaled and
standardised, C in 0.01..100) and kNN (k in 1, 3, 5, 15), scored by macro-F1 on the test cells; 5-shot
macro-F1 is the mean over 10 draws of 5 training cells per class (leave-one-out inner CV); Leiden on a
15-neighbour scanpy graph: ARI at resolution 1 (mean of seeds 0-2) and the best ARI over resolutions
0.1..2.0 (cluster-optimised). The baselines are the pipeline's own (neurofm.evaluate.baselines: PCA-50 on
2,000 HVG, scVI on 2,000 Seurat-v3 HVG with scvi-tools' early stopping); scVI and the random encoder run
once per ``--seeds`` entry (before 2026-11-29 08:00 the script had its own scVI on all genes without
early stopping and one seed: rows in older JSON). ``--fit-on all`` fits pre-training, scVI and PCA on every
cell of a file bigger than the sample (M1: 42,728 cells) and scores them on the same 10,000-cell sample.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/embedding_ablation.py \
        --datasets cortex --variants default mean_nonzero --seeds 0 --epochs 10 --baselines pca scvi random
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402

DATA = Path("/work/shared/data")
DATASETS = {
    "cortex": ("subset_2523_210_Cerebral-cortex.screened.h5ad", "subtype", None),
    "zeisel": ("zeisel2015_1464cells_1000genes.h5ad", "label", "c1_chip"),
    "zeisel550": ("zeisel2015_550cells_gpsfish.h5ad", "class_label", None),
    "allen": ("allen_m1_10x_donor1_141markers.h5ad", "subclass_approx", None),
}
# variant name -> (TrainConfig overrides, ModelConfig overrides, embed pooling, tokenizer binning)
VARIANTS = {
    "default": ({}, {}, "auto", "quantile"),  # the current defaults (the count head since 2026-11-29)
    # the bin heads alone (latent_dim 0): the default before 2026-11-29, called "default" in older JSON
    "bins_only": ({}, {"latent_dim": 0}, "mean", "quantile"),
    "mean_nonzero": ({}, {"latent_dim": 0}, "mean_nonzero", "quantile"),
    "no_cell_loss": ({"cell_loss_weight": 0.0}, {"latent_dim": 0}, "mean", "quantile"),
    "nonzero_pool": ({}, {"latent_dim": 0, "cell_pooling": "nonzero"}, "mean_nonzero", "quantile"),
    "qnz_nonzero_pool": (
        {},
        {"latent_dim": 0, "cell_pooling": "nonzero"},
        "mean_nonzero",
        "quantile_nonzero",
    ),
    # scVI-like count head: pooled cell vector -> variational latent -> NB means (library size offset)
    "count_latent16": ({}, {"latent_dim": 16}, "auto", "quantile"),
    "count_latent16_nonzero": ({}, {"latent_dim": 16, "cell_pooling": "nonzero"}, "auto", "quantile"),
    "count_latent10_only": ({"cell_loss_weight": 0.0}, {"latent_dim": 10}, "auto", "quantile"),
    # the count head's encoder also reads the binned expression directly (a linear layer, as scVI's),
    # then the count head's own phase (neurofm.count_phase) for 0, 25 epochs or scVI's rule (None)
    "expr_phase0": (
        {"count_head_epochs": 0},
        {"latent_dim": 16, "latent_reads_expression": True},
        "auto",
        "quantile",
    ),
    "expr_phase25": (
        {"count_head_epochs": 25},
        {"latent_dim": 16, "latent_reads_expression": True},
        "auto",
        "quantile",
    ),
    "expr_phase_scvi": (
        {"count_head_epochs": None},
        {"latent_dim": 16, "latent_reads_expression": True},
        "auto",
        "quantile",
    ),
    "phase25": ({"count_head_epochs": 25}, {"latent_dim": 16}, "auto", "quantile"),
    # the default (count genes, early-stopped phase) with a wider latent (scVI's range is 10-30)
    "latent32": ({}, {"latent_dim": 32}, "auto", "quantile"),
    # the default without the count genes (the count head reads and reconstructs every gene)
    "all_count_genes": ({}, {"count_genes": 0}, "auto", "quantile"),
    # the count head's phase at the full KL weight from its first step (no second warm-up): the default
    # since 2026-11-29 (third session), and with the warm-up over the whole phase (the default before)
    "phase_full_kl": ({"count_head_kl_warmup": 0.0}, {}, "auto", "quantile"),
    "phase_kl_warmup": ({"count_head_kl_warmup": 1.0}, {}, "auto", "quantile"),
    # no pre-training to speak of (one optimisation step), then the count head's phase as usual: what the
    # transformer's token features add to the embedding
    "no_pretraining": ({"max_steps": 1}, {}, "auto", "quantile"),
}


def load(name: str, max_cells: int = 10000, fit_on: str = "sample"):
    """The evaluation cells (a fixed 10,000-cell sample of a bigger file) and the cells every method is fit
    on: the same sample (``fit_on="sample"``), or the whole file (``"all"``: pre-training, scVI and PCA
    see every cell, unlabelled, and are scored on the sample's rows — what more pre-training data adds)."""
    import anndata as ad

    file, label, group = DATASETS[name]
    full = ad.read_h5ad(DATA / file)
    keep = np.arange(full.n_obs)
    if full.n_obs > max_cells:
        keep = np.sort(np.random.default_rng(0).choice(full.n_obs, max_cells, replace=False))
    adata = full[keep].copy()
    fit = full if fit_on == "all" else adata
    rows = keep if fit_on == "all" else np.arange(adata.n_obs)
    return adata, fit, rows, label, group


def split(labels, groups, seed: int = 0):
    from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit

    idx = np.arange(len(labels))
    if groups is not None:
        return next(GroupShuffleSplit(1, test_size=0.2, random_state=seed).split(idx, labels, groups))
    return next(StratifiedShuffleSplit(1, test_size=0.2, random_state=seed).split(idx, labels))


def classifier_menu():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    menu = []
    for c in (0.01, 0.1, 1, 10, 100):
        menu.append((f"lr C={c}", lambda c=c: LogisticRegression(C=c, max_iter=2000)))
        menu.append(
            (
                f"lr-std C={c}",
                lambda c=c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)),
            )
        )
    for k in (1, 3, 5, 15):
        menu.append((f"knn k={k}", lambda k=k: KNeighborsClassifier(k)))
    return menu


def pick_and_score(x_train, y_train, x_test, y_test, leave_one_out: bool):
    from sklearn.metrics import f1_score
    from sklearn.model_selection import LeaveOneOut, StratifiedKFold, cross_val_predict

    cv = LeaveOneOut() if leave_one_out else StratifiedKFold(5, shuffle=True, random_state=0)
    best, best_score = None, -1.0
    for name, make in classifier_menu():
        if name.startswith("knn") and int(name.split("=")[1]) >= len(y_train) - 1:
            continue
        predicted = cross_val_predict(make(), x_train, y_train, cv=cv)
        score = f1_score(y_train, predicted, average="macro")
        if score > best_score:
            best, best_score = (name, make), score
    model = best[1]().fit(x_train, y_train)
    return f1_score(y_test, model.predict(x_test), average="macro"), best[0]


def score_embedding(x: np.ndarray, labels: np.ndarray, groups) -> dict:
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    warnings.filterwarnings("ignore")
    train, test = split(labels, groups)
    probe, probe_clf = pick_and_score(x[train], labels[train], x[test], labels[test], leave_one_out=False)
    rng = np.random.default_rng(0)
    shots = []
    for _ in range(10):
        chosen = np.concatenate(
            [  # as the pipeline's label-efficiency table: a class with fewer than 5 gives all it has
                rng.choice(pool, min(5, pool.size), replace=False)
                for pool in (train[labels[train] == c] for c in np.unique(labels[train]))
            ]
        )
        shots.append(pick_and_score(x[chosen], labels[chosen], x[test], labels[test], leave_one_out=True)[0])
    adata = sc.AnnData(np.zeros((len(x), 1), dtype=np.float32))
    adata.obsm["X"] = x.astype(np.float32)
    sc.pp.neighbors(adata, n_neighbors=15, use_rep="X", random_state=0)
    ari_res1 = []
    for seed in range(3):
        sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2)
        ari_res1.append(adjusted_rand_score(labels, adata.obs["leiden"]))
    best = 0.0
    for resolution in np.arange(0.1, 2.01, 0.1):
        sc.tl.leiden(adata, resolution=resolution, random_state=0, flavor="igraph", n_iterations=2)
        best = max(best, adjusted_rand_score(labels, adata.obs["leiden"]))
    return {
        "probe_f1": probe,
        "probe_classifier": probe_clf,
        "shot5_f1": float(np.mean(shots)),
        "ari_res1": float(np.mean(ari_res1)),
        "ari_best": float(best),
    }


def pca_embedding(adata) -> np.ndarray:
    """The project's PCA baseline (neurofm.evaluate.baselines: scanpy's recipe, 2,000 HVG, 50 PCs)."""
    from neurofm.evaluate.baselines import pca_baseline

    return pca_baseline(adata)


def scvi_embedding(adata, seed: int = 0) -> np.ndarray:
    """The project's scVI baseline (2,000 Seurat-v3 HVG when there are more, scvi-tools' epoch rule with
    its early stopping), seeded — the same function the pipeline's report uses."""
    from neurofm.evaluate.baselines import scvi_baseline

    return scvi_baseline(adata, seed=seed)


def model_embedding(adata, variant: str, seed: int, epochs: int, random_weights: bool = False, fit=None):
    import torch

    from neurofm.embedding import embed_matrix, random_encoder_like
    from neurofm.model import ModelConfig, load_pretrained
    from neurofm.tokenizer import TokenizerConfig
    from neurofm.train import TrainConfig, pretrain

    overrides, model_overrides, pooling, binning = VARIANTS[variant]
    config = replace(
        TrainConfig(), epochs=epochs, seed=seed, num_threads=1, progress=False, device="cpu", **overrides
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_config = ModelConfig(**model_overrides)
        result = pretrain(
            adata if fit is None else fit,
            tokenizer_config=TokenizerConfig(binning=binning),
            model_config=model_config,
            train_config=config,
            out_dir=tmp,
        )
        model, tokenizer = load_pretrained(result.model_dir)
        if random_weights:
            model = random_encoder_like(model.config, seed=seed)
        torch.set_num_threads(1)
        x = embed_matrix(model, tokenizer, adata, pooling=pooling, device="cpu", progress=False)
        best = result.best
        ratio = best.get("val_perplexity", float("nan")) / result.baseline_perplexity
        head = result.count_head or {}
    return x, {
        "perplexity_ratio": round(ratio, 4),
        "count_head_epochs_run": head.get("epochs_run"),
        "count_head_best_epoch": head.get("best_epoch"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cortex"])
    parser.add_argument("--variants", nargs="*", default=["default"])
    parser.add_argument("--baselines", nargs="*", default=["pca"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--fit-on",
        choices=("sample", "all"),
        default="sample",
        help="fit every method on the 10,000-cell evaluation sample, or on all cells of the file",
    )
    parser.add_argument("--out", default="benchmarks/results/embedding_ablation.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    for dataset in args.datasets:
        adata, fit, rows_in_fit, label, group = load(dataset, fit_on=args.fit_on)
        labels = adata.obs[label].astype(str).to_numpy()
        groups = None if group is None else adata.obs[group].astype(str).to_numpy()
        # PCA is deterministic; scVI and the random encoder move with the seed, so they run per seed
        jobs = [
            (b, None if b == "pca" else s)
            for b in args.baselines
            for s in (args.seeds if b != "pca" else [0])
        ]
        jobs += [(v, s) for v in args.variants for s in args.seeds]
        for method, seed in jobs:
            start = time.time()
            if method == "pca":
                x = pca_embedding(fit)[rows_in_fit]
            elif method == "scvi":
                x = scvi_embedding(fit, seed)[rows_in_fit]
            elif method == "random":
                x, _ = model_embedding(adata, "default", seed, 1, random_weights=True)
            else:
                x, trained = model_embedding(adata, method, seed, args.epochs, fit=fit)
            row = {
                "dataset": dataset,
                "method": method,
                "seed": seed,
                "fit_cells": fit.n_obs,
                **score_embedding(x, labels, groups),
            }
            if method not in ("pca", "scvi", "random"):
                row.update(trained)
            row["seconds"] = round(time.time() - start, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_report({"args": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
