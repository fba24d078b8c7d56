"""The suite's own housekeeping: every session runs in a private temp dir (conftest.py) and removes it.

A pytest run in a subprocess, with its own ``TMPDIR`` and one xdist worker (so a controller and a worker
process each make their session dir), must leave no ``neurofm-tests-*`` dir behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = "NEUROFM_TEST_RECORD_SESSION_DIR"  # set by the test below for the run it starts


def test_the_session_runs_in_its_own_temp_dir():
    session_dir = Path(os.environ["NEUROFM_TEST_SESSION_DIR"])
    assert session_dir.is_dir() and session_dir.name.startswith("neurofm-tests-")
    assert session_dir.parent == Path(tempfile.gettempdir())
    assert os.environ["NEUROFM_HOME"] == str(session_dir / "home")
    assert str(session_dir) in os.environ["MLFLOW_TRACKING_URI"]
    if record := os.environ.get(RECORD):
        Path(record).write_text(str(session_dir))


def test_a_test_run_removes_its_session_dirs(tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    record = tmp_path / "session_dir.txt"
    env = {**os.environ, "TMPDIR": str(temp), RECORD: str(record)}
    session = ("NEUROFM_TEST_SESSION_DIR", "NEUROFM_HOME", "MLFLOW_TRACKING_URI", "ZENML_CONFIG_PATH")
    for name in [name for name in env if name in session or name.startswith("PYTEST_XDIST_")]:
        del env[name]  # the inner run's conftest.py and xdist set their own
    process = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "no:cacheprovider", "--basetemp",
         str(tmp_path / "basetemp"), "tests/test_suite_hygiene.py::test_the_session_runs_in_its_own_temp_dir"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    worker_dir = Path(record.read_text())
    assert worker_dir.parent == temp  # the worker made its dir where the run was told to…
    assert not worker_dir.exists()  # …and removed it
    assert not list(temp.glob("neurofm-tests-*"))  # the controller's too
