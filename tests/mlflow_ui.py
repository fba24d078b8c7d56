"""The MLflow UI as a user sees it: the project's store served by ``mlflow server``, in headless Chromium.

The test runs ``run.py --pipeline full`` (pretrain + evaluate) on small built-in data into a fresh MLflow
store, serves it on 127.0.0.1 and drives the system
Chromium (Debian packages ``chromium`` + ``chromium-driver``, which ``.ci/run`` installs) through Selenium.
It asserts on the *rendered page text* — the experiment, the run's perplexity and probe metrics, an artifact
figure, the registered model with its ``champion`` alias — and saves a screenshot of every page under
``$NEUROFM_TEST_ARTIFACTS`` (default ``tests/artifacts/mlflow_ui/``). The REST API is only used to find ids
to navigate to, never as the evidence.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = Path(os.environ.get("NEUROFM_TEST_ARTIFACTS", ROOT / "tests" / "artifacts")) / "mlflow_ui"
EXPERIMENT = "neurofm"  # the experiment configs/pretrain.yaml names
REGISTERED_MODEL = "neurofm-encoder"
PAGE_TIMEOUT_S = 30

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium + chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
        "install them with `apt-get install -y chromium chromium-driver` (.ci/run does)",
    ),
]


@dataclass
class Store:
    """What the UI should show: where the store is and the ids/values it holds."""

    tracking_uri: str
    artifacts_uri: str
    experiment_id: str
    pretrain_run_id: str  # per-epoch metrics (val_perplexity), curves, the registered model
    pretrain_run_name: str
    evaluation_run_id: str  # model/probe_auc and the other evaluation metrics
    evaluation_run_name: str
    model_name: str
    model_version: str  # the version holding the champion alias
    figure_path: str  # artifact path of a PNG logged to the pretrain run
    figure_file: Path  # the same PNG in the artifact store
    val_perplexity: float
    probe_auc: float


# ------------------------------------------------------------------------------------------ building stores
def _store_from_pipeline(tmp: Path) -> tuple[str, str, str]:
    """``run.py --pipeline full`` on a small built-in atlas, 2 epochs and the PCA baseline only (the pages need
    one baseline beside the model; every baseline is tested in test_pipeline_full.py) — the pipelines log the
    runs and register the model, and the version gets the ``champion`` alias; returns (tracking_uri, pretrain
    run id, evaluation run id)."""
    from mlflow.tracking import MlflowClient

    from neurofm import tracking

    sys.path.insert(0, str(ROOT))
    import run as entry_point

    small = [
        "--set", "default_data.n_cells=3000",
        "--set", "default_data.n_genes=300",
        "--set", "default_data.crop={n_cells: 400, n_genes: 200}",
        "--set", "train.epochs=2",  # the champion alias is set by hand below when the rule refuses the model
        "--set", "train.count_head_epochs=5",  # the count head's own phase, short (scVI's rule: 400)
        "--set", "evaluate.baselines=[pca]",  # the probe charts: model/ and pca/
        "--set", "evaluate.label_efficiency_draws=2",
        "--set", "evaluate.label_efficiency_shots=[5,all]",  # 10-50 shots: leave-one-out fits cost minutes
    ]  # fmt: skip
    status = entry_point.main(["--pipeline", "full", "--out", str(tmp / "out"), "--no-cache", *small])
    assert status == 0, "run.py --pipeline full failed; see the log above"
    uri = tracking.configure()
    version = tracking.model_version_for(None, REGISTERED_MODEL)
    assert version is not None, f"the pipeline registered no {REGISTERED_MODEL} version"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    evaluations = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`neurofm.pipeline_step` = 'evaluate'"
    )
    assert evaluations, "the pipeline logged no evaluation run"
    evaluation = evaluations[0]
    # a 2-epoch model on 400 cells does not keep up with PCA, so the champion rule refuses it and says why;
    # the page under test then shows the alias as a person sets it by hand (in the UI or with the client)
    promotion = evaluation.data.tags.get("neurofm.promotion", "")
    aliases = client.get_registered_model(REGISTERED_MODEL).aliases
    if "champion" not in aliases:
        assert "not promoted" in promotion and "baseline" in promotion, promotion
        client.set_registered_model_alias(REGISTERED_MODEL, "champion", version.version)
    return uri, version.run_id, evaluation.info.run_id


def _describe_store(uri: str, pretrain_run_id: str, evaluation_run_id: str) -> Store:
    """Ids and values the pages should show, read back from the store (navigation only, not evidence)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    pretrain_run, evaluation_run = client.get_run(pretrain_run_id), client.get_run(evaluation_run_id)
    assert "val_perplexity" in pretrain_run.data.metrics, sorted(pretrain_run.data.metrics)
    assert "model/probe_auc" in evaluation_run.data.metrics, sorted(evaluation_run.data.metrics)
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    figures = [
        item.path
        for folder in (None, "training", "figures")
        for item in client.list_artifacts(pretrain_run_id, folder)
        if item.path.endswith(".png")
    ]
    assert figures, "the pretrain run logged no PNG figure"
    artifact_root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    return Store(
        tracking_uri=uri,
        artifacts_uri=artifact_root.as_uri(),
        experiment_id=pretrain_run.info.experiment_id,
        pretrain_run_id=pretrain_run_id,
        pretrain_run_name=pretrain_run.info.run_name,
        evaluation_run_id=evaluation_run_id,
        evaluation_run_name=evaluation_run.info.run_name,
        model_name=REGISTERED_MODEL,
        model_version=str(champion.version),
        figure_path=figures[0],
        figure_file=Path(pretrain_run.info.artifact_uri.removeprefix("file://")) / figures[0],
        val_perplexity=pretrain_run.data.metrics["val_perplexity"],
        probe_auc=evaluation_run.data.metrics["model/probe_auc"],
    )


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A fresh store under ``tmp_path`` (its own SQLite DB + artifacts), built with the project's code."""
    import mlflow

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("NEUROFM_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        yield _describe_store(*_store_from_pipeline(tmp_path))
    finally:
        mlflow.set_tracking_uri(previous[0])  # leave the session's store to the other tests
        mlflow.set_registry_uri(previous[1])


# ------------------------------------------------------------------------------------------ server + browser
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Store, workdir: Path):
    """``mlflow server`` on 127.0.0.1 over the store; yields its base URL; always killed."""
    port = _free_port()
    log_path = workdir / "mlflow-server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store.tracking_uri,
        "--registry-store-uri", store.tracking_uri,
        "--artifacts-destination", store.artifacts_uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)  # the server's own process group (uvicorn workers included)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, 9)
            server.wait(timeout=10)


