"""The query donor's own structure in the model's embedding (issue 30 item 6: query ARI beside the heads).

For each (direction, seed) model of ``benchmarks/mapping_heads.py`` (``--models``), the whole query donor is
embedded (``neurofm.embed``'s embedding, what ``neurofm map`` writes to ``obsm['X_neurofm']``) and clustered
by the evaluation's protocol (``neurofm.evaluate.cluster.cluster_embedding``: 15-NN graph, Leiden): the
cluster-optimised ARI / NMI against the query's 18 subclasses (best over resolutions 0.1–2.0) and the ARI at
resolution 1 (mean of Leiden seeds 0–2). Beside it, once per direction, PCA fit on the reference donor with
the query projected (``pca_reference_projection``: scanpy's recipe, 50 components), by the same protocol;
with ``--baselines``, the spaces of the map pipeline's baselines that have one, fit on the reference donor
only: ``scvi`` (the scVI reference's latent, the query embedded without adaptation:
``neurofm.evaluate.baselines.scvi_reference`` / ``scvi_baseline_latent``) and ``symphony`` (the query mapped
into Symphony's reference: ``neurofm.evaluate.label_baselines.symphony_labels``), seed 0.

    python benchmarks/mapping_query_ari.py --models /tmp/bench/models --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402
from benchmarks.reference_mapping import DONORS  # noqa: E402

LEVEL = "subclass_approx"


def clustered(x, labels) -> dict:
    from neurofm.evaluate.cluster import cluster_embedding

    m = cluster_embedding(x, labels).metrics()
    return {key: round(float(m[key]), 4) for key in ("ari_optimised", "nmi_optimised", "ari_res1_mean", "ari_res1_sd")}


def baseline_space(name: str, reference, query):
    """The query in baseline ``name``'s own space, fit on the reference donor only (seed 0)."""
    import torch

    from neurofm.evaluate.baselines import scvi_baseline_latent, scvi_reference, shared_gene_views
    from neurofm.evaluate.label_baselines import symphony_labels

    torch.set_num_threads(1)
    ref_view, query_view = shared_gene_views(reference, query)
    if name == "scvi":
        return scvi_baseline_latent(scvi_reference(ref_view, seed=0), query_view)[1]
    return symphony_labels(ref_view, query_view, LEVEL, seed=0).query_embedding


def main(argv: list[str] | None = None) -> None:
    import anndata as ad

    from neurofm.embedding import embed_matrix
    from neurofm.evaluate.baselines import pca_reference_projection
    from neurofm.genes import match_adata
    from neurofm.model import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--directions", nargs="+", default=["donor1->donor2", "donor2->donor1"])
    parser.add_argument("--baselines", nargs="*", default=[], choices=["scvi", "symphony"])
    parser.add_argument("--out", default="benchmarks/results/mapping_query_ari.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["direction"], r["seed"], r["method"]) for r in rows}

    def save(row: dict) -> None:
        rows.append(row)
        write_report({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "labels": LEVEL, "rows": rows}, out)
        print(f"{row['direction']:16s} seed {row['seed']} {row['method']:28s} ARI optimised {row['ari_optimised']:.3f} "
              f"NMI {row['nmi_optimised']:.3f} ARI res 1 {row['ari_res1_mean']:.3f}", flush=True)  # fmt: skip

    for direction in args.directions:
        ref, query = direction.split("->")
        query_cells = ad.read_h5ad(DONORS[query])
        labels = query_cells.obs[LEVEL].astype(str).to_numpy()
        if (direction, 0, "PCA fit on the reference") not in done:
            _, projected = pca_reference_projection(ad.read_h5ad(DONORS[ref]), query_cells)
            save({"direction": direction, "seed": 0, "method": "PCA fit on the reference", **clustered(projected, labels)})
        for name in args.baselines:
            method = {"scvi": "scVI latent (no adaptation)", "symphony": "Symphony's mapped space"}[name]
            if (direction, 0, method) not in done:
                save({"direction": direction, "seed": 0, "method": method,
                      **clustered(baseline_space(name, ad.read_h5ad(DONORS[ref]), query_cells), labels)})  # fmt: skip
        for seed in args.seeds:
            marker = Path(args.models) / f"{ref}_seed{seed}" / "done"
            if not marker.is_file() or (direction, seed, "neurofm embedding") in done:
                continue
            model, tokenizer = load_pretrained(Path(marker.read_text().strip()))
            match = match_adata(query_cells, tokenizer.gene_ids, tokenizer.gene_symbols)
            x = embed_matrix(model, tokenizer, query_cells, match=match, progress=False, device="cpu")
            save({"direction": direction, "seed": seed, "method": "neurofm embedding", **clustered(x, labels)})


if __name__ == "__main__":
    main()
