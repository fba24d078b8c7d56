"""The locked environment (requirements/*.lock) agrees with pyproject.toml, its source of truth.

pyproject.toml names the top-level dependencies and their pins; requirements/compile.sh resolves them
(with uv) into two hashed locks: cpu.lock (everything but torch and its CUDA wheels — torch==2.13.0 is
installed first from its CPU wheel) and gpu.lock (the same plus torch and CUDA, for configs/gpu.yaml).
The README's install, .ci/run and the GPU image all install from these files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
TORCH_ONLY = re.compile(r"^(torch|triton|cuda-[a-z-]+|nvidia-[a-z0-9-]+)$")


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["dev"]]


def _lock(name: str) -> dict[str, list[tuple[Version, str | None, int]]]:
    """name → [(version, marker text, number of hashes)] for every entry of a lock file."""
    entries: dict[str, list[tuple[Version, str | None, int]]] = {}
    text = (LOCKS / name).read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = block.splitlines()[0]
        if first.startswith("#"):
            continue
        spec = first.rstrip(" \\")
        requirement, _, marker = spec.partition(" ; ")
        package, _, version = requirement.partition("==")
        n_hashes = block.count("--hash=sha256:")
        entries.setdefault(canonicalize_name(package.split("[")[0]), []).append(
            (Version(version), marker or None, n_hashes)
        )
    return entries


def _applies(marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate()


@pytest.mark.parametrize("lock_name", ["cpu.lock", "gpu.lock"])
def test_every_top_level_pin_is_locked_at_a_version_pyproject_allows(lock_name):
    lock = _lock(lock_name)
    for requirement in _pyproject_requirements():
        name = canonicalize_name(requirement.name)
        if lock_name == "cpu.lock" and TORCH_ONLY.match(name):
            assert name not in lock, f"{name} must come from its CPU wheel, not from cpu.lock"
            continue
        assert name in lock, (
            f"{name} (pyproject.toml) is missing from {lock_name}; run requirements/compile.sh"
        )
        versions = [version for version, marker, _ in lock[name] if _applies(marker)]
        assert versions, f"no {name} entry of {lock_name} applies to this Python"
        for version in versions:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{lock_name} has {name}=={version}, pyproject.toml asks {requirement.specifier}; "
                "run requirements/compile.sh"
            )


@pytest.mark.parametrize("lock_name", ["cpu.lock", "gpu.lock"])
def test_every_locked_package_is_pinned_and_hashed(lock_name):
    lock = _lock(lock_name)
    assert len(lock) > 100, f"{lock_name} holds only {len(lock)} packages: not a full transitive lock"
    for name, entries in lock.items():
        for version, _, n_hashes in entries:
            assert n_hashes >= 1, f"{name}=={version} in {lock_name} has no sha256 hash"


def test_the_two_locks_differ_only_by_torch_and_its_cuda_wheels():
    cpu, gpu = _lock("cpu.lock"), _lock("gpu.lock")
    assert set(gpu) - set(cpu) == {name for name in gpu if TORCH_ONLY.match(name)}
    assert "torch" in gpu
    for name, entries in cpu.items():
        assert [entry[:2] for entry in entries] == [entry[:2] for entry in gpu[name]], name


def test_the_installed_environment_is_the_locked_one():
    """What this test session runs on is what the lock pins (the README's install gives exactly it)."""
    from importlib.metadata import PackageNotFoundError, version

    lock = _lock("cpu.lock")
    for name in (
        "scanpy",
        "anndata",
        "scipy",
        "pynndescent",
        "scikit-learn",
        "numpy",
        "scvi-tools",
        "mlflow",
    ):
        locked = [v for v, marker, _ in lock[name] if _applies(marker)]
        try:
            installed = Version(version(name))
        except PackageNotFoundError:  # pragma: no cover - the lock is the install
            pytest.fail(f"{name} is locked but not installed")
        assert installed in locked, f"{name} {installed} installed, {locked} locked; reinstall from the lock"


def test_install_paths_use_the_locks():
    """README's install command, .ci/run and the GPU image config all install from the locks."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for text, where in ((readme, "README.md"), (ci, ".ci/run")):
        assert "pip install -q torch==2.13.0" in text, where
        assert "--require-hashes -r requirements/cpu.lock" in text, where
    gpu = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    assert gpu["resources"]["requirements"] == "requirements/gpu.lock"
    torch_pin = next(r for r in _pyproject_requirements() if r.name == "torch")
    assert [str(v) for v, _, _ in _lock("gpu.lock")["torch"]] == [str(s.version) for s in torch_pin.specifier]
