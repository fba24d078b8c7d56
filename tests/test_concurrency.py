"""Two pipeline runs at the same time against the same stores: both finish (or the loser fails with one
clear line), and the ZenML and MLflow stores are intact afterwards (integrity check, runs listed)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

LIST_RUNS = r"""
import json, sys
from zenml.client import Client
from mlflow.tracking import MlflowClient
from neurofm import tracking
runs = {name: getattr(s, "value", str(s)) for name in sys.argv[1:] for s in [Client().get_pipeline_run(name).status]}
uri = tracking.configure()
experiments = [e.name for e in MlflowClient(uri).search_experiments()]
print(json.dumps({"runs": runs, "n_runs": len(Client().list_pipeline_runs(size=100).items),
                  "experiments": experiments}))
"""


def _env(stores: Path | None) -> dict[str, str]:
    """The session's stores (``None``) or fresh ones under ``stores``."""
    env = dict(os.environ)
    if stores is not None:
        env.update(
            ZENML_CONFIG_PATH=str(stores / "zenml"),
            NEUROFM_HOME=str(stores / "home"),
            MLFLOW_TRACKING_URI=f"sqlite:///{stores / 'home' / 'mlflow.db'}",
        )
    return env


def _start_prepare(out_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "run.py", "--pipeline", "prepare", "--out", str(out_dir), "--no-cache"]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run_two_at_once(tmp_path: Path, env: dict[str, str]) -> list[tuple[int, str, str]]:
    children = [_start_prepare(tmp_path / name, env) for name in ("first", "second")]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=400)
        results.append((child.returncode, stdout, stderr))
    return results


def _run_name(stdout: str) -> str:
    match = re.search(r"neurofm prepare: run (\S+) completed", stdout)
    assert match, f"no completed run in the summary:\n{stdout[-2000:]}"
    return match.group(1)


def _check_stores(env: dict[str, str], run_names: list[str]) -> dict:
    """SQLite integrity of every store, then list the runs through ZenML and MLflow in a fresh process."""
    zenml_db = Path(env["ZENML_CONFIG_PATH"]) / "local_stores" / "default_zen_store" / "zenml.db"
    mlflow_db = Path(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    for database in (zenml_db, mlflow_db):
        if database.exists():
            with sqlite3.connect(database) as connection:
                assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",), database
    listing = subprocess.run(
        [sys.executable, "-c", LIST_RUNS, *run_names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, f"cannot list the stores afterwards:\n{listing.stderr[-3000:]}"
    return json.loads(listing.stdout.strip().splitlines()[-1])


def _assert_clean_outcome(results: list[tuple[int, str, str]], tmp_path: Path) -> list[str]:
    """Each run either completed (summary printed, prepared.h5ad written) or failed with exactly one line."""
    completed = []
    for (returncode, stdout, stderr), name in zip(results, ("first", "second"), strict=True):
        if returncode == 0:
            completed.append(_run_name(stdout))
            assert (tmp_path / name / "prepared.h5ad").is_file()
        else:
            errors = [line for line in stderr.splitlines() if line.startswith("neurofm: error:")]
            assert returncode == 2 and errors and "Traceback" not in stderr, (
                f"the {name} run failed without one clear line (exit {returncode}):\n{stderr[-3000:]}"
            )
    assert completed, "neither run completed"
    return completed


def test_two_prepare_runs_at_once_on_the_session_stores_both_finish(tmp_path: Path):
    env = _env(None)
    _check_stores(env, [])  # the session's stores exist and are initialised before the race
    results = _run_two_at_once(tmp_path, env)
    completed = _assert_clean_outcome(results, tmp_path)
    assert len(completed) == 2, "one run failed: " + " | ".join(
        r[2].strip().splitlines()[-1] for r in results if r[0]
    )
    listing = _check_stores(env, completed)
    assert set(listing["runs"].values()) == {"completed"}, listing
    print(f"2 concurrent runs, {len(completed)} completed; {listing['n_runs']} runs listed afterwards")


def test_two_prepare_runs_at_once_on_fresh_stores_finish_or_fail_with_one_line(tmp_path: Path):
    env = _env(tmp_path / "stores")
    results = _run_two_at_once(tmp_path, env)
    completed = _assert_clean_outcome(results, tmp_path)
    listing = _check_stores(env, completed)
    assert set(listing["runs"].values()) == {"completed"}, listing
