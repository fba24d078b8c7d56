"""Pre-training throughput: the original project's configuration against neurofm's default.

Usage (from the repository root, CPU threads default to 2 like the project's machines)::

    python benchmarks/pretrain_throughput.py \
        [--data ../shared/data/subset_2523_210_Cerebral-cortex.screened.h5ad]
        [--threads 2] [--original-steps 2] [--steps 12]

Each row runs in its own subprocess so its peak RSS (``ru_maxrss``) is its own. Rows:

- ``original``: the original script's model — ``nn.TransformerEncoder`` (post-LN, ReLU), d_model 64, 4 heads,
  3 layers, PyTorch's default feed-forward width 2,048, dropout 0.1 — over all 2,000 genes (dense tokens),
  batch 16 (batch 64 is killed for memory at 24 GB), a few steps only: it is slow;
- ``neurofm default``: ``ModelConfig()`` / ``TrainConfig()`` as shipped, sampled genes per cell;
- ``neurofm batch 64``: the default at batch 64 (its peak RSS is the ≤ 2 GB target);
- ``embed``: ``neurofm.embedding.embed`` over every cell and every gene, default model (weights do not change
  the speed);
- GPU rows (bf16 autocast) only when CUDA is present; otherwise the table says they were skipped.

Prints a table and writes ``benchmarks/results/pretrain_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _bench import run_row, write_report  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "subset_2523_210_Cerebral-cortex.screened.h5ad"
RESULTS = ROOT / "benchmarks" / "results" / "pretrain_throughput.json"


def _original_model(n_genes: int, n_bins: int):
    """The original script's SimpleTransformer, reproduced for timing only (not used anywhere else)."""
    import torch
    from torch import nn

    class OriginalTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embed = nn.Embedding(n_bins + 1, 64)
            self.gene_embed = nn.Embedding(n_genes, 64)
            layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dropout=0.1, batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, num_layers=3)
            self.output = nn.Linear(64, n_bins)

        def forward(self, bins):
            genes = self.gene_embed(torch.arange(bins.shape[1], device=bins.device))
            return self.output(self.transformer(self.token_embed(bins) + genes[None]))

    return OriginalTransformer()


