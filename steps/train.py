"""Pre-training steps: tokenize, then pretrain + track + register.

Both take the cell store's reference (``{"uri", "manifest_sha256", "n_cells", "n_genes"}``, from
``steps.data.convert_cells`` or ``store_cells``), never a whole AnnData: the cells stream from the store.

``pretrain_model`` logs one MLflow run per training (parameters, metrics per validation step, curves, CSV,
demo) and registers the best checkpoint as a new version of the registered model. When ZenML serves
it from the cache no new run is logged; its output then names the run and version it came from and
``run.py`` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from zenml import step

from neurofm.config import TrackingConfig
from neurofm.data.store import open_reference
from neurofm.mapping import ReferenceConfig
from neurofm.model import ModelConfig
from neurofm.pretrain_run import pretrain_and_register
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
from neurofm.train import TrainConfig, fit_training_tokenizer
from steps._cache import depends_on


@step(cache_policy=depends_on("tokenizer", "train", "train_config", "training_data", "stream", "data"))
def tokenize(
    cells: dict[str, Any], tokenizer: TokenizerConfig, train: TrainConfig, out_dir: str
) -> Annotated[Path, "tokenizer"]:
    """Fit the tokenizer (normalise, log1p, per-gene quantile bin edges) on the training rows only.

    ``cells`` is a cell store reference. The split is the one ``pretrain`` uses (the store's validation
    rows, seeded by ``train.seed``/``train.val_fraction``/``train.max_val_cells``); edges are fit on a
    seeded sample of at most 200,000 training cells (``neurofm.train.fit_training_tokenizer``); the
    tokenizer directory (JSON + npz, no pickle) is the step's artifact and is re-applied exactly by
    training, embedding and evaluation.
    """
    fitted = fit_training_tokenizer(open_reference(cells), tokenizer.validate(), train.validate())
    return fitted.save(Path(out_dir) / "tokenizer")


@step(
    cache_policy=depends_on(
        "tokenizer",
        "model",
        "model_config",
        "count_head",
        "pooling",
        "masking",
        "checkpoints",
        "train",
        "train_config",
        "training_data",
        "loop",
        "scoring",
        "count_phase",
        "distributed",
        "stream",
        "runtime",
        "data",
        "tracking",
        "plots",
        "mapping",
        "cell_features",
        "classify",
        "embedding",
        "pretrain_run",
    )
)
def pretrain_model(
    cells: dict[str, Any],
    tokenizer_dir: Path,
    model: ModelConfig,
    train: TrainConfig,
    tracking_config: TrackingConfig,
    out_dir: str,
    data_name: str,
    resume: bool = False,
    reference: ReferenceConfig | None = None,
) -> tuple[Annotated[Path, "model_dir"], Annotated[dict, "pretrain_summary"]]:
    """Train the masked-bin encoder on the cell store ``cells`` (a reference); log the run to MLflow
    (metrics by step, one point per validation) and register the run's model (``pretrain/model/``).

    With ``reference.label_columns`` the store's cells are embedded by the new model and their labels
    stored in the model directory as its reference (``neurofm.mapping``), before it is registered.

    Returns the run's model directory (``pretrain/model/``: weights + config + tokenizer) and a summary with the final
    metrics, the frequency-baseline perplexity, the MLflow run id and the registered version.
    """
    model_dir, summary = pretrain_and_register(
        open_reference(cells),
        ExpressionTokenizer.load(tokenizer_dir),
        model.validate(),
        train.validate(),
        out_dir,
        data_name,
        tracking_config,
        reference_config=reference,
        resume=resume,
    )
    return model_dir, summary  # a tuple literal: ZenML reads the step's outputs from its return statement