@contextlib.contextmanager
def headless_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="neurofm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1800,1300", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _body_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def _wait_for_text(driver, needles: list[str], screenshot: str, timeout: float = PAGE_TIMEOUT_S) -> str:
    """Wait until every needle is in the rendered text; save the screenshot either way; return the text."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = _body_text(driver)
        if all(needle in text for needle in needles):
            break
        time.sleep(0.5)
    path = ARTIFACTS_DIR / screenshot
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    missing = [needle for needle in needles if needle not in text]
    assert not missing, (
        f"{missing} not visible on {driver.current_url} (screenshot {path}); page text:\n{text[:2000]}"
    )
    return text


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _wait_for_image(driver, size: tuple[int, int], screenshot: str, timeout: float = PAGE_TIMEOUT_S) -> dict:
    """Wait until the page shows a loaded artifact image (fetched from the server, not an icon) of ``size``
    pixels — the logged figure itself — and screenshot the page."""
    script = (
        "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0"
        " && !i.src.startsWith('data:'))"
        ".map(i => ({src: i.src, width: i.naturalWidth, height: i.naturalHeight}));"
    )
    deadline = time.monotonic() + timeout
    images: list[dict] = []
    while time.monotonic() < deadline:
        images = driver.execute_script(script)
        if any((image["width"], image["height"]) == size for image in images):
            break
        time.sleep(0.5)
    path = ARTIFACTS_DIR / screenshot
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    matching = [image for image in images if (image["width"], image["height"]) == size]
    assert matching, (
        f"the {size[0]}x{size[1]} figure is not rendered on {driver.current_url} "
        f"(images: {images}; screenshot {path})"
    )
    return matching[0]


def _search_charts(driver, query: str) -> None:
    """Type ``query`` into the run page's "Search metric charts" box."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        boxes = driver.find_elements(By.CSS_SELECTOR, "input[placeholder*='Search metric']")
        if boxes:
            boxes[0].send_keys(query)
            time.sleep(0.5)
            return
        time.sleep(0.5)
    raise AssertionError(f"no metric chart search box on {driver.current_url}")


