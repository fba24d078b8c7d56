"""neurofm's one entry point: run a pipeline on the built-in data or yours.

    python run.py                                   # full: prepare → pretrain → evaluate, built-in data
    python run.py --pipeline prepare                # data preparation only
    python run.py --pipeline pretrain --data cells.h5ad
    python run.py --pipeline pretrain --data a.h5ad --data b.h5ad:batch=donor   # data.files: one store
    python run.py --pipeline evaluate --model models:/neurofm-encoder@champion --label-col subtype
    python run.py --pipeline tune --trials 20

Each pipeline reads ``configs/<pipeline>.yaml`` unless ``--config`` names another file; ``--set
section.key=value`` overrides single values. Errors a user can cause end in one line on stderr and
exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent
PIPELINES = ("prepare", "pretrain", "evaluate", "full", "tune", "map")

# Environment first: these must be set before zenml/mlflow are imported anywhere.
os.environ.setdefault("ZENML_CUSTOM_SOURCE_ROOT", str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from neurofm.cpu import set_thread_policy  # noqa: E402

set_thread_policy()  # before torch is imported: on a busy machine waiting threads sleep, never spin

from neurofm.errors import NeurofmError  # noqa: E402
from neurofm.runs import (  # noqa: E402
    check_labels_early,
    check_map_early,
    check_model_early,
    resolve_inputs,
)

if TYPE_CHECKING:
    from neurofm.config import RunConfig

log = logging.getLogger("neurofm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Run a neurofm pipeline (ZenML, tracked in MLflow).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="pipelines:\n"
        "  prepare   load → subset → region filter → dedupe → crop (+ summary, barcode check, atlas plot)\n"
        "  pretrain  prepare → tokenize → pretrain (checkpoints, MLflow run, registered model)\n"
        "  evaluate  embed → probe/cluster/plots beside PCA, scVI and random-weights baselines → report\n"
        "  full      pretrain then evaluate (cached steps are reused)\n"
        "  tune      Optuna study over pre-training hyper-parameters\n"
        "  map       a query mapped onto a model's reference: labels transferred, unknown, scored (--label-col)\n",
    )
    parser.add_argument(
        "--pipeline", choices=PIPELINES, default="full", help="which pipeline (default: full)"
    )
    parser.add_argument(
        "--config", type=Path, help="YAML run configuration (default: configs/<pipeline>.yaml)"
    )
    parser.add_argument(
        "--data",
        action="append",
        type=Path,
        help=".h5ad of raw counts (default: the built-in synthetic atlas); repeat it for several files "
        "(data.files, each FILE or FILE:batch=COL,genes=COL)",
    )
    parser.add_argument("--metadata", type=Path, help="Allen-style cell_metadata.csv for the cluster join")
    parser.add_argument("--out", type=Path, help="output directory (default: data.out_dir of the config)")
    parser.add_argument(
        "--no-cache", action="store_true", help="run every step again, ignoring ZenML's cache"
    )
    parser.add_argument(
        "--model", help="evaluate: model directory or MLflow URI (default: newest registered)"
    )
    parser.add_argument("--label-col", help="evaluate: obs column with the labels (clears the label mapping)")
    parser.add_argument("--group-col", help="evaluate: obs column of batches kept apart by the probe split")
    parser.add_argument(
        "--gene-col",
        help="evaluate: var column naming the data's genes (e.g. gene_symbol); default var_names",
    )
    parser.add_argument(
        "--reference-labels",
        metavar="COL[,COL…]",
        help="pretrain: store these obs columns' labels with the model as its reference (for map)",
    )
    parser.add_argument(
        "--batch-col",
        help="pretrain: obs column of each cell's batch, a covariate of the count head (train.batch_key; "
        "'dataset' for several files); map: the query's batches (scArches' batch key)",
    )
    parser.add_argument(
        "--reference-data", type=Path, help="map: the reference cells' .h5ad, for the baselines"
    )
    parser.add_argument("--resume", action="store_true", help="pretrain: continue an interrupted run")
    parser.add_argument("--trials", type=int, help="tune: number of Optuna trials")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """The validated configuration: YAML file, then ``--set``, then the dedicated flags."""
    from neurofm.config import load_config

    config_path = args.config or ROOT / "configs" / f"{args.pipeline}.yaml"
    flags = {
        "data.path": None if args.data is None or len(args.data) > 1 else str(args.data[0]),
        "data.files": None if args.data is None or len(args.data) < 2 else [str(path) for path in args.data],
        "data.metadata_csv": None if args.metadata is None else str(args.metadata),
        "data.out_dir": None if args.out is None else str(args.out),
        "evaluate.model": args.model,
        "evaluate.label_column": args.label_col,
        "evaluate.group_column": args.group_col,
        "evaluate.gene_column": args.gene_col,
        "tune.n_trials": args.trials,
    }
    if args.pipeline == "pretrain" and args.batch_col is not None:
        flags["train.batch_key"] = args.batch_col
    if args.reference_labels is not None:
        flags["reference.label_columns"] = [c.strip() for c in args.reference_labels.split(",") if c.strip()]
    if args.pipeline == "map":  # the query's flags
        flags.update({"map.model": args.model, "map.query_label_column": args.label_col,
                      "map.batch_column": args.batch_col, "map.gene_column": args.gene_col,
                      "evaluate.model": None, "evaluate.label_column": None, "evaluate.gene_column": None,
                      "map.reference_data": None if args.reference_data is None else str(args.reference_data)})  # fmt: skip
    values = {key: value for key, value in flags.items() if value is not None}
    if args.label_col is not None and args.pipeline != "map":
        values.update({"evaluate.label_mapping": None, "reports.value_counts_column": args.label_col})
    config = load_config(config_path, args.set, values)
    config.data.out_dir = str(Path(config.data.out_dir).resolve())
    return config


def _initialise_stores(config: RunConfig, tracking: bool) -> None:
    """Create or migrate the ZenML (and MLflow) stores under a file lock.

    Two runs started at once on fresh stores would otherwise race on the first database migration.
    """
    import fcntl

    from zenml.client import Client
    from zenml.utils.io_utils import get_global_config_directory

    lock_dir = Path(get_global_config_directory())
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".neurofm-init.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        Client().active_stack_model  # noqa: B018  (creates/migrates the store)
        if tracking:
            from mlflow.tracking import MlflowClient

            from neurofm import tracking as neurofm_tracking

            neurofm_tracking.configure(config.tracking.tracking_uri)
            MlflowClient().search_experiments(max_results=1)


def run_pipeline(args: argparse.Namespace, config: RunConfig) -> int:
    """Run the chosen pipeline and print its summary."""
    from neurofm import io

    io.ensure_writable_dir(config.data.out_dir)
    if config.data.files is not None and args.pipeline != "pretrain":
        raise NeurofmError(
            f"{len(config.data.files)} data files: only --pipeline pretrain takes several files (one "
            f"store of their union of genes); {args.pipeline} does not yet — run it on one file's --data"
        )
    if args.pipeline == "tune":
        from pipelines.tune import tune_from_config

        tune_from_config(config, resume=True)
        return 0
    if args.pipeline == "map":
        check_map_early(config)
    inputs = resolve_inputs(config)
    if args.pipeline in ("evaluate", "full"):
        check_labels_early(config, inputs)
    if args.pipeline == "evaluate":
        check_model_early(config, inputs)
    _initialise_stores(config, tracking=args.pipeline != "prepare")
    from pipelines import get_pipeline

    pipeline_function = get_pipeline(args.pipeline)
    options: dict[str, Any] = {"enable_cache": not args.no_cache, "execution_mode": "fail_fast"}
    run = pipeline_function.with_options(**options)(config=config, inputs=inputs, resume=args.resume)
    print(summarize_run(args.pipeline, run, config))
    return 0


class _HideUserErrorTracebacks(logging.Filter):
    """Drop the traceback ZenML logs for a step that failed with a NeurofmError (unless --debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], NeurofmError):
            record.exc_info, record.exc_text = None, None
        return True


