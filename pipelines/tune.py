"""The tuning entry: the data the other pipelines train on → an Optuna study (``neurofm.tune``).

Not a ZenML pipeline: a study is one long, resumable loop whose state lives in Optuna's storage and
in MLflow, so ``run.py --pipeline tune`` calls :func:`tune_from_config` directly. Only the default data goes
through ZenML — the prepare pipeline (cached) when ``<data.out_dir>/prepared.h5ad`` is not there yet.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import anndata as ad

from neurofm import tune
from neurofm.config import RunConfig
from neurofm.data.atlas import load_counts
from neurofm.runs import resolve_inputs

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain.yaml"


def load_tune_data(config: RunConfig) -> ad.AnnData:
    """Raw counts to tune on: ``data.path`` when set, else the prepared default data (prepared once)."""
    data = config.data
    if data.path is not None:
        return load_counts(data.path, layer=data.layer)
    prepared = Path(data.out_dir) / "prepared.h5ad"
    if not prepared.is_file():
        from pipelines.prepare import prepare

        log.info("no %s yet: running the prepare pipeline (cached)", prepared)
        prepare.with_options(enable_cache=True)(config=config, inputs=resolve_inputs(config))
    return load_counts(prepared)


def best_config_path(config: RunConfig) -> Path:
    """``tune.best_config_out``, relative paths taken from the project root."""
    path = Path(config.tune.best_config_out)
    return path if path.is_absolute() else ROOT / path


def tune_from_config(config: RunConfig, resume: bool = True) -> tune.StudyResult:
    """Run (or resume) the study named by ``config['tune']`` and print its summary.

    Trials and the journal land in ``<data.out_dir>/tune/<study_name>/``; the best configuration in
    ``tune.best_config_out`` (extending ``configs/pretrain.yaml``).
    """
    adata = load_tune_data(config)
    settings = config.tune
    out_dir = Path(config.data.out_dir) / "tune" / settings.study_name
    best_out = best_config_path(config) if settings.best_config_out else None
    result = tune.run_study(
        adata,
        config,
        settings,
        out_dir,
        resume=resume,
        best_config_out=best_out,
        extends=os.path.relpath(PRETRAIN_CONFIG, best_out.parent) if best_out else None,
    )
    print(summarize(result, out_dir))
    return result


def summarize(result: tune.StudyResult, out_dir: Path) -> str:
    """The closing lines printed after a study."""
    metrics = result.best_metrics
    lines = [
        "",
        f"neurofm tune: study {result.study_name!r} — {result.n_trials} trials finished "
        f"({result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed), "
        f"{result.n_run_now} run now",
        f"  best trial {result.best_trial}: {result.objective} {result.best_value:.4f}",
        f"  params: {', '.join(f'{k}={_short(v)}' for k, v in result.best_params.items())}",
    ]
    if "best_val_perplexity" in metrics:
        lines.append(
            f"  val perplexity {metrics['best_val_perplexity']:.3f} vs frequency baseline "
            f"{metrics['baseline_perplexity']:.3f} (ratio {metrics['perplexity_ratio']:.3f})"
        )
    base = result.base_trial
    if base is not None and base["number"] != result.best_trial:
        value = f"{base['value']:.4f}" if base["value"] is not None else "pruned"
        perplexity = base.get("best_val_perplexity")
        lines.append(
            f"  base configuration (trial {base['number']}): {result.objective} {value}"
            + (f", val perplexity {perplexity:.3f}" if perplexity is not None else "")
        )
    elif base is not None:
        lines.append("  the base configuration (trial 0) is the best so far")
    if result.best_config_path is not None:
        lines.append(f"  best config: {result.best_config_path}")
        lines.append(f"    python run.py --pipeline pretrain --config {result.best_config_path}")
    lines.append(f"  study storage: {result.storage} (MLflow run {result.mlflow_run_id})")
    lines.append(f"  outputs: {out_dir}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