def _wait_for_charts(driver, count: int) -> None:
    """Wait until ``count`` Plotly charts have drawn (their spinners are gone); fails otherwise."""
    script = "return document.querySelectorAll('.js-plotly-plot .main-svg').length"
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while driver.execute_script(script) < count:
        assert time.monotonic() < deadline, f"fewer than {count} charts drawn on {driver.current_url}"
        time.sleep(0.5)
    time.sleep(0.5)  # let the last chart finish its transition before the screenshot


def _scroll_to_text(driver, needle: str) -> None:
    """Scroll the deepest element whose text is ``needle`` into the middle of the view (for screenshots)."""
    driver.execute_script(
        "const needle = arguments[0];"
        "const all = Array.from(document.querySelectorAll('body *')).filter(e => e.children.length === 0"
        " && e.textContent.trim() === needle);"
        "if (all.length) all[0].scrollIntoView({block: 'center'});",
        needle,
    )
    time.sleep(0.3)


# ------------------------------------------------------------------------------------------ the test
def test_mlflow_ui_shows_experiment_metrics_figure_and_champion_model(mlflow_store: Store, tmp_path: Path):
    store = mlflow_store
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    figure_size = _png_size(store.figure_file)
    started = time.monotonic()
    seen: dict[str, object] = {}
    experiment_url = f"#/experiments/{store.experiment_id}"
    pretrain_url = f"{experiment_url}/runs/{store.pretrain_run_id}"
    evaluation_url = f"{experiment_url}/runs/{store.evaluation_run_id}"
    with mlflow_server(store, tmp_path) as base, headless_chromium() as driver:
        driver.get(f"{base}/{experiment_url}/runs")
        needles = [EXPERIMENT, store.pretrain_run_name, store.evaluation_run_name]
        _wait_for_text(driver, needles, "01_experiment_runs.png")

        driver.get(f"{base}/{pretrain_url}")
        needles = [store.pretrain_run_name, "Registered models", store.model_name]
        _wait_for_text(driver, needles, "02_pretrain_run_overview.png")
        _scroll_to_text(driver, "val_perplexity")
        text = _wait_for_text(driver, ["val_perplexity"], "03_pretrain_run_metrics.png")
        seen["val_perplexity shown as"] = _shown_value(text, store.val_perplexity)
        assert seen["val_perplexity shown as"], (
            f"val_perplexity={store.val_perplexity} is not on the run page"
        )

        driver.get(f"{base}/{pretrain_url}/model-metrics")
        _search_charts(driver, "perplexity")
        _wait_for_charts(driver, 2)
        _wait_for_text(driver, ["val_perplexity", "baseline_perplexity"], "04_pretrain_perplexity_charts.png")

        driver.get(f"{base}/{pretrain_url}/artifacts/{store.figure_path}")
        seen["figure"] = _wait_for_image(driver, figure_size, "05_pretrain_artifact_figure.png")

        driver.get(f"{base}/{evaluation_url}")
        _wait_for_text(driver, [store.evaluation_run_name], "06_evaluation_run_overview.png")
        _scroll_to_text(driver, "model/probe_auc")
        text = _wait_for_text(
            driver, ["model/probe_auc", "model/probe_accuracy"], "07_evaluation_run_metrics.png"
        )
        seen["model/probe_auc shown as"] = _shown_value(text, store.probe_auc)
        assert seen["model/probe_auc shown as"], f"model/probe_auc={store.probe_auc} is not on the run page"

        driver.get(f"{base}/{evaluation_url}/model-metrics")
        _search_charts(driver, "probe_a")  # ~90 charts (model/, pca/, random/…): the probe ones
        _wait_for_charts(driver, 2)  # grouped by prefix: "model" holds probe_auc, "pca" its baseline
        _wait_for_text(driver, ["probe_accuracy", "probe_auc"], "08_evaluation_probe_charts.png")

        driver.get(f"{base}/#/models/{store.model_name}")
        needles = [store.model_name, f"Version {store.model_version}", "champion"]
        _wait_for_text(driver, needles, "09_registered_model.png")

        driver.get(f"{base}/#/models/{store.model_name}/versions/{store.model_version}")
        _wait_for_text(driver, [f"Version {store.model_version}", "champion"], "10_model_version.png")
    seen["browser seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(seen, default=str))


def _shown_value(text: str, value: float) -> str | None:
    """The first rendering of ``value`` (MLflow rounds for display) found in the page text, if any."""
    for digits in (6, 5, 4, 3, 2):
        shown = f"{value:.{digits}f}".rstrip("0")
        if shown in text:
            return shown
    return None
