"""Safe loading: nothing a user may receive from elsewhere is unpickled.

A "malicious" pickle here is a real payload: unpickling it calls ``open(marker, "w")`` and so creates a marker
file. Each case first proves the payload is live (a plain ``pickle.loads`` creates the marker), then plants it
where neurofm expects a checkpoint, resume state, tokenizer or probe file, and asserts the loader refuses it
with a NeurofmError *and* the marker never appears. A static scan pins down that no module of the package,
steps, pipelines or materializers imports a pickle library or calls ``torch.load``/``np.load`` unsafely.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from neurofm.data.synthetic import make_synthetic_counts
from neurofm.errors import NeurofmError
from neurofm.model import WEIGHTS_FILE, GeneEncoder, ModelConfig, load_pretrained
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
from neurofm.train import LAST_DIR, RESUME_FILE, TrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("neurofm", "steps", "pipelines", "materializers")
TOKENIZER_EDGES = "tokenizer_edges.npz"
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the payload's own


class Payload:
    """Unpickling this object opens ``marker`` for writing, i.e. creates the file (arbitrary code runs)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": {"weight": Payload(marker)}})


def _torch_zip_bytes(marker: Path) -> bytes:
    """A torch.save (zip) checkpoint whose pickle holds the payload next to real tensors."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where the payload would write; asserts the payload is live (plain pickle runs it) before the test."""
    marker = tmp_path / "PWNED"
    for blob in (_pickle_bytes(marker), _torch_zip_bytes(marker)):
        if blob[:2] == b"PK":
            torch.load(io.BytesIO(blob), weights_only=False)  # the unsafe way
        else:
            pickle.loads(blob)  # noqa: S301 - the point: prove the payload runs when unpickled
        assert marker.exists(), "the payload must create the marker when unpickled unsafely"
        marker.unlink()
    return marker


@pytest.fixture(scope="module")
def small_adata():
    return make_synthetic_counts(n_cells=300, n_genes=120, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, small_adata) -> Path:
    """A genuine model directory (untrained tiny encoder + fitted tokenizer); copy it before tampering."""
    tokenizer = ExpressionTokenizer(TokenizerConfig()).fit(small_adata)
    config = ModelConfig(
        n_genes=tokenizer.n_genes,
        n_bins=tokenizer.config.n_bins,
        d_model=16,
        n_heads=2,
        n_layers=1,
        ffn_dim=32,
    )
    directory = tmp_path_factory.mktemp("model") / "model"
    GeneEncoder(config).save_pretrained(directory, tokenizer)
    load_pretrained(directory)  # the untampered directory loads
    return directory


def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


# --------------------------------------------------------------------------------------------- model weights
@pytest.mark.parametrize("make_blob", [_pickle_bytes, _torch_zip_bytes], ids=["raw-pickle", "torch-save-zip"])
def test_load_pretrained_refuses_a_pickle_in_place_of_the_safetensors_weights(
    model_dir: Path, tmp_path: Path, marker: Path, make_blob
):
    tampered = _copy(model_dir, tmp_path)
    (tampered / WEIGHTS_FILE).write_bytes(make_blob(marker))
    with pytest.raises(NeurofmError, match="safetensors"):
        load_pretrained(tampered)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_refuses_an_object_array_npz(model_dir: Path, tmp_path: Path, marker: Path):
    tampered = _copy(model_dir, tmp_path)
    edges = np.empty(1, dtype=object)
    edges[0] = Payload(marker)
    with open(tampered / TOKENIZER_EDGES, "wb") as handle:
        np.savez(handle, bin_edges=edges)  # np.savez pickles object arrays
    with pytest.raises(NeurofmError, match="tokenizer"):
        ExpressionTokenizer.load(tampered)
    with pytest.raises(NeurofmError, match="tokenizer"):
        load_pretrained(tampered)
    assert not marker.exists()


def test_tokenizer_refuses_a_pickle_named_npz(model_dir: Path, tmp_path: Path, marker: Path):
    tampered = _copy(model_dir, tmp_path)
    (tampered / TOKENIZER_EDGES).write_bytes(_pickle_bytes(marker))
    with pytest.raises(NeurofmError, match="tokenizer"):
        ExpressionTokenizer.load(tampered)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- resume state
@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory, small_adata):
    """A 1-epoch pre-training run (resume state + last/ checkpoint) and the settings to resume it with."""
    out_dir = tmp_path_factory.mktemp("interrupted") / "pretrain"
    model_config = ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_dim=32)
    train_config = TrainConfig(
        epochs=1,
        batch_size=64,
        max_tokens_per_cell=32,
        warmup_steps=2,
        device="cpu",
        progress=False,
        count_head_epochs=2,
    )
    pretrain(small_adata, TokenizerConfig(), model_config, train_config, out_dir)
    assert (out_dir / RESUME_FILE).is_file() and (out_dir / LAST_DIR).is_dir()
    return out_dir, model_config, replace(train_config, epochs=2)


def _resume(small_adata, run_dir: Path, model_config: ModelConfig, train_config: TrainConfig):
    return pretrain(small_adata, TokenizerConfig(), model_config, train_config, run_dir, resume=True)


@pytest.mark.parametrize("make_blob", [_pickle_bytes, _torch_zip_bytes], ids=["raw-pickle", "torch-save-zip"])
def test_resume_refuses_a_malicious_resume_state(
    interrupted_run, small_adata, tmp_path: Path, marker: Path, make_blob
):
    run_dir, model_config, train_config = interrupted_run
    tampered = _copy(run_dir, tmp_path)
    (tampered / RESUME_FILE).write_bytes(make_blob(marker))
    with pytest.raises(NeurofmError, match="resume state"):
        _resume(small_adata, tampered, model_config, train_config)
    assert not marker.exists()


