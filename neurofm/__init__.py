"""neurofm: a neuron-type foundation model for single-cell RNA-seq.

The science lives here, importable and testable without ZenML:

- :mod:`neurofm.data` — atlas files, subset, region, dedupe, crop, the synthetic atlas generator
- :mod:`neurofm.tokenizer` — normalisation + per-gene expression binning
- :mod:`neurofm.model` — the one model definition
- :mod:`neurofm.train` — masking, the training loop, checkpoints, resume
- :mod:`neurofm.embed` — frozen-model embeddings into ``obsm['X_neurofm']``
- :mod:`neurofm.evaluate` — probe, clustering, baselines, label efficiency
- :mod:`neurofm.plots` — every figure
- :mod:`neurofm.tracking` — MLflow calls in one place
"""

from neurofm.errors import NeurofmError

__version__ = "0.1.0"
__all__ = ["NeurofmError", "__version__"]
