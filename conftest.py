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
from neurofm.cpu import set_thread_policy  # noqa: E402

set_thread_policy()  # as run.py does, before torch is imported
(_SESSION_DIR / "home").mkdir(parents=True, exist_ok=True)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml): one worker per core, at most 4. Most tests are single-threaded Python
    (ZenML, scikit-learn, Leiden), so two workers on a 2-core machine halve most of the suite's time; every
    worker is a pytest session of its own, with its own stores (above)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Remove this process's session dir (stores, neurofm home) once the session is over."""
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