def _configure_logging(debug: bool) -> None:
    """Use ZenML's console handler on the root logger for neurofm's messages too (one line each)."""
    import zenml  # noqa: F401  (installs ZenML's handlers on the root logger)

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in root.handlers:
        if not debug and not any(isinstance(f, _HideUserErrorTracebacks) for f in handler.filters):
            handler.addFilter(_HideUserErrorTracebacks())


def evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """The evaluation's headline metrics, each beside the strongest baseline (controls excluded) and the
    model's margin, as the report gives them; the random-weights control's value follows."""
    strongest = evaluation.get("strongest") or {}
    metrics = evaluation["metrics"]
    lines = ["  evaluation: the model against the strongest baseline per metric (every method: report)"]
    for metric, entry in strongest.items():
        control = metrics.get(f"random/{metric}")
        lines.append(
            f"    {entry['title']:<23} model {entry['model_value']:.3f}   {entry['baseline']} "
            f"{entry['baseline_value']:.3f}   margin {entry['margin']:+.3f}"
            + ("" if control is None else f"   (random weights {control:.3f})")
        )
    return lines


def mapping_lines(mapped: dict[str, Any]) -> list[str]:
    """What the map pipeline produced: the mapped file, labels and unknown share per column, and (when
    scored) the transfer beside the strongest baseline."""
    record, metrics = mapped["record"], mapped["metrics"]
    lines = [f"  mapped: {mapped['mapped_file']} ({record['n_cells']} cells in {record['seconds']:.1f} s)"]
    for column in record["label_columns"]:
        lines.append(f"    obs['neurofm_{column}']: {len(record['counts'][column])} labels, "
                     f"unknown {record['unknown_share'][column]:.1%}")  # fmt: skip
    for metric, title in (
        ("transfer_f1", "transfer macro-F1"),
        ("query_ari_optimised", "query ARI (optimised)"),
    ):
        if f"model/{metric}" in metrics:
            line = f"    {title:<23} model {metrics[f'model/{metric}']:.3f}"
            if f"strongest/{metric}" in metrics:
                best = max((m for m in metrics if m.endswith(f"/{metric}") and m.split("/")[0] not in
                            ("model", "strongest", "margin")), key=metrics.get)  # fmt: skip
                line += (f"   {best.split('/')[0]} {metrics[f'strongest/{metric}']:.3f}"
                         f"   margin {metrics[f'margin/{metric}']:+.3f}")  # fmt: skip
            lines.append(line)
    if mapped.get("report"):
        lines.append(f"  report: {mapped['report']}")
    return lines


