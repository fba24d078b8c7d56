"""Tuning: search-space parsing, a small study that completes, resumes and writes the best config,
pruning, a killed trial redone on resume, nested MLflow runs, the probe-AUC objective."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from neurofm.config import RunConfig, load_config, validate
from neurofm.data.synthetic import make_synthetic_counts
from neurofm.errors import NeurofmError
from neurofm.tune import ParamSpec, parse_space, run_study

PRETRAIN_YAML = Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml"
SPACE = {
    "train.lr": {"type": "float", "low": "1e-3", "high": 1.0e-2, "log": True},
    "model.n_layers": {"type": "int", "low": 1, "high": 2},
    "model.d_model": {"type": "categorical", "choices": [16, 24]},
}


@pytest.fixture(scope="module")
def counts():
    return make_synthetic_counts(n_cells=300, n_genes=120, seed=0)


def base_config(experiment: str) -> RunConfig:
    """A tiny model and short training so that a trial takes about a second."""
    return validate(
        {
            "tokenizer": {"n_bins": 8},
            "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "ffn_dim": 32},
            "train": {
                "epochs": 5,
                "batch_size": 64,
                "lr": 3e-3,
                "warmup_steps": 2,
                "max_tokens_per_cell": 24,
                "val_draws": 1,
                "device": "cpu",
                "num_threads": 1,
                "progress": False,
                "count_head_epochs": 3,  # the count head's own phase, short (scVI's rule: up to 400 epochs)
            },
            "tracking": {"experiment": experiment},
            "evaluate": {"label_column": "class", "label_mapping": None, "probe": {"n_splits": 0}},
        }
    )


def tune_config(**overrides) -> dict:
    settings = {"space": SPACE, "epochs": 2, "seed": 0, "study_name": "test-study", "best_config_out": None}
    return {**settings, **overrides}


def relative_pretrain_yaml(directory: Path) -> str:
    return os.path.relpath(PRETRAIN_YAML, directory)


# ---------------------------------------------------------------------------------------------- space
def test_parse_space_reads_float_int_and_categorical_specs():
    specs = parse_space(
        {**SPACE, "train.mask_ratio": {"type": "float", "low": 0.1, "high": 0.3, "step": 0.05}}
    )
    by_name = {spec.name: spec for spec in specs}
    assert by_name["train.lr"] == ParamSpec("train.lr", "float", low=1e-3, high=1e-2, log=True)
    assert by_name["model.n_layers"].type == "int" and by_name["model.n_layers"].high == 2
    assert by_name["model.d_model"].choices == (16, 24)
    assert by_name["train.mask_ratio"].step == 0.05
    assert by_name["model.d_model"].contains(16) and not by_name["model.d_model"].contains(32)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "tune.space is empty"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.2}}, "section.key"),
        ({"optimizer.lr": {"type": "float", "low": 0.1, "high": 0.2}}, "section one of"),
        ({"train.learning_rate": {"type": "float", "low": 0.1, "high": 0.2}}, "has no key 'learning_rate'"),
        ({"model.n_bins": {"type": "int", "low": 5, "high": 20}}, "tune tokenizer.n_bins instead"),
        ({"train.epochs": {"type": "int", "low": 1, "high": 3}}, "set tune.epochs"),
        ({"train.lr": {"low": 0.1, "high": 0.2}}, "needs 'type'"),
        ({"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "needs 'type'"),
        ({"train.lr": {"type": "float", "low": 0.1, "high": 0.2, "base": 2}}, "unknown key"),
        ({"model.d_model": {"type": "float", "low": 16, "high": 64}}, "integer setting"),
        ({"model.n_layers": {"type": "int", "low": 1.5, "high": 4}}, "must be an integer"),
        ({"train.lr": {"type": "float", "low": "fast", "high": 0.2}}, "must be a number"),
        ({"train.lr": {"type": "float", "low": 0.2, "high": 0.1}}, "must be below high"),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log scale needs low > 0"),
        ({"train.mask_ratio": {"type": "float", "low": 0.1, "high": 1.5}}, "mask_ratio must be in"),
        ({"model.n_heads": {"type": "categorical", "choices": []}}, "non-empty list"),
        ({"model.n_layers": {"type": "categorical", "choices": [2, 0]}}, "n_layers must be in"),
        ({"tokenizer.binning": {"type": "categorical", "choices": ["quantile", "kmeans"]}}, "is unknown"),
        ({"tokenizer.binning": {"type": "int", "low": 1, "high": 2}}, "not numeric"),
    ],
)
def test_parse_space_refuses_bad_specs_in_one_line(space, message):
    with pytest.raises(NeurofmError, match=message) as caught:
        parse_space(space)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------- study
@pytest.fixture(scope="module")
def resumed_study(counts, tmp_path_factory):
    """2 trials, then the same study again with n_trials=3 (as after an interruption)."""
    out_dir = tmp_path_factory.mktemp("study")
    best_out = out_dir / "configs" / "pretrain.best.yaml"
    config = base_config("tune-resume")
    kwargs = dict(best_config_out=best_out, extends=relative_pretrain_yaml(best_out.parent))
    first = run_study(counts, config, tune_config(), out_dir, n_trials=2, **kwargs)
    second = run_study(counts, config, tune_config(), out_dir, n_trials=3, **kwargs)
    return first, second, out_dir


def test_resumed_study_runs_only_the_missing_trials(resumed_study):
    first, second, out_dir = resumed_study
    assert (first.n_run_now, first.n_trials) == (2, 2)
    assert (second.n_run_now, second.n_trials) == (1, 3)
    assert second.n_complete + second.n_pruned == 3 and second.n_failed == 0
    assert second.storage == str(out_dir / "study.journal") and Path(second.storage).is_file()
    study = optuna.load_study(
        study_name="test-study",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(second.storage)),
    )
    assert len(study.trials) == 3
    assert len({tuple(sorted(trial.params.items())) for trial in study.trials}) == 3  # no repeated sample


def test_study_starts_with_the_base_configuration(resumed_study):
    _, second, _ = resumed_study
    assert second.base_trial is not None and second.base_trial["number"] == 0
    assert second.base_trial["baseline_perplexity"] > 0


def test_study_writes_a_loadable_best_config(resumed_study):
    _, second, out_dir = resumed_study
    path = second.best_config_path
    assert path is not None and path.is_file()
    assert path.read_text().splitlines()[3].startswith("extends: ")
    config = load_config(path)  # extends configs/pretrain.yaml and validates
    assert config.train.lr == pytest.approx(second.best_params["train.lr"])
    assert config.model.n_layers == second.best_params["model.n_layers"]
    assert config.model.d_model == second.best_params["model.d_model"]
    assert config.train.epochs == 5  # the base's epochs, not the short tune.epochs
    assert config.tokenizer.n_bins == 8  # non-default base values carried over
    for name in ("optimization_history.png", "param_importances.png", "best_params.json"):
        assert (out_dir / name).is_file()


def test_each_trial_is_a_nested_mlflow_run_under_the_study_run(resumed_study):
    _, second, _ = resumed_study
    client = MlflowClient(mlflow.get_tracking_uri())
    study_run = client.get_run(second.mlflow_run_id)
    assert study_run.data.tags["best.trial"] == str(second.best_trial)
    assert study_run.info.status == "FINISHED"
    children = client.search_runs(
        [study_run.info.experiment_id], f"tags.mlflow.parentRunId = '{second.mlflow_run_id}'"
    )
    assert len(children) == 3  # one per trial, across both calls (the study run was re-opened)
    child = children[0]
    assert "train.lr" in child.data.params and "model.d_model" in child.data.params
    history = client.get_metric_history(child.info.run_id, "val_loss")
    steps = [point.step for point in history]  # one point per validation (each epoch), by step
    assert len(steps) == 2 and 0 < steps[0] < steps[1] and steps[1] % steps[0] == 0
    artifacts = {item.path for item in client.list_artifacts(second.mlflow_run_id, "study")}
    assert {"study/optimization_history.png", "study/pretrain.best.yaml"} <= artifacts


class PruneFromSecondTrial(optuna.pruners.BasePruner):
    """Prunes every trial after the first at its first report."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number >= 1