def _worker(spec: dict) -> dict:
    """Run one row in this process and return its measurements."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from neurofm.embedding import embed_matrix, random_encoder_like
    from neurofm.io import read_h5ad
    from neurofm.model import GeneEncoder, ModelConfig
    from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
    from neurofm.train import IGNORE_INDEX, TrainConfig, make_batch, resolve_device, split_cells

    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec.get("device", "cpu"))
    adata = read_h5ad(spec["data"])
    train_config = TrainConfig(
        batch_size=spec.get("batch_size") or TrainConfig().batch_size, device=str(device)
    )
    tokenizer_config = TokenizerConfig()
    train_idx, _ = split_cells(adata.n_obs, train_config.val_fraction, train_config.seed)
    tokenizer = ExpressionTokenizer(tokenizer_config).fit(adata, train_idx)
    n_genes, n_bins = adata.n_vars, tokenizer_config.n_bins
    model_config = ModelConfig(
        n_genes=n_genes, n_bins=n_bins, max_tokens=min(train_config.max_tokens_per_cell, n_genes)
    )
    torch.manual_seed(0)
    result = {"name": spec["name"], "device": str(device), "threads": spec["threads"]}

    if spec["kind"] == "embed":
        model = random_encoder_like(model_config, seed=0)
        embed_matrix(model, tokenizer, adata[:64], device=str(device), progress=False)  # warm-up
        started = time.perf_counter()
        embed_matrix(model, tokenizer, adata, device=str(device), progress=False)
        seconds = time.perf_counter() - started
        result.update(
            cells_per_s=adata.n_obs / seconds,
            tokens_per_s=adata.n_obs * n_genes / seconds,
            batch_size=256,
            tokens_per_cell=n_genes,
            seconds=seconds,
        )
    else:
        bins = torch.from_numpy(tokenizer.transform(adata)[train_idx]).to(device)
        generator = torch.Generator(device=device).manual_seed(0)
        batch_size = train_config.batch_size
        if spec["kind"] == "original":
            model, tokens = _original_model(n_genes, n_bins).to(device), n_genes
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-2)
            result["config"] = {
                "d_model": 64,
                "n_heads": 4,
                "n_layers": 3,
                "ffn_dim": 2048,
                "dropout": 0.1,
                "tokens_per_cell": tokens,
                "batch_size": batch_size,
            }
        else:
            model, tokens = GeneEncoder(model_config).to(device), model_config.max_tokens
            optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr)
            result["config"] = {**asdict(model_config), "tokens_per_cell": tokens, "batch_size": batch_size}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        model.train()

        def step(start: int) -> None:
            cells = bins[start : start + batch_size]
            batch = make_batch(cells, tokens, n_bins, train_config, generator)
            with autocast:
                if spec["kind"] == "original":  # dense: every gene in gene order
                    logits = model(batch.input_bins.gather(1, batch.gene_ids.argsort(1)))
                    labels = batch.labels.gather(1, batch.gene_ids.argsort(1))
                else:  # both heads, as pretrain trains them (masked-token + cell loss)
                    logits, cell_logits = model.pretrain_logits(
                        batch.gene_ids, batch.input_bins, batch.padding_mask
                    )
                    labels = batch.labels
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            if spec["kind"] != "original":
                loss = loss + train_config.cell_loss_weight * F.cross_entropy(
                    cell_logits.float().flatten(0, 1), batch.cell_labels.flatten(), ignore_index=IGNORE_INDEX
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step(0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(spec["steps"]):
            step(((i + 1) * batch_size) % max(1, bins.shape[0] - batch_size))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        cells = spec["steps"] * batch_size
        result.update(
            cells_per_s=cells / seconds,
            tokens_per_s=cells * tokens / seconds,
            batch_size=batch_size,
            tokens_per_cell=tokens,
            steps=spec["steps"],
            seconds=seconds,
        )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _run_row(spec: dict) -> dict:
    return run_row(__file__, spec, {"name": spec["name"]}, ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--original-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if not Path(args.data).is_file():
        print(f"data file {args.data} not found; pass --data PATH.h5ad", file=sys.stderr)
        return 2

    sys.path.insert(0, str(ROOT))
    import torch

    from neurofm.train import TrainConfig

    common = {"data": args.data, "threads": args.threads}
    default_batch = TrainConfig().batch_size
    specs = [
        {
            **common,
            "name": "original (dense 2000 tokens, FFN 2048), batch 16",
            "kind": "original",
            "batch_size": 16,
            "steps": args.original_steps,
        },
        {**common, "name": f"neurofm default, batch {default_batch}", "kind": "ours", "steps": args.steps},
    ]
    if default_batch != 64:
        specs.append(
            {
                **common,
                "name": "neurofm default, batch 64",
                "kind": "ours",
                "batch_size": 64,
                "steps": args.steps,
            }
        )
    specs.append({**common, "name": "neurofm embed (all genes), batch 256", "kind": "embed"})
    gpu = torch.cuda.is_available()
    if gpu:
        specs += [
            {
                **common,
                "name": "GPU bf16: original, batch 16",
                "kind": "original",
                "batch_size": 16,
                "steps": 10,
                "device": "cuda",
            },
            {
                **common,
                "name": f"GPU bf16: neurofm default, batch {default_batch}",
                "kind": "ours",
                "steps": 50,
                "device": "cuda",
            },
            {**common, "name": "GPU bf16: neurofm embed", "kind": "embed", "device": "cuda"},
        ]
    rows = []
    for spec in specs:
        print(f"running: {spec['name']} …", file=sys.stderr, flush=True)
        rows.append(_run_row(spec))
    original = rows[0].get("cells_per_s")
    ours = rows[1].get("cells_per_s")
    ratio = ours / original if original and ours else None
    print(f"\n{'configuration':52s} {'cells/s':>10s} {'tokens/s':>12s} {'peak RSS MB':>12s}")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:52s} failed: {row['error']}")
            continue
        print(
            f"{row['name']:52s} {row['cells_per_s']:10.1f} {row['tokens_per_s']:12.0f} "
            f"{row['peak_rss_mb']:12.0f}"
        )
    if ratio is not None:
        print(f"\nneurofm default / original train cells/s: {ratio:.0f}x (target >= 50x)")
    if not gpu:
        print("no CUDA GPU present: GPU rows skipped")
    report = {
        "rows": rows,
        "speedup_train_cells_per_s": ratio,
        "gpu_present": gpu,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "data": str(args.data),
        "command": "python benchmarks/pretrain_throughput.py " + " ".join(sys.argv[1:]),
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
