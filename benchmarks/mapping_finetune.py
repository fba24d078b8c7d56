"""Issue 30 item 1 (ii): the encoder fine-tuned on the reference labels, as scGPT's and Geneformer's
cell-type annotation does — does it carry more than the genes?

For each (direction, seed) model of ``benchmarks/mapping_heads.py`` (``--models``): the transformer is run
over every gene of a cell (all 141 fit in its context), its last-layer states mean-pooled, and one linear
classifier per label level on top; encoder and classifiers are trained together on the reference donor's
labels (cross-entropy summed over both levels; AdamW, ``--lr`` for the encoder, 10× for the classifiers,
batches of 64) for ``--epochs`` epochs on a seeded sample of ``--max-cells`` reference cells (time), keeping the epoch with the best macro-F1 on a held-out 10 % of the
*reference* cells (the query is never seen). Rows, scored on every query cell like mapping_heads.py's:

- ``encoder fine-tuned on labels``: the fine-tuned classifiers' own predictions;
- ``head mlp 256 on genes+fine-tuned context``: the reference's label head (``HeadConfig``, hidden 256)
  on the genes beside the fine-tuned pooled states — the ablation row beside mapping_heads.py's
  ``genes+context``.

    python benchmarks/mapping_finetune.py --models /tmp/bench/models --seeds 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402
from benchmarks.mapping_heads import LEVELS, scores  # noqa: E402
from benchmarks.reference_mapping import DONORS  # noqa: E402


def all_bins(tokenizer, adata):
    import torch

    from neurofm.genes import match_adata

    match = match_adata(adata, tokenizer.gene_ids, tokenizer.gene_symbols)
    parts = [tokenizer.transform(adata[s : s + 4096], source=match.source) for s in range(0, adata.n_obs, 4096)]
    return torch.from_numpy(np.concatenate(parts)).long()


def finetune(model, tokenizer, reference_cells, query_cells, epochs: int, lr: float, seed: int,
             max_cells: int | None = None):  # fmt: skip
    """(query predictions per level, fine-tuned pooled states of reference and query, summary); the
    encoder trains on at most ``max_cells`` reference cells (a seeded sample of the non-held-out ones)."""
    import torch
    from sklearn.metrics import f1_score

    from neurofm.classify import held_out_share

    torch.manual_seed(seed)
    genes = torch.arange(tokenizer.n_genes)
    ref_bins, query_bins = all_bins(tokenizer, reference_cells), all_bins(tokenizer, query_cells)
    classes, codes = {}, {}
    for level in LEVELS:
        classes[level], inverse = np.unique(reference_cells.obs[level].astype(str), return_inverse=True)
        codes[level] = torch.from_numpy(inverse)
    held = held_out_share(codes[LEVELS[0]].numpy(), 0.1, seed)
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    if max_cells is not None and len(train_rows) > max_cells:
        train_rows = np.sort(np.random.default_rng(seed).choice(train_rows, max_cells, replace=False))
    heads = torch.nn.ModuleDict({level.replace(".", "_"): torch.nn.Linear(model.config.d_model, len(classes[level]))
                                 for level in LEVELS})  # fmt: skip
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr": lr},
                                   {"params": heads.parameters(), "lr": 10 * lr}], weight_decay=0.01)  # fmt: skip

    def pooled(bins, train: bool):
        model.train(train)
        return model.encode(genes.expand(len(bins), -1), bins).mean(1)

    def states(bins):
        with torch.no_grad():
            return torch.cat([pooled(bins[s : s + 512], False) for s in range(0, len(bins), 512)])

    best, best_f1, curve = None, -1.0, []
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.from_numpy(train_rows)[torch.randperm(len(train_rows), generator=generator)]
        for part in order.split(64):
            optimizer.zero_grad()
            hidden = pooled(ref_bins[part], True)
            loss = sum(torch.nn.functional.cross_entropy(heads[level.replace(".", "_")](hidden), codes[level][part])
                       for level in LEVELS)  # fmt: skip
            loss.backward()
            optimizer.step()
        held_states = states(ref_bins[held_rows])
        f1 = float(np.mean([f1_score(codes[level][held_rows], heads[level.replace(".", "_")](held_states).argmax(1),
                                     average="macro") for level in LEVELS]))  # fmt: skip
        curve.append(round(f1, 4))
        if f1 > best_f1:
            best_f1 = f1
            best = ({k: v.clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in heads.state_dict().items()})
    model.load_state_dict(best[0])
    heads.load_state_dict(best[1])
    query_states, ref_states = states(query_bins), states(ref_bins)
    with torch.no_grad():
        predicted = {level: classes[level][heads[level.replace(".", "_")](query_states).argmax(1).numpy()] for level in LEVELS}
    return predicted, ref_states.numpy(), query_states.numpy(), {"held_out_f1_by_epoch": curve}


def main(argv: list[str] | None = None) -> None:
    import json

    import anndata as ad
    import torch

    from neurofm.cell_features import reference_features
    from neurofm.classify import HeadConfig, fit_head, head_features
    from neurofm.model import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-cells", type=int, default=10_000, help="a seeded sample of the reference trains it")
    parser.add_argument("--directions", nargs="+", default=["donor1->donor2", "donor2->donor1"])
    parser.add_argument("--out", default="benchmarks/results/mapping_finetune.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["direction"], r["seed"], r["method"]) for r in rows}

    def save(row: dict) -> None:
        rows.append(row)
        write_report({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                      "settings": {"epochs": args.epochs, "lr": args.lr, "batch_size": 64,
                      "train_cells": f"a seeded sample of {args.max_cells} reference cells (the held-out 10 % aside)"}, "rows": rows}, out)  # fmt: skip
        print(f"{row['direction']:16s} seed {row['seed']} {row['method']:40s} "
              + "  ".join(f"{level} F1 {row[level]['f1']:.3f}" for level in LEVELS), flush=True)

    for direction in args.directions:
        ref, query = direction.split("->")
        reference_cells, query_cells = ad.read_h5ad(DONORS[ref]), ad.read_h5ad(DONORS[query])
        for seed in args.seeds:
            marker = Path(args.models) / f"{ref}_seed{seed}" / "done"
            if not marker.is_file() or (direction, seed, "encoder fine-tuned on labels") in done:
                continue
            model, tokenizer = load_pretrained(Path(marker.read_text().strip()))
            _, ref_genes = reference_features(model, tokenizer, reference_cells, progress=False)
            _, query_genes = reference_features(model, tokenizer, query_cells, progress=False)
            started = time.perf_counter()
            predicted, ref_states, query_states, summary = finetune(
                model, tokenizer, reference_cells, query_cells, args.epochs, args.lr, seed, args.max_cells
            )
            seconds = round(time.perf_counter() - started, 1)
            save({"direction": direction, "seed": seed, "method": "encoder fine-tuned on labels", "seconds": seconds,
                  **summary, **{level: scores(query_cells.obs[level], predicted[level]) for level in LEVELS}})  # fmt: skip
            row = {"direction": direction, "seed": seed, "method": "head mlp 256 on genes+fine-tuned context"}
            for level in LEVELS:
                head = fit_head(reference_cells.obs[level].astype(str).to_numpy(), ref_states, ref_genes,
                                HeadConfig(features="genes+embedding", seed=seed))  # fmt: skip
                row[level] = scores(query_cells.obs[level],
                                    head.predict(head_features("genes+embedding", query_genes, query_states)))  # fmt: skip
            save(row)


if __name__ == "__main__":
    main()
