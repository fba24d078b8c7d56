"""The MLflow UI as a user sees it: a project store served by ``mlflow server``, in headless Chromium.

Helpers of ``test_mlflow_ui_shows_experiment_metrics_figure_and_champion_model`` in test_pipeline_full.py,
which serves a copy of the store that file's ``full`` run (pretrain + evaluate, small built-in data) logged
to, and drives the system Chromium (Debian packages ``chromium`` + ``chromium-driver``, which ``.ci/run``
installs) through Selenium. It asserts on the *rendered page text* — the experiment, the run's perplexity and
probe metrics, an artifact figure, the registered model with its ``champion`` alias — and saves a screenshot
of every page under ``$NEUROFM_TEST_ARTIFACTS`` (default ``tests/artifacts/mlflow_ui/``). The REST API is
only used to find ids to navigate to, never as the evidence.
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

needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium + chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
    "install them with `apt-get install -y chromium chromium-driver` (.ci/run does)",
)


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
def copy_of_full_run_store(session_uri: str, window_ms: tuple[int, int], dest: Path) -> Store:
    """A copy of the session's store (SQLite backup; the artifacts stay where the runs logged them) holding
    the ``full`` run logged within ``window_ms``: its pretrain and evaluation runs, and its registered
    version with the ``champion`` alias. The copy is what the server shows, so setting the alias by hand
    leaves the session's registry to the other tests."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    session_db = Path(session_uri.removeprefix("sqlite:///"))
    dest.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(session_db)) as source:
        with contextlib.closing(sqlite3.connect(dest / "mlflow.db")) as copy:
            source.backup(copy)
    uri = f"sqlite:///{dest / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    first, last = window_ms
    runs = [r for r in client.search_runs([experiment.experiment_id]) if first <= r.info.start_time <= last]
    steps = {step: [r for r in runs if r.data.tags.get("neurofm.pipeline_step") == step] for step in
             ("pretrain", "evaluate")}  # fmt: skip
    assert len(steps["pretrain"]) == 1 and len(steps["evaluate"]) == 1, {k: len(v) for k, v in steps.items()}
    pretrain, evaluation = steps["pretrain"][0], steps["evaluate"][0]
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{pretrain.info.run_id}'")
    assert len(versions) == 1, f"the full run registered {len(versions)} {REGISTERED_MODEL} versions"
    version = versions[0].version
    # a 2-epoch model on 400 cells does not keep up with PCA (or a champion before it), so the champion rule
    # refuses it and says why; the page under test then shows the alias as a person sets it by hand
    aliases = client.get_registered_model(REGISTERED_MODEL).aliases
    if aliases.get("champion") != version:
        promotion = evaluation.data.tags.get("neurofm.promotion", "")
        assert "not promoted" in promotion and ("baseline" in promotion or "champion" in promotion), promotion
        client.set_registered_model_alias(REGISTERED_MODEL, "champion", version)
    store = describe_store(
        uri, session_db.parent / "mlartifacts", pretrain.info.run_id, evaluation.info.run_id
    )
    assert store.model_version == str(version)
    return store


def describe_store(uri: str, artifact_root: Path, pretrain_run_id: str, evaluation_run_id: str) -> Store:
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


def _shown_value(text: str, value: float) -> str | None:
    """The first rendering of ``value`` (MLflow rounds for display) found in the page text, if any."""
    for digits in (6, 5, 4, 3, 2):
        shown = f"{value:.{digits}f}".rstrip("0")
        if shown in text:
            return shown
    return None


# ------------------------------------------------------------------------------------------ the pages
def walk_the_pages(store: Store, workdir: Path) -> dict[str, object]:
    """Serve ``store`` and open each page in the browser, asserting on what it shows; returns what was seen."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    figure_size = _png_size(store.figure_file)
    started = time.monotonic()
    seen: dict[str, object] = {}
    experiment_url = f"#/experiments/{store.experiment_id}"
    pretrain_url = f"{experiment_url}/runs/{store.pretrain_run_id}"
    evaluation_url = f"{experiment_url}/runs/{store.evaluation_run_id}"
    with mlflow_server(store, workdir) as base, headless_chromium() as driver:
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
    return seen