def test_resume_refuses_a_resume_state_that_mixes_real_state_and_a_payload(
    interrupted_run, small_adata, tmp_path: Path, marker: Path
):
    """The genuine resume state with one extra pickled object smuggled in is refused as a whole."""
    run_dir, model_config, train_config = interrupted_run
    tampered = _copy(run_dir, tmp_path)
    state = torch.load(tampered / RESUME_FILE, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, tampered / RESUME_FILE)
    with pytest.raises(NeurofmError, match="resume state"):
        _resume(small_adata, tampered, model_config, train_config)
    assert not marker.exists()


def test_resume_refuses_a_pickle_in_place_of_the_last_checkpoint(
    interrupted_run, small_adata, tmp_path: Path, marker: Path
):
    run_dir, model_config, train_config = interrupted_run
    tampered = _copy(run_dir, tmp_path)
    (tampered / LAST_DIR / WEIGHTS_FILE).write_bytes(_torch_zip_bytes(marker))
    with pytest.raises(NeurofmError, match="safetensors"):
        _resume(small_adata, tampered, model_config, train_config)
    assert not marker.exists()


def test_genuine_resume_state_holds_only_tensors_and_plain_containers(interrupted_run):
    """The resume state neurofm writes loads under ``weights_only=True``: the safe path is the only path."""
    run_dir, _, _ = interrupted_run
    state = torch.load(run_dir / RESUME_FILE, weights_only=True)
    assert {"step", "optimizer", "model", "loader", "metrics"} <= set(state)
    assert {"epoch", "batches_consumed", "seed"} <= set(state["loader"])  # the position mid-epoch
    with zipfile.ZipFile(run_dir / RESUME_FILE) as archive:  # torch's zip format, not a bare pickle
        assert any(name.endswith("data.pkl") for name in archive.namelist())


# --------------------------------------------------------------------------------------------- probe
def test_probe_json_loader_round_trips_without_pickle(tmp_path: Path):
    from neurofm.evaluate.probe import ProbeConfig, fit_probe, load_probe, save_probe

    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(60, 4))
    labels = np.where(embedding[:, 0] > 0, "a", "b")
    probe, _ = fit_probe(embedding, labels, np.arange(60), ProbeConfig())
    path = save_probe(probe, tmp_path / "probe.json")
    assert json.loads(path.read_text())["format"]
    np.testing.assert_array_equal(load_probe(path).predict(embedding), probe.predict(embedding))


def test_load_probe_never_unpickles_a_pickle_named_probe_json(tmp_path: Path, marker: Path):
    from neurofm.evaluate.probe import load_probe

    path = tmp_path / "probe.json"
    path.write_bytes(_pickle_bytes(marker))
    with pytest.raises(Exception):  # noqa: B017 - which type is pinned down by the test below
        load_probe(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"[1, 2, 3]", id="json-list"),
        pytest.param(b'{"format": "FORMAT"}', id="json-missing-keys"),
        pytest.param(None, id="pickle"),
    ],
)
def test_load_probe_refuses_a_file_that_is_not_a_probe_json_with_a_neurofm_error(
    tmp_path: Path, marker: Path, content
):
    from neurofm.evaluate.probe import PROBE_FORMAT, load_probe

    path = tmp_path / "probe.json"
    content = _pickle_bytes(marker) if content is None else content.replace(b"FORMAT", PROBE_FORMAT.encode())
    path.write_bytes(content)
    with pytest.raises(NeurofmError):
        load_probe(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- static scan
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "joblib", "cloudpickle", "dill", "shelve", "marshal"}
# joblib's process pool reads no file: importing it is safe (joblib.load / dump stay refused)
PARALLEL_ONLY = {"joblib": {"Parallel", "delayed", "parallel_config", "cpu_count"}}


def _call_name(node: ast.Call) -> str:
    parts = []
    target = node.func
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name):
        parts.append(target.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _unsafe_loading(source: str, filename: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            problems += [
                f"{filename}:{node.lineno} imports {alias.name}"
                for alias in node.names
                if alias.name.split(".")[0] in PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            allowed = PARALLEL_ONLY.get(node.module or "", set())
            if any(alias.name not in allowed for alias in node.names):
                problems.append(f"{filename}:{node.lineno} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name in ("torch.load",) or name.endswith(".torch.load"):
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{filename}:{node.lineno} calls torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                allow_pickle = _keyword(node, "allow_pickle")
                if allow_pickle is not None and not (
                    isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False
                ):
                    problems.append(f"{filename}:{node.lineno} calls {name} with allow_pickle not False")
            elif name.endswith("read_pickle") or name.endswith("sklearn.load_model"):
                problems.append(f"{filename}:{node.lineno} calls {name} (unpickles)")
    return problems


def test_no_module_loads_with_pickle():
    files = [path for package in SCANNED for path in sorted((ROOT / package).rglob("*.py"))] + [
        ROOT / "run.py"
    ]
    assert len(files) > 20, f"scanned only {len(files)} files; is ROOT ({ROOT}) right?"
    problems = [
        problem
        for path in files
        for problem in _unsafe_loading(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not problems, "unsafe loading:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import joblib as jl",
        "from cloudpickle import loads",
        "from joblib import Parallel, load",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "np.load(path, allow_pickle=True)",
        "numpy.load(path, allow_pickle=flag)",
        "pd.read_pickle(path)",
    ],
)
def test_the_scan_catches_each_unsafe_pattern(source: str):
    assert _unsafe_loading(source, "example.py"), f"the scan misses {source!r}"


def test_the_scan_accepts_the_safe_patterns():
    safe = (
        "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\nnp.load(p, allow_pickle=False)\n"
        "from joblib import Parallel, delayed\n"
    )
    assert _unsafe_loading(safe, "example.py") == []