def test_pruner_stops_a_trial_after_its_first_epoch(counts, tmp_path):
    result = run_study(
        counts, base_config("tune-prune"), tune_config(), tmp_path, n_trials=2, pruner=PruneFromSecondTrial()
    )
    assert (result.n_complete, result.n_pruned) == (1, 1)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(result.storage))
    pruned = optuna.load_study(study_name="test-study", storage=storage).trials[1]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    # stopped after the first validation (epoch 1 of 2); reported by step
    assert len(pruned.intermediate_values) == 1 and list(pruned.intermediate_values)[0] >= 1
    assert "worse than the median" in pruned.user_attrs["pruned_reason"]
    run = MlflowClient().get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.state"] == "PRUNED"


def test_invalid_combinations_are_pruned_with_a_reason(counts, tmp_path):
    space = {"model.n_heads": {"type": "categorical", "choices": [3]}}  # 16 is not a multiple of 3
    with pytest.raises(NeurofmError, match="no completed trial"):
        run_study(counts, base_config("tune-invalid"), tune_config(space=space), tmp_path, n_trials=1)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))
    )
    (trial,) = optuna.load_study(study_name="test-study", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "d_model must be a multiple of n_heads" in trial.user_attrs["pruned_reason"]


def test_trial_left_running_by_a_killed_process_is_redone(counts, tmp_path):
    config, settings = base_config("tune-killed"), tune_config()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))
    )
    killed = optuna.create_study(storage=storage, study_name="test-study").ask()  # RUNNING, never told
    killed.suggest_float("train.lr", 1e-3, 1e-2, log=True)
    result = run_study(counts, config, settings, tmp_path, n_trials=1)
    trials = optuna.load_study(study_name="test-study", storage=storage).trials
    assert [trial.state.name for trial in trials] == ["FAIL", "COMPLETE"]
    assert (result.n_run_now, result.n_trials, result.n_failed) == (1, 1, 1)


