"""Where ``unknown`` should measure distance: the model's embedding against a random-weights encoder of the
same shape and the genes themselves, by one rule (issue 30 item 4: what pre-training adds to mapping).

M1 donor 1 → donor 2 and back, whole donors, subclass level; each subclass of
``benchmarks.mapping_heads.HELD_OUT`` (named before any result) left out of the reference in turn. One rule
for every space, so only the space differs: every query cell's label comes from the same classifier on the
genes (z-scored log-normalised genes, logistic regression C = 1, fit on the reference without the held-out
type); its *distance* is the mean Euclidean distance to its 15 nearest reference cells of that label; its
score is the share of that label's own reference cells (up to 2,000, each leaving itself out) at least as
far; ``unknown`` below the score under which 5 % of the reference cells fall (``reference.unknown_quantile``
0.95, as ``neurofm map``). Rows: AUROC of the score for held-out query cells against all others, and the
share of each called ``unknown``.

Spaces: ``model`` (the pre-trained model's embedding, what ``neurofm map`` measures distance in),
``random-weights encoder`` (the same architecture untrained: the control for pre-training), ``genes PCA 30``
(PCA fit on the reference's z-scored genes), ``genes`` (the z-scored genes themselves). Models: the
``--models DIR/<ref>_seed<N>/model`` of ``mapping_heads.py`` (one per direction and seed).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/mapping_unknown_space.py --models /tmp/bench/models --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402
from benchmarks.mapping_heads import HELD_OUT, LEVELS  # noqa: E402
from benchmarks.reference_mapping import DONORS  # noqa: E402

K, QUANTILE, MAX_OWN = 15, 0.95, 2000


def z_scored_genes(reference, query) -> tuple[np.ndarray, np.ndarray]:
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    def lognorm(cells):
        out = ad.AnnData(X=sp.csr_matrix(cells.X, dtype=np.float32))
        sc.pp.normalize_total(out, target_sum=1e4)
        sc.pp.log1p(out)
        return out.X.toarray()

    ref, qry = lognorm(reference), lognorm(query)
    mean, sd = ref.mean(axis=0), ref.std(axis=0) + 1e-6
    return (ref - mean) / sd, (qry - mean) / sd


def scores(ref_x, ref_labels, query_x, predicted, rng) -> tuple[np.ndarray, float]:
    """(each query cell's score against its predicted label, the threshold at the 5 % reference quantile)."""
    from sklearn.neighbors import NearestNeighbors

    out, calibration = np.ones(len(query_x)), []
    for label in np.unique(ref_labels):
        cells = ref_x[ref_labels == label]
        k = min(K, len(cells) - 1)
        index = NearestNeighbors(n_neighbors=k + 1).fit(cells)
        own_rows = rng.choice(len(cells), min(MAX_OWN, len(cells)), replace=False)
        own = np.sort(index.kneighbors(cells[own_rows], k + 1)[0][:, 1:].mean(axis=1))
        calibration.append(1.0 - np.searchsorted(own, own, side="left") / len(own))
        rows = predicted == label
        if rows.any():
            distance = index.kneighbors(query_x[rows], k)[0].mean(axis=1)
            out[rows] = 1.0 - np.searchsorted(own, distance, side="left") / len(own)
    return out, float(np.quantile(np.concatenate(calibration), 1.0 - QUANTILE))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--directions", nargs="+", default=["donor1->donor2", "donor2->donor1"])
    parser.add_argument("--out", default="benchmarks/results/mapping_unknown_space.json")
    args = parser.parse_args(argv)

    import anndata as ad
    import torch
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from neurofm.cell_features import reference_features
    from neurofm.embedding import random_encoder_like
    from neurofm.model import load_pretrained

    torch.set_num_threads(1)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["direction"], r["seed"], r["held_out"], r["space"]) for r in rows}
    level = LEVELS[0]
    for direction in args.directions:
        ref_name, query_name = direction.split("->")
        reference, query = ad.read_h5ad(DONORS[ref_name]), ad.read_h5ad(DONORS[query_name])
        ref_labels, truth = (c.obs[level].astype(str).to_numpy() for c in (reference, query))
        ref_genes, query_genes = z_scored_genes(reference, query)
        for seed in args.seeds:
            if all((direction, seed, h, "model") in done for h in HELD_OUT):
                continue
            model, tokenizer = load_pretrained(Path(args.models) / f"{ref_name}_seed{seed}" / "model")
            control = random_encoder_like(model.config, seed=seed)
            spaces = {
                name: tuple(reference_features(encoder, tokenizer, cells, progress=False)[0] for cells in (reference, query))
                for name, encoder in (("model", model), ("random-weights encoder", control))
            }  # fmt: skip
            for held in HELD_OUT:
                keep = ref_labels != held
                pca = PCA(30, random_state=seed).fit(ref_genes[keep])
                spaces_here = {**spaces, "genes PCA 30": (pca.transform(ref_genes), pca.transform(query_genes)),
                               "genes": (ref_genes, query_genes)}  # fmt: skip
                started = time.perf_counter()
                classifier = LogisticRegression(C=1.0, max_iter=1000).fit(ref_genes[keep], ref_labels[keep])
                predicted = classifier.predict(query_genes)
                novel = truth == held
                for space, (ref_x, query_x) in spaces_here.items():
                    score, threshold = scores(ref_x[keep], ref_labels[keep], query_x, predicted, np.random.default_rng(seed))
                    unknown = score < threshold
                    rows.append({"direction": direction, "seed": seed, "held_out": held, "space": space,
                                 "n_held_out_query": int(novel.sum()),
                                 "auroc": round(float(roc_auc_score(novel, -score)), 4),
                                 "held_out_unknown": round(float(unknown[novel].mean()), 4),
                                 "others_unknown": round(float(unknown[~novel].mean()), 4)})  # fmt: skip
                    print(f"{direction} seed {seed} {held:10s} {space:24s} AUROC {rows[-1]['auroc']:.3f}  unknown: "
                          f"held out {rows[-1]['held_out_unknown']:.3f}, others {rows[-1]['others_unknown']:.3f}",
                          flush=True)  # fmt: skip
                print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
                write_report({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                              "rule": f"labels: logistic regression on z-scored genes; distance: mean to the {K} "
                                      f"nearest reference cells of the label; unknown below the {1 - QUANTILE:.0%} "
                                      "reference quantile of the score", "rows": rows}, out)  # fmt: skip


if __name__ == "__main__":
    main()
