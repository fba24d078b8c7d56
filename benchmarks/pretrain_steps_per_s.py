"""steps/s of pre-training on the shared cortex data (default model, batch 32, 3 epochs; epochs 2-3 timed,
validation included). Run it with PYTHONPATH pointing at the checkout to measure (old: git main before the
streaming loader; new: this branch): `PYTHONPATH=$PWD python benchmarks/pretrain_steps_per_s.py LABEL`."""

import json
import os
import sys
import tempfile
import time

from neurofm.io import read_h5ad
from neurofm.model import ModelConfig
from neurofm.tokenizer import TokenizerConfig
from neurofm.train import TrainConfig, pretrain

adata = read_h5ad("/work/wt/shared/data/subset_2523_210_Cerebral-cortex.screened.h5ad")
config = TrainConfig(epochs=3, batch_size=32, device="cpu", num_threads=2, progress=False)
t0 = time.perf_counter()
result = pretrain(adata, TokenizerConfig(), ModelConfig(), config, tempfile.mkdtemp())
total = time.perf_counter() - t0
rows = result.metrics
n_train = 1152 - int(1152 * 0.2)
steps = rows[-1].get("step", 3 * -(-n_train // 32)) / 3
per_epoch = [r["epoch_time_s"] for r in rows]
print(
    json.dumps(
        {
            "label": sys.argv[1],
            "steps_per_epoch": steps,
            "epoch_time_s": per_epoch,
            "steps_per_s_epochs_2_3": 2 * steps / sum(per_epoch[1:]),
            "total_s": total,
            "loadavg": os.getloadavg()[0],
            "val_loss": rows[-1]["val_loss"],
        }
    )
)
