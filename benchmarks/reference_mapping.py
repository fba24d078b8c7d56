"""Reference mapping across donors: the model's label transfer against PCA, log-counts and scArches.

M1 donor 1 → donor 2 and donor 2 → donor 1 (``../shared/data/allen_m1_10x_donor{1,2}_141markers.h5ad``),
at two label levels (``subclass_approx``, 18; ``cluster_label``, 127). For each direction: the model is
pre-trained on a seeded sample of the reference donor only (``--ref-cells``; ``--epochs``, one model
per ``--seeds`` entry) and its reference built from those cells (``neurofm.mapping.add_reference``);
the query donor is never seen by pre-training, the reference or any setting. Every method maps the same
query sample (``--query-cells``) by one protocol — ``neurofm.mapping.build_reference`` on its reference
embedding (the probe menu picked on reference cells only, the same unknown rule) and
``transfer_labels`` on the query:

- ``model``: the frozen neurofm embedding (zero-shot: no query-specific training);
- ``pca_ref``: scanpy's recipe (CP10k, log1p, PCA-50) fit on the reference, the query projected;
- ``logcounts``: log-normalised counts of the shared genes as the features (no embedding);
- ``scarches``: scvi-tools' reference mapping (``SCVI`` with the donor as batch key, scArches settings —
  covariates encoded, layer norm, no batch norm — early stopping on the reference; ``load_query_data``
  and ``--scarches-query-epochs`` on the query as the tutorial does), once per direction (seed 0).

Scored on the query: transfer macro-F1 (the classifier's label), per-class F1, query ARI optimised /
at resolution 1 (the evaluation's Leiden sweep on the query's own kNN graph). Unknown rejection
(subclass level): ``--held-out`` subclasses are each left out of the reference in turn; the share of their
query cells called ``unknown`` and the share of all other query cells called ``unknown``. The wall time
to map the whole query donor with the model (embedding + transfer) is timed once per direction.

    PYTHONPATH=$PWD python benchmarks/reference_mapping.py --seeds 0 1 2 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DONORS = {
    "donor1": DATA / "allen_m1_10x_donor1_141markers.h5ad",
    "donor2": DATA / "allen_m1_10x_donor2_141markers.h5ad",
}
LEVELS = ("subclass_approx", "cluster_label")
HELD_OUT = ("Inh_PVALB", "Exc_L6", "Oligo")  # chosen before any run: inhibitory, excitatory, glia


def sample(adata, n_cells: int, seed: int):
    if adata.n_obs <= n_cells:
        return adata.copy()
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False))
    return adata[rows].copy()


def pretrain_model(reference, epochs: int, seed: int, out_dir: Path, count_head_epochs: int | None = None,
                   batch_key: str | None = None) -> Path:  # fmt: skip
    from neurofm.model import ModelConfig
    from neurofm.tokenizer import TokenizerConfig
    from neurofm.train import TrainConfig, pretrain

    config = replace(TrainConfig(), epochs=epochs, seed=seed, progress=False, device="cpu", batch_key=batch_key)
    if count_head_epochs is not None:  # capped: scVI's rule gives 400 epochs at 10,000 cells
        config = replace(config, count_head_epochs=count_head_epochs)
    result = pretrain(reference, TokenizerConfig(), ModelConfig(), config, out_dir)
    return Path(result.model_dir)


def score(ref_x, ref_obs, query_x, query_obs, held_out: tuple[str, ...], levels=LEVELS, reference=None) -> dict:
    """Transfer scores of one method; ``reference``: the one already built from ``ref_x`` (the model's own,
    built by ``add_reference`` with the same settings), else built here."""
    from sklearn.metrics import f1_score

    from neurofm.evaluate.cluster import cluster_embedding
    from neurofm.mapping import UNKNOWN, ReferenceConfig, build_reference, transfer_labels

    out: dict = {}
    if reference is None:
        reference = build_reference(ref_x, ref_obs, ReferenceConfig(label_columns=tuple(levels)))
    for level in levels:
        frame = transfer_labels(reference, query_x, level)
        truth = query_obs[level].astype(str).to_numpy()
        labels = sorted(set(truth))
        per_class = f1_score(truth, frame["predicted"], labels=labels, average=None, zero_division=0)
        out[level] = {
            "transfer_f1": float(f1_score(truth, frame["predicted"], average="macro", zero_division=0)),
            "per_class_f1": {label: round(float(v), 4) for label, v in zip(labels, per_class, strict=True)},
            "unknown_share": float((frame["label"] == UNKNOWN).mean()),
            "classifier": reference.columns[level].classifier_name,
        }
    clusters = cluster_embedding(query_x, query_obs[levels[0]].astype(str).to_numpy())
    metrics = clusters.metrics()
    out["query_ari_optimised"] = float(metrics["ari_optimised"])
    out["query_ari_res1"] = float(metrics["ari_res1_mean"])
    rejection = {}
    for subclass in held_out:
        keep = ref_obs[levels[0]].astype(str).to_numpy() != subclass
        partial = build_reference(ref_x[keep], ref_obs[keep], ReferenceConfig(label_columns=(levels[0],)))
        frame = transfer_labels(partial, query_x, levels[0])
        novel = query_obs[levels[0]].astype(str).to_numpy() == subclass
        unknown = (frame["label"] == UNKNOWN).to_numpy()
        rejection[subclass] = {
            "held_out_unknown": float(unknown[novel].mean()) if novel.any() else float("nan"),
            "others_unknown": float(unknown[~novel].mean()),
            "n_query_cells": int(novel.sum()),
        }
    out["rejection"] = rejection
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="pre-training epochs of the model")
    parser.add_argument("--count-head-epochs", type=int, default=None,
                        help="cap the count head's phase (None: scVI's rule, up to 400 epochs, early-stopped)")
    parser.add_argument("--ref-cells", type=int, default=10_000)
    parser.add_argument("--query-cells", type=int, default=10_000)
    parser.add_argument("--directions", nargs="+", default=["donor1->donor2", "donor2->donor1"])
    parser.add_argument("--methods", nargs="+", default=["model", "pca_ref", "logcounts", "scarches"])
    parser.add_argument("--scarches-query-epochs", type=int, default=200)
    parser.add_argument("--held-out", nargs="+", default=list(HELD_OUT))
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), help="label columns (the first: rejection, ARI)")
    parser.add_argument("--out", default="benchmarks/results/reference_mapping.json")
    parser.add_argument("--save-embeddings", help="directory for each method's (reference, query) embeddings (.npz)")
    args = parser.parse_args(argv)

    import anndata as ad

    from neurofm.evaluate.baselines import shared_gene_views
    from neurofm.evaluate.transfer import baseline_embeddings
    from neurofm.mapping import ReferenceConfig, add_reference, load_reference, map_labels

    rows = []
    for direction in args.directions:
        ref_name, query_name = direction.split("->")
        ref_full, query_full = ad.read_h5ad(DONORS[ref_name]), ad.read_h5ad(DONORS[query_name])
        reference, query = sample(ref_full, args.ref_cells, 0), sample(query_full, args.query_cells, 1)
        held_out, levels = tuple(args.held_out), tuple(args.levels)
        for method in args.methods:
            seeds = args.seeds if method == "model" else [0]
            for seed in seeds:
                started = time.perf_counter()
                extra: dict = {}
                reference_built = None
                if method == "model":
                    with tempfile.TemporaryDirectory() as tmp:
                        model_dir = pretrain_model(reference, args.epochs, seed, Path(tmp), args.count_head_epochs)
                        add_reference(model_dir, reference, ReferenceConfig(label_columns=levels), progress=False)
                        reference_built = load_reference(model_dir)
                        ref_x, _, _ = map_labels(reference, model_dir, progress=False)
                        query_x, _, _ = map_labels(query, model_dir, progress=False)
                        whole = time.perf_counter()
                        map_labels(query_full, model_dir, progress=False)
                        extra["map_whole_query_s"] = round(time.perf_counter() - whole, 2)
                        extra["whole_query_cells"] = int(query_full.n_obs)
                else:  # the map pipeline's baselines (neurofm.evaluate.transfer), fit on the reference only
                    ref_view, query_view = shared_gene_views(reference, query)
                    ref_x, query_x = baseline_embeddings(
                        method, ref_view, query_view, scarches_query_epochs=args.scarches_query_epochs, seed=seed
                    )
                fit_s = time.perf_counter() - started
                if args.save_embeddings:
                    Path(args.save_embeddings).mkdir(parents=True, exist_ok=True)
                    np.savez(Path(args.save_embeddings) / f"{direction.replace('->', '_to_')}_{method}_{seed}.npz",
                             reference=ref_x, query=query_x)  # fmt: skip
                result = score(ref_x, reference.obs, query_x, query.obs, held_out, levels, reference_built)
                row = {"direction": direction, "method": method, "seed": seed, "fit_and_embed_s": round(fit_s, 1),
                       **extra, **result}  # fmt: skip
                rows.append(row)
                write_report({"command": " ".join(sys.argv), "args": vars(args), "rows": rows, "partial": True},
                             args.out)  # after every row: a stopped run keeps what it measured
                f1s = "  ".join(f"{level} F1 {result[level]['transfer_f1']:.3f}" for level in levels)
                print(f"{direction:16s} {method:10s} seed {seed}: {f1s}  ARI-opt {result['query_ari_optimised']:.3f}"
                      f"  unknown {result[levels[0]]['unknown_share']:.3f}  ({fit_s:.0f} s)", flush=True)
    summary = summarise(rows)
    print_table(summary)
    write_report({"command": " ".join(sys.argv), "args": vars(args), "rows": rows, "summary": summary}, args.out)


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for direction in dict.fromkeys(r["direction"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            picked = [r for r in rows if r["direction"] == direction and r["method"] == method]
            if not picked:
                continue

            def stat(values):
                values = np.asarray(values, dtype=float)
                return [round(float(values.mean()), 4), round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4)]

            rejection = [v for r in picked for v in r["rejection"].values()]
            out.append({
                "direction": direction, "method": method, "n_seeds": len(picked),
                **{f"{level}_f1": stat([r[level]["transfer_f1"] for r in picked]) for level in LEVELS if level in picked[0]},
                "query_ari_optimised": stat([r["query_ari_optimised"] for r in picked]),
                "query_ari_res1": stat([r["query_ari_res1"] for r in picked]),
                "unknown_share_first_level": stat([r[level]["unknown_share"] for r in picked for level in LEVELS[:1] if level in r]),
                "held_out_unknown": stat([v["held_out_unknown"] for v in rejection]),
                "others_unknown": stat([v["others_unknown"] for v in rejection]),
                "fit_and_embed_s": stat([r["fit_and_embed_s"] for r in picked]),
                "map_whole_query_s": stat([r["map_whole_query_s"] for r in picked]) if "map_whole_query_s" in picked[0] else None,
            })  # fmt: skip
    return out


def print_table(summary: list[dict]) -> None:
    head = f"{'direction':16s} {'method':10s} {'subclass F1':>15s} {'cluster F1':>15s} {'ARI-opt':>15s} {'held-out unk':>13s} {'others unk':>11s} {'s':>6s}"
    print(head)
    for s in summary:
        f = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}" if v else "not run"  # noqa: E731
        print(f"{s['direction']:16s} {s['method']:10s} {f(s.get('subclass_approx_f1')):>15s} {f(s.get('cluster_label_f1')):>15s} "
              f"{f(s['query_ari_optimised']):>15s} {s['held_out_unknown'][0]:>13.3f} {s['others_unknown'][0]:>11.3f} "
              f"{s['fit_and_embed_s'][0]:>6.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