def summarize_run(pipeline: str, run: Any, config: RunConfig) -> str:
    """The closing summary printed after a run: what was produced, where, and against what baseline."""
    from pipelines import cached_steps, step_outputs

    outputs = step_outputs(run)
    cached = cached_steps(run)
    from neurofm.runs import run_notes

    lines = ["", f"neurofm {pipeline}: run {run.name} {run.status}"]
    if pipeline != "prepare":
        inputs = {"default_data": config.data.builtin}
        lines.extend(
            f"  note: {note}" for note in run_notes(config, inputs, pipeline in ("pretrain", "full"))
        )
    if cached:
        lines.append(f"  served from cache: {', '.join(cached)}")
    prepared = outputs.get("save_prepared", {}).get("prepared_h5ad")
    if prepared:
        lines.append(f"  prepared data: {prepared}")
    summary_path = Path(config.data.out_dir) / "dataset_summary.json"
    if summary_path.exists():
        import json

        summary = json.loads(summary_path.read_text())
        lines.append(f"  cells × genes: {summary.get('n_cells')} × {summary.get('n_genes')}")
        if summary.get("value_counts"):
            lines.append(f"  {config.reports.value_counts_column}: {summary['value_counts']}")
    pretrain = outputs.get("pretrain_model", {}).get("pretrain_summary")
    if pretrain:
        lines.append(
            f"  pretrain: val perplexity {pretrain['best_val_perplexity']:.3f} vs per-gene frequency baseline "
            f"{pretrain['baseline_perplexity']:.3f} (ratio {pretrain['perplexity_ratio']:.3f}), masked accuracy "
            f"{pretrain['best_val_masked_accuracy']:.3f} vs {pretrain['baseline_masked_accuracy']:.3f}"
        )
        lines.append(
            f"  model: {pretrain['model_uri'] or pretrain['model_dir']} (MLflow run {pretrain['mlflow_run_id']})"
        )
        if "pretrain_model" in cached:
            lines.append(
                "  note: pretrain_model came from ZenML's cache, so no new MLflow run or model version was "
                "logged; the model above is the cached one (use --no-cache to train again)"
            )
    evaluation = outputs.get("track_evaluation", {}).get("evaluation_summary")
    if evaluation:
        lines.extend(evaluation_lines(evaluation))
        lines.append(f"  promotion: {evaluation['promotion']}")
        lines.append(f"  report: {evaluation['report']}")
    mapped = outputs.get("track_mapping", {}).get("map_summary")
    if mapped:
        lines.extend(mapping_lines(mapped))
    tracking_uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if pretrain or evaluation or mapped:
        from neurofm.tracking import default_tracking_uri

        lines.append(f"  MLflow UI: mlflow ui --backend-store-uri {tracking_uri or default_tracking_uri()}")
    lines.append(f"  outputs: {config.data.out_dir}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _configure_logging(args.debug)
        config = load_run_config(args)
        return run_pipeline(args, config)
    except NeurofmError as error:
        if args.debug:
            raise
        print(f"neurofm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurofm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
