"""Fault tolerance: a pre-training killed with SIGKILL resumes to the same result, and a killed or failed
write never leaves a partial file under the final name.

Pre-training runs in a child process (``CHILD``) on a small synthetic .h5ad. The child reports each epoch
start and each training batch on stdout; the parent SIGKILLs it at a chosen point, reruns with ``resume=True`` and
compares every metric (wall-clock time aside), the checkpoints and the demo with an uninterrupted run of the
same seed, also in a child process (same thread settings).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from neurofm import io
from neurofm.data.synthetic import make_synthetic_counts
from neurofm.errors import NeurofmError

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
TIMING = {"epoch_time_s", "data_wait_s"}  # wall-clock: the only metrics allowed to differ

CHILD = r"""
import json, sys
from pathlib import Path
import neurofm.train as train
from neurofm.io import read_h5ad
from neurofm.model import ModelConfig
from neurofm.tokenizer import TokenizerConfig

data, out_dir, epochs, resume = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "resume"

loader_iter, make_batch = train.StreamLoader.__iter__, train.make_batch

def announce_epoch(self):  # the loop iterates the loader once per epoch (from its start, or mid-epoch)
    print("epoch", self.epoch + 1, flush=True)
    return loader_iter(self)

def announce_batch(*args, **kwargs):
    print("batch", flush=True)
    return make_batch(*args, **kwargs)

train.StreamLoader.__iter__, train.make_batch = announce_epoch, announce_batch
try:
    result = train.pretrain(
        read_h5ad(data),
        TokenizerConfig(),
        ModelConfig(d_model=16, n_heads=2, n_layers=2, ffn_dim=32, dropout=0.1),
        train.TrainConfig(epochs=epochs, batch_size=16, max_tokens_per_cell=32, warmup_steps=5, seed=3,
                          device="cpu", progress=False, count_head_epochs=2),
        out_dir,
        resume=resume,
    )
except train.NeurofmError as error:
    print("neurofm error:", error, flush=True)
    sys.exit(2)
