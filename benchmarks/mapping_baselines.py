"""The label-transfer tools a user would pick instead of ``neurofm map`` (issue 30 item 3), scored as
``benchmarks/mapping_heads.py`` scores its rows.

M1 donor 1 → donor 2 and donor 2 → donor 1 (``benchmarks.reference_mapping.DONORS``), whole donors, two
label levels (``subclass_approx``, 18; ``cluster_label``, 127). Every method is fit on the reference donor
only; the query donor is never seen by a fit or a setting (scANVI's query training sees its counts, never
its labels, as scArches does). Each row: macro-F1 and accuracy of the predicted label over every query
cell, the wall seconds to build the reference and to map the whole query.

- **CellTypist** (``celltypist`` 1.7.1, its defaults): ``celltypist.train`` on log1p CP10k genes (its
  required input) with its default trainer — a one-vs-rest logistic regression, C = 1, lbfgs, max_iter
  1,000 below 50,000 cells, on genes it scales itself; CellTypist documents mini-batch SGD for large
  references, "for example, >100k cells", so at 34–43k cells the default is what it recommends.
  scikit-learn >= 1.8 refuses that trainer's ``multi_class="ovr"``; ``neurofm.evaluate.baselines
  .celltypist_train`` substitutes the same one-vs-rest model for the call (everything else is
  CellTypist's). ``celltypist.annotate`` with majority voting off and on (on: CellTypist builds its own
  kNN graph and Leiden over-clustering of the query; that time is in the row's map seconds).
- **scVI**: one ``scvi.model.SCVI`` per (direction, seed) on the reference counts with scArches'
  settings (the reference as one batch, covariates encoded, layer norm, 2 layers, dropout 0.2, latent 10,
  scvi-tools' epoch rule with its early stopping, capped by ``--scvi-max-epochs``); the query embedded
  without adaptation (``get_latent_representation`` as the reference's batch), then the z-scored logistic
  regression (C = 1, lbfgs, max_iter 1,000) that ``mapping_heads.py``'s logistic row uses on the genes.
- **scANVI**: ``SCANVI.from_scvi_model`` on that same scVI with the level's labels, trained (scvi-tools'
  default epochs: min(10, rule / 3)); the query added by ``SCANVI.load_query_data`` and trained
  ``--scanvi-query-epochs`` (scvi-tools' tutorial: 100 with weight_decay 0; the number used is in the
  JSON), then ``predict()`` and its soft probabilities.
- **Symphony** (``symphonypy`` 0.2.4): its recipe (CP100k, log1p, scale, PCA 30, Harmony on the one
  reference batch for the compressed reference; ``neurofm.evaluate.baselines.symphony_reference``), the
  query mapped by ``symphonypy.tl.map_embedding``, labels by the 5-nearest-neighbour vote of
  ``transfer_labels_kNN`` (confidence: the winning label's vote share; also Symphony's per-cell
  Mahalanobis distance).

``--held-out``: for each subclass of ``HELD_OUT`` (named before any result; ``mapping_heads.py``'s) the
methods with a confidence refit without that subclass's reference cells (scVI too), the whole query mapped
at the subclass level: AUROC of 1 − confidence for the held-out query cells against all others, and the
share of each below the method's own default threshold (CellTypist: ``mode='prob match'``, p_thres 0.5 —
no label above 0.5 is "Unassigned"; scANVI and Symphony: 0.5, stated in the JSON).

Rows are keyed by (direction, level, seed, method[, held_out]); the script skips rows already in its JSON,
writes after every unit of work, and prints a table. Fitted models live in memory and a temporary working
directory only (scvi-tools and CellTypist pickle when they save; nothing is saved).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/mapping_baselines.py --seeds 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402
from benchmarks.mapping_heads import HELD_OUT, LEVELS, scores  # noqa: E402
from benchmarks.reference_mapping import DONORS  # noqa: E402

CELLTYPIST_OFF, CELLTYPIST_ON = "CellTypist (majority voting off)", "CellTypist (majority voting on)"
SCVI_LOGISTIC, SCANVI, SYMPHONY = "scVI latent + logistic C=1 z-scored", "scANVI", "Symphony (kNN k=5)"
UNITS = {"celltypist": (CELLTYPIST_OFF, CELLTYPIST_ON), "symphony": (SYMPHONY,), "scvi": (SCVI_LOGISTIC, SCANVI)}
THRESHOLD = 0.5  # CellTypist's p_thres default; the same for scANVI's probability and Symphony's vote share
QUIET = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
         "logger": False, "enable_checkpointing": False}  # fmt: skip


def counts_view(adata):
    """Raw counts (csr float32) with the gene names and the label columns, nothing else."""
    import anndata as ad
    import scipy.sparse as sp

    out = ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32), obs=adata.obs[list(LEVELS)].astype(str))
    out.var_names = np.asarray(adata.var_names, dtype=str)
    out.obs_names = np.asarray(adata.obs_names, dtype=str)
    return out


def log_normalised(adata):
    import scanpy as sc

    out = counts_view(adata)
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def run_celltypist(reference, query, levels) -> dict:
    """{(method, level): result} — result: predicted, confidence, build_s, map_s."""
    import celltypist

    from neurofm.evaluate.baselines import celltypist_train

    logging.getLogger("celltypist").setLevel(logging.WARNING)
    ref, qry = log_normalised(reference), log_normalised(query)
    out = {}
    for level in levels:
        started = time.perf_counter()
        model = celltypist_train(ref, ref.obs[level].to_numpy())
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        result = celltypist.annotate(qry.copy(), model, majority_voting=False)
        map_s = time.perf_counter() - started
        confidence = result.probability_matrix.to_numpy().max(axis=1)
        out[(CELLTYPIST_OFF, level)] = {
            "predicted": result.predicted_labels["predicted_labels"].astype(str).to_numpy(),
            "confidence": confidence, "build_s": build_s, "map_s": map_s,
            "classifier": f"{type(model.classifier).__name__} C={model.classifier.C} solver={model.classifier.solver} "
                          f"max_iter={model.classifier.max_iter}",
        }  # fmt: skip
        started = time.perf_counter()
        voted = celltypist.annotate(qry.copy(), model, majority_voting=True)
        out[(CELLTYPIST_ON, level)] = {
            "predicted": voted.predicted_labels["majority_voting"].astype(str).to_numpy(),
            "confidence": None, "build_s": build_s, "map_s": time.perf_counter() - started,
            "over_clusters": int(voted.predicted_labels["over_clustering"].nunique()),
        }  # fmt: skip
    return out


def run_symphony(reference, query, levels, seed: int) -> dict:
    from neurofm.evaluate.baselines import symphony_map, symphony_reference

    started = time.perf_counter()
    built = symphony_reference(counts_view(reference), seed=seed)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    labels, distance = symphony_map(built, counts_view(query), levels)
    map_s = time.perf_counter() - started
    return {(SYMPHONY, level): {"predicted": labels[level][0], "confidence": labels[level][1], "distance": distance,
                                "build_s": build_s, "map_s": map_s, "clusters": int(built.uns["harmony"]["K"])}
            for level in levels}  # fmt: skip


def epochs_run(model) -> int | None:
    """Epochs a scvi-tools model trained (early stopping may end it before its limit)."""
    trainer = getattr(model, "trainer", None)
    return None if trainer is None else int(trainer.current_epoch)


def run_scvi(reference, query, levels, seed: int, max_epochs: int | None, query_epochs: int):
    import scvi
    from scvi.model._utils import get_max_epochs_heuristic
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scvi.settings.seed = seed
    scvi.settings.verbosity = logging.ERROR
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    ref = counts_view(reference)
    ref.obs["batch"] = "reference"
    epochs = get_max_epochs_heuristic(ref.n_obs)
    epochs = epochs if max_epochs is None else min(epochs, max_epochs)
    started = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    model = scvi.model.SCVI(ref, n_latent=10, n_layers=2, dropout_rate=0.2, encode_covariates=True,
                            use_layer_norm="both", use_batch_norm="none")  # fmt: skip
    model.train(max_epochs=epochs, early_stopping=True, **QUIET)
    scvi_s = time.perf_counter() - started
    trained_epochs = epochs_run(model)
    ref_latent = model.get_latent_representation()
    started = time.perf_counter()
    plain = counts_view(query)
    plain.obs["batch"] = "reference"  # no adaptation: the query read as the reference's own batch
    scvi.model.SCVI.prepare_query_anndata(plain, model)
    query_latent = model.get_latent_representation(plain)
    embed_s = time.perf_counter() - started
    for level in levels:
        started = time.perf_counter()
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        classifier.fit(ref_latent, ref.obs[level].to_numpy())
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        probability = classifier.predict_proba(query_latent)
        yield (SCVI_LOGISTIC, level), {
            "predicted": classifier.classes_[probability.argmax(axis=1)], "confidence": probability.max(axis=1),
            "build_s": scvi_s + fit_s, "map_s": embed_s + time.perf_counter() - started,
            "scvi_epochs": trained_epochs, "scvi_epoch_limit": epochs,
        }  # fmt: skip
    for level in levels:
        started = time.perf_counter()
        labelled = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category="Unknown", labels_key=level)
        labelled.train(**QUIET)
        scanvi_s = time.perf_counter() - started
        scanvi_epochs = epochs_run(labelled)
        started = time.perf_counter()
        mapped = counts_view(query)
        mapped.obs["batch"] = "query"
        mapped.obs[level] = "Unknown"
        scvi.model.SCANVI.prepare_query_anndata(mapped, labelled)
        query_model = scvi.model.SCANVI.load_query_data(mapped, labelled)
        query_model.train(max_epochs=query_epochs, plan_kwargs={"weight_decay": 0.0}, check_val_every_n_epoch=10,
                          **QUIET)  # fmt: skip
        soft = query_model.predict(soft=True)
        yield (SCANVI, level), {
            "predicted": soft.columns.to_numpy().astype(str)[soft.to_numpy().argmax(axis=1)],
            "confidence": soft.to_numpy().max(axis=1), "build_s": scvi_s + scanvi_s,
            "map_s": time.perf_counter() - started, "scvi_epochs": trained_epochs, "scanvi_epochs": scanvi_epochs,
            "query_epochs": query_epochs,
        }  # fmt: skip


def run_unit(unit: str, reference, query, levels, seed: int, args):
    """((method, level), result) pairs as each is ready (scVI's after its reference, scANVI's one by one)."""
    if unit == "celltypist":
        return run_celltypist(reference, query, levels).items()
    if unit == "symphony":
        return run_symphony(reference, query, levels, seed).items()
    return run_scvi(reference, query, levels, seed, args.scvi_max_epochs, args.scanvi_query_epochs)


def transfer_row(result: dict, truth) -> dict:
    row = {**scores(truth, result["predicted"]), "build_s": round(result["build_s"], 1),
           "map_s": round(result["map_s"], 1)}  # fmt: skip
    if result.get("confidence") is not None:
        row["below_threshold"] = round(float((result["confidence"] <= THRESHOLD).mean()), 4)
    row.update({k: v for k, v in result.items() if k not in ("predicted", "confidence", "distance", "build_s", "map_s")})
    return row


def held_out_row(result: dict, truth, name: str, n_reference: int) -> dict:
    from sklearn.metrics import roc_auc_score

    held = np.asarray(truth).astype(str) == name
    below = result["confidence"] <= THRESHOLD
    called = dict(zip(*np.unique(result["predicted"][held], return_counts=True), strict=True))
    top = sorted(called.items(), key=lambda item: -item[1])[:3]
    row = {"held_out": name, "n_held_out_query": int(held.sum()), "n_held_out_reference": n_reference,
           "auroc": round(float(roc_auc_score(held, 1.0 - result["confidence"])), 4),
           "held_out_below_threshold": round(float(below[held].mean()), 4),
           "others_below_threshold": round(float(below[~held].mean()), 4),
           "held_out_called": {str(k): int(v) for k, v in top},
           "others_f1": scores(np.asarray(truth)[~held], result["predicted"][~held])["f1"],
           "build_s": round(result["build_s"], 1), "map_s": round(result["map_s"], 1)}  # fmt: skip
    if "distance" in result:
        row["auroc_mahalanobis_distance"] = round(float(roc_auc_score(held, result["distance"])), 4)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'method':38s} {'direction':15s} {'level':16s} {'F1':>6s} {'acc':>6s} {'build s':>8s} {'map s':>7s}")
    for r in rows:
        if "held_out" in r:
            continue
        print(f"{r['method']:38s} {r['direction']:15s} {r['level']:16s} {r['f1']:6.3f} {r['accuracy']:6.3f} "
              f"{r['build_s']:8.1f} {r['map_s']:7.1f}")  # fmt: skip
    for r in rows:
        if "held_out" in r:
            print(f"{r['method']:38s} {r['direction']:15s} held out {r['held_out']:10s} AUROC {r['auroc']:.3f} "
                  f"below {THRESHOLD}: held out {r['held_out_below_threshold']:.3f}, others "
                  f"{r['others_below_threshold']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--directions", nargs="+", default=["donor1->donor2", "donor2->donor1"])
    parser.add_argument("--units", nargs="+", default=list(UNITS), choices=list(UNITS), help="methods, in this order")
    parser.add_argument("--scvi-max-epochs", type=int, default=None,
                        help="cap on scvi-tools' epoch rule for the scVI reference (None: the rule)")  # fmt: skip
    parser.add_argument("--scanvi-query-epochs", type=int, default=20,
                        help="scANVI query training (scvi-tools' tutorial: 100; ~6 s an epoch on one thread)")  # fmt: skip
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS),
                        help="label levels of the transfer rows (scANVI at 127 labels takes ~45 min a direction)")  # fmt: skip
    parser.add_argument("--held-out", action="store_true", help="also the held-out refits (subclass level)")
    parser.add_argument("--out", default="benchmarks/results/mapping_baselines.json")
    args = parser.parse_args(argv)

    import anndata as ad
    import torch

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = list(previous.get("rows", []))

    def key(row: dict) -> tuple:
        return (row["direction"], row["level"], row["seed"], row["method"], row.get("held_out"))

    done = {key(r) for r in rows}
    settings = {
        "celltypist": "celltypist.train defaults (one-vs-rest logistic regression, C=1, lbfgs, max_iter 1000 below "
                      "50k cells; no SGD: CellTypist documents mini-batch SGD for >100k cells); the one-vs-rest model "
                      "substituted for LogisticRegression(multi_class='ovr'), which scikit-learn >= 1.8 refuses; "
                      "annotate mode 'best match'; majority voting with CellTypist's own over-clustering",
        "scvi": "SCVI n_latent 10, n_layers 2, dropout 0.2, encode_covariates, layer norm, no batch norm, reference as "
                f"one batch; epochs: scvi-tools' rule min(round(20000/n*400), 400) capped at {args.scvi_max_epochs}, "
                "early stopping; query embedded without adaptation (as the reference batch); classifier: "
                "StandardScaler + LogisticRegression(C=1, max_iter=1000) on the 10-d latent",
        "scanvi": "SCANVI.from_scvi_model(unlabeled_category='Unknown'), scvi-tools' default epochs (min(10, rule/3)); "
                  f"query: load_query_data, {args.scanvi_query_epochs} epochs, weight_decay 0 (the tutorial's 100 "
                  "epochs do not fit the time on one thread); predict(soft=True)",
        "symphony": "symphonypy 0.2.4 recipe: normalize_total 1e5, log1p, all 141 genes, scale max 10, PCA 30 "
                    "(zero_center False), harmony_integrate on the one reference batch (clusters K=min(N/30,100)); "
                    "map_embedding; transfer_labels_kNN's KNeighborsClassifier(k=5); confidence = vote share",
        "threshold": f"below {THRESHOLD}: CellTypist prob-match default p_thres; the same for scANVI and Symphony",
        "threads": 1,
    }  # fmt: skip

    def save() -> None:
        write_report({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "settings": settings,
                      "held_out_named": list(HELD_OUT), "rows": rows}, out)  # fmt: skip

    os.chdir(tempfile.mkdtemp(prefix="neurofm-baselines-"))  # anything a library writes lands here
    cells = {name: ad.read_h5ad(path) for name, path in DONORS.items()}
    for unit in args.units:
        for direction in args.directions:
            ref_name, query_name = direction.split("->")
            reference, query = cells[ref_name], cells[query_name]
            for seed in args.seeds:
                wanted = [(direction, level, seed, method, None) for method in UNITS[unit] for level in args.levels]
                if any(k not in done for k in wanted):
                    started = time.perf_counter()
                    for (method, level), result in run_unit(unit, reference, query, args.levels, seed, args):
                        row = {"direction": direction, "level": level, "seed": seed, "method": method,
                               **transfer_row(result, query.obs[level])}  # fmt: skip
                        if key(row) not in done:
                            rows.append(row)
                            done.add(key(row))
                            save()
                    print(f"{unit} {direction} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
                    print_table([r for r in rows if r["direction"] == direction and r["method"] in UNITS[unit]])
                if not args.held_out:
                    continue
                level = LEVELS[0]
                for name in HELD_OUT:
                    methods = [m for m in UNITS[unit] if m != CELLTYPIST_ON]
                    if all((direction, level, seed, m, name) in done for m in methods):
                        continue
                    keep = (reference.obs[level].astype(str) != name).to_numpy()
                    for (method, _), result in run_unit(unit, reference[keep], query, (level,), seed, args):
                        if method == CELLTYPIST_ON:
                            continue
                        row = {"direction": direction, "level": level, "seed": seed, "method": method,
                               **held_out_row(result, query.obs[level], name, int((~keep).sum()))}  # fmt: skip
                        rows.append(row)
                        done.add(key(row))
                    save()
                    print_table([r for r in rows if r.get("held_out") == name and r["direction"] == direction])
    print_table(rows)


if __name__ == "__main__":
    main()
