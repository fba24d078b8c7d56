"""Test-session isolation, loaded by pytest before any test module imports zenml or mlflow.

Every session gets its own ZenML config/store, MLflow tracking store and neurofm home under a temp
dir; nothing touches the user's home directory or the project's own .neurofm/. The dir is removed when
the session ends (in the controller and in every xdist worker); tests/test_suite_hygiene.py checks it.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="neurofm-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)  # a session that never reaches unconfigure
os.environ["NEUROFM_TEST_SESSION_DIR"] = str(_SESSION_DIR)
os.environ["ZENML_CONFIG_PATH"] = str(_SESSION_DIR / "zenml")
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
os.environ["ZENML_LOGGING_COLORS_DISABLED"] = "true"
os.environ["ZENML_CUSTOM_SOURCE_ROOT"] = str(Path(__file__).resolve().parent)
os.environ["NEUROFM_HOME"] = str(_SESSION_DIR / "home")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'home' / 'mlflow.db'}"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("OMP_NUM_THREADS", "2")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":  # set by xdist before a worker reads this file
    # the workers share the cores, so OpenMP's waiting threads sleep rather than spin on a core the other
    # worker needs (neurofm.cpu: spinning beside a busy process made pre-training 3.5x slower, sleeping 1.5x);
    # set_thread_policy would pick the same on a busy machine, but decides from a 0.2-s sample
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from neurofm.cpu import set_thread_policy  # noqa: E402

set_thread_policy()  # as run.py does, before torch is imported
(_SESSION_DIR / "home").mkdir(parents=True, exist_ok=True)


# The longest test files, longest first (fresh-clone `--durations` in BENCHMARKS.md "The suite"). With
# `--dist loadfile --no-loadscope-reorder` (pyproject.toml) the workers take whole files in collection order, so
# these start first and the short files fill in behind them: the workers finish together. Without the order,
# xdist sends the files with the most tests first and the slowest file started last, minutes behind the other.
SLOWEST_FIRST = (
    "tests/test_pipeline_real.py",
    "tests/test_pipeline_full.py",  # with the MLflow UI test on its full run
    "tests/test_first_run.py",
    "tests/test_readme.py",
    "tests/test_concurrency.py",
    "tests/test_distributed.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Put the files of ``SLOWEST_FIRST`` first, in that order; every other file keeps its place."""
    rank = {path: index for index, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml): one worker per core, at most 4. Most tests are single-threaded Python
    (ZenML, scikit-learn, Leiden), so two workers on a 2-core machine halve most of the suite's time; every
    worker is a pytest session of its own, with its own stores (above)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Remove this process's session dir (stores, neurofm home) once the session is over."""
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
