"""Epoch time of pre-training with and without the count head on the shared cortex data (1 thread, batch 32,
2 epochs, validation included), interleaved A/B/A/B: `OMP_NUM_THREADS=1 PYTHONPATH=$PWD python
benchmarks/count_head_step_time.py`. Prints one JSON line per run."""

import json
import os
import tempfile
from pathlib import Path

from neurofm.io import read_h5ad
from neurofm.model import ModelConfig
from neurofm.tokenizer import TokenizerConfig
from neurofm.train import TrainConfig, pretrain

adata = read_h5ad(
    str(
        Path(__file__).resolve().parents[2]
        / "shared"
        / "data"
        / "subset_2523_210_Cerebral-cortex.screened.h5ad"
    )
)
out = []
for latent in (0, 16, 0, 16):
    config = TrainConfig(epochs=2, batch_size=32, device="cpu", num_threads=1, progress=False)
    result = pretrain(adata, TokenizerConfig(), ModelConfig(latent_dim=latent), config, tempfile.mkdtemp())
    rows = result.metrics
    out.append(
        {
            "latent_dim": latent,
            "epoch_time_s": [round(r["epoch_time_s"], 2) for r in rows],
            "steps": rows[-1]["step"],
            "load": os.getloadavg()[0],
        }
    )
    print(json.dumps(out[-1]), flush=True)

(Path(__file__).resolve().parent / "results" / "count_head_step_time.json").write_text(
    json.dumps(out, indent=1) + "\n"
)