def test_resume_refuses_a_changed_search_space(counts, tmp_path):
    config = base_config("tune-changed")
    run_study(
        counts,
        config,
        tune_config(space={"model.n_layers": {"type": "int", "low": 1, "high": 2}}),
        tmp_path,
        n_trials=1,
    )
    with pytest.raises(NeurofmError, match="pick another tune.study_name"):
        run_study(counts, config, tune_config(), tmp_path, n_trials=2)


@pytest.mark.parametrize("objective", ["probe_auc", "fewshot5_f1", "ari_optimised"])
def test_embedding_objectives_score_the_validation_embeddings(counts, tmp_path, objective):
    space = {"train.lr": {"type": "categorical", "choices": [3e-3]}}
    result = run_study(
        counts,
        base_config(f"tune-{objective}"),
        tune_config(space=space),
        tmp_path,
        n_trials=1,
        objective=objective,
    )
    assert result.direction == "maximize"
    assert result.best_metrics[objective] == result.best_value
    # a 3-epoch model on two synthetic cell types: above chance (ARI 0, macro-F1 and AUC 0.5)
    assert (0.1 if objective == "ari_optimised" else 0.55) < result.best_value <= 1.0


def test_run_py_tune_runs_a_study_and_prints_the_best_config(counts, tmp_path, capsys):
    import run
    from neurofm.io import write_h5ad

    data = write_h5ad(counts, tmp_path / "counts.h5ad")
    best_out = tmp_path / "pretrain.best.yaml"
    code = run.main(
        [
            "--pipeline",
            "tune",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "outputs"),
            "--trials",
            "1",
            "--set",
            "tune.epochs=1",
            "--set",
            f"tune.best_config_out={best_out}",
            "--set",
            "tracking.experiment=tune-run-py",
            "--set",
            "train.progress=false",
            "--set",
            "train.count_head_epochs=3",  # the count head's own phase, short (scVI's rule: up to 400)
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "best trial 0: perplexity_ratio" in printed and str(best_out) in printed
    assert (tmp_path / "outputs" / "tune" / "neurofm-pretrain" / "study.journal").is_file()
    from neurofm.train import TrainConfig

    assert load_config(best_out).train.lr == TrainConfig().lr  # trial 0 is the default configuration