(out_dir / "result.json").write_text(json.dumps({"metrics": result.metrics, "demo": result.demo}))
print("done", flush=True)
"""


def _tiny_configs() -> dict:
    """The settings the child script uses, for the in-process tests (same model, same training)."""
    import neurofm.train as train
    from neurofm.model import ModelConfig
    from neurofm.tokenizer import TokenizerConfig

    return {
        "tokenizer_config": TokenizerConfig(),
        "model_config": ModelConfig(d_model=16, n_heads=2, n_layers=2, ffn_dim=32, dropout=0.1),
        "train_config": train.TrainConfig(
            epochs=EPOCHS,
            batch_size=16,
            max_tokens_per_cell=32,
            warmup_steps=5,
            seed=3,
            device="cpu",
            progress=False,
            count_head_epochs=2,
        ),
    }


@dataclass
class Outcome:
    returncode: int
    stdout: str
    out_dir: Path


def _child(
    data: Path, out_dir: Path, resume: bool = False, kill_at: tuple[int, int] | None = None
) -> Outcome:
    """Run CHILD; with ``kill_at=(epoch, batches)`` SIGKILL it once ``batches`` training batches of ``epoch``
    have started (``batches=0``: as soon as the epoch starts, i.e. right after the previous checkpoint)."""
    command = [
        sys.executable,
        "-c",
        CHILD,
        str(data),
        str(out_dir),
        str(EPOCHS),
        "resume" if resume else "fresh",
    ]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    epoch, batches = 0, 0
    deadline = time.monotonic() + 240
    try:
        for line in child.stdout:
            lines.append(line)
            if line.startswith("epoch "):
                epoch, batches = int(line.split()[1]), 0
            elif line.startswith("batch"):
                batches += 1
            if kill_at is not None and (epoch, batches) >= kill_at:
                child.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the child ran for more than 240 s"
        lines.extend(child.stdout.read().splitlines(keepends=True))
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return Outcome(child.returncode, "".join(lines), out_dir)


def _result(outcome: Outcome) -> dict:
    assert outcome.returncode == 0, f"child failed ({outcome.returncode}):\n{outcome.stdout[-3000:]}"
    return json.loads((outcome.out_dir / "result.json").read_text())


def _comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in metrics]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def counts_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "counts.h5ad"
    return io.write_h5ad(make_synthetic_counts(n_cells=300, n_genes=120, seed=0), path)


@pytest.fixture(scope="module")
def uninterrupted(counts_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    outcome = _child(counts_h5ad, tmp_path_factory.mktemp("uninterrupted") / "run")
    assert len(_result(outcome)["metrics"]) == EPOCHS
    return outcome


# ----------------------------------------------------------------------------------------- kill + resume
@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at",
    [(2, 1), (2, 7), (3, 14), (4, 0)],
    ids=["epoch2-batch1", "epoch2-mid", "epoch3-last-batch", "epoch4-start"],
)
def test_sigkilled_pretraining_resumes_to_the_uninterrupted_result(
    counts_h5ad: Path, uninterrupted: Outcome, tmp_path: Path, kill_at: tuple[int, int]
):
    killed = _child(counts_h5ad, tmp_path / "run", kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, f"not killed:\n{killed.stdout[-2000:]}"
    assert not (killed.out_dir / "result.json").exists()
    leftovers = [p.name for p in killed.out_dir.iterdir() if p.name.startswith(".")]

    resumed = _child(counts_h5ad, tmp_path / "run", resume=True)
    expected, got = _result(uninterrupted), _result(resumed)
    assert [row["epoch"] for row in got["metrics"]] == list(range(1, EPOCHS + 1)), (
        "an epoch was lost or repeated"
    )
    assert _comparable(got["metrics"]) == _comparable(expected["metrics"])  # exact
    assert got["demo"] == expected["demo"]
    for name in ("best", "last"):
        a, b = _weights(uninterrupted.out_dir / name), _weights(resumed.out_dir / name)
        assert all(torch.equal(a[key], b[key]) for key in a), f"{name}/ weights differ after resume"
    rerun = sum(line.startswith("epoch ") for line in resumed.stdout.splitlines())
    print(f"killed at (epoch, batch) {kill_at}; the resume ran {rerun} epoch(s); dotfiles left: {leftovers}")


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_cannot_resume_and_says_so(
    counts_h5ad: Path, tmp_path: Path
):
    killed = _child(counts_h5ad, tmp_path / "run", kill_at=(1, 3))
    assert killed.returncode == -signal.SIGKILL
    resumed = _child(counts_h5ad, tmp_path / "run", resume=True)
    assert resumed.returncode == 2
    message = [line for line in resumed.stdout.splitlines() if line.startswith("neurofm error:")]
    assert message and "nothing to resume" in message[0] and "without resume" in message[0], resumed.stdout


def test_a_crash_between_checkpoint_and_resume_state_still_resumes_exactly(
    counts_h5ad: Path, uninterrupted: Outcome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """In-process stand-in for a SIGKILL that lands after last/ is renamed into place but before the resume
    state is: the second epoch's ``torch.save`` of the resume state raises."""
    import neurofm.train as train

    adata = io.read_h5ad(counts_h5ad)
    settings = dict(**_tiny_configs(), out_dir=tmp_path / "run")
    real_save, calls = torch.save, []

    def crash_on_second_resume_state(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill between last/ and resume_state.pt")
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train.torch, "save", crash_on_second_resume_state)
        with pytest.raises(KeyboardInterrupt):
            train.pretrain(adata, **settings)
    result = train.pretrain(adata, **settings, resume=True)
    assert _comparable(result.metrics) == _comparable(_result(uninterrupted)["metrics"])


# ----------------------------------------------------------------------------------------- atomic writes
WRITER = r"""
import sys
import numpy as np, anndata as ad
from neurofm.io import write_h5ad
rng = np.random.default_rng(0)
adata = ad.AnnData(X=rng.random((int(sys.argv[2]), 1000), dtype=np.float32))
print("writing", flush=True)
write_h5ad(adata, sys.argv[1])
print("written", flush=True)
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for_temp(directory: Path, name: str, child: subprocess.Popen, timeout: float = 60) -> Path:
    """The temporary directory atomic_path makes beside ``name`` once it holds a non-empty partial file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        for temp in directory.glob(f".{name}.*.tmp"):
            partial = temp / name
            if partial.exists() and partial.stat().st_size > 0:
                return partial
        time.sleep(0.005)
    pytest.fail(f"no partial write of {name} seen (child exit {child.poll()})")


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "replacing-old-file"])
def test_sigkill_during_write_h5ad_leaves_no_partial_file_under_the_final_name(
    tmp_path: Path, existing: bool
):
    target = tmp_path / "prepared.h5ad"
    if existing:
        io.write_h5ad(ad.AnnData(X=np.ones((3, 2), dtype=np.float32)), target)
        old_hash = _sha256(target)
    n_cells = 60_000  # 240 MB of float32: long enough to be caught mid-write
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), str(n_cells)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        partial = _wait_for_temp(tmp_path, target.name, child)
        size_at_kill = partial.stat().st_size
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, "the write finished before the kill; raise n_cells"
    if existing:
        assert _sha256(target) == old_hash, "the old file was modified"
        assert io.read_h5ad(target).shape == (3, 2)
    else:
        assert not target.exists(), "a partial file sits under the final name"
    leftovers = [path.name for path in tmp_path.iterdir() if path.name != target.name]
    assert leftovers, "the killed writer left no temporary (nothing for the sweep to test)"
    assert all(name.startswith(".") for name in leftovers), f"non-hidden leftovers: {leftovers}"
    print(f"killed with {size_at_kill / 1e6:.1f} MB of the partial file written; leftovers {leftovers}")

    # the next write of the same name sweeps the dead writer's temporary and completes
    io.write_h5ad(ad.AnnData(X=np.zeros((4, 2), dtype=np.float32)), target)
    assert sorted(path.name for path in tmp_path.iterdir()) == [target.name]
    assert io.read_h5ad(target).shape == (4, 2)


def test_the_sweep_leaves_temporaries_of_live_writers_and_other_hosts_alone(tmp_path: Path):
    target = tmp_path / "summary.json"
    host = socket.gethostname().replace(".", "_")
    live = tmp_path / f".summary.json.{host}-{os.getpid()}.abc.tmp"  # this very process: alive
    other_host = tmp_path / ".summary.json.elsewhere-1.abc.tmp"
    dead = tmp_path / f".summary.json.{host}-{_dead_pid()}.abc.tmp"
    unrelated = tmp_path / f".summary.json.old.{host}-{_dead_pid()}.abc.tmp.keep"
    for path in (live, other_host, dead, unrelated):
        path.mkdir()
    assert io.sweep_stale_temporaries(target) == [dead]
    assert live.exists() and other_host.exists() and unrelated.exists() and not dead.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_failed_write_removes_its_temp_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    target = tmp_path / "prepared.h5ad"
    io.write_h5ad(ad.AnnData(X=np.ones((3, 2), dtype=np.float32)), target)
    old_hash = _sha256(target)
    real_write = ad.AnnData.write_h5ad

    def write_half_then_fail(self, path, *args, **kwargs):
        real_write(self, path, *args, **kwargs)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", write_half_then_fail)
    with pytest.raises(OSError):
        io.write_h5ad(ad.AnnData(X=np.zeros((50, 4), dtype=np.float32)), target)
    assert _sha256(target) == old_hash
    assert sorted(path.name for path in tmp_path.iterdir()) == [target.name], "a temp file was left behind"


def test_a_failed_json_write_keeps_the_old_file(tmp_path: Path):
    target = io.write_json({"ok": 1}, tmp_path / "summary.json")
    with pytest.raises(TypeError):
        io.write_json({"bad": object()}, target)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(path.name for path in tmp_path.iterdir()) == [target.name]


def test_a_crash_while_swapping_a_model_directory_keeps_a_directory_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    target = tmp_path / "last"
    with io.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"old")
    real_replace, calls = os.replace, []

    def crash_on_second_rename(source, destination):
        calls.append((source, destination))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill between the two renames")
        return real_replace(source, destination)

    monkeypatch.setattr(io.os, "replace", crash_on_second_rename)
    try:
        with io.atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(b"new")
    except KeyboardInterrupt:  # the two-rename fallback was interrupted
        pass
    else:  # the swap is one atomic exchange: no window to crash in, the new directory is in place
        assert (target / "model.safetensors").read_bytes() == b"new"
    assert (target / "model.safetensors").is_file(), (
        f"no {target.name}/ after the crash: {os.listdir(tmp_path)}"
    )


def test_resume_refuses_a_truncated_resume_state_with_one_line(
    counts_h5ad: Path, uninterrupted: Outcome, tmp_path
):
    import shutil

    import neurofm.train as train

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted.out_dir, run_dir)
    state = run_dir / train.RESUME_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(NeurofmError, match="not a readable resume state") as error:
        train.pretrain(
            io.read_h5ad(counts_h5ad),
            **_tiny_configs(),
            out_dir=run_dir,
            resume=True,
        )
    assert "\n" not in str(error.value)
