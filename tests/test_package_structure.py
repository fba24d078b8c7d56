"""The package's shape: imports point one way (no cycles), a fast front door, scanpy-style names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("neurofm", "steps", "pipelines", "materializers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    modules = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    modules["run"] = ROOT / "run.py"
    return modules


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere (module level, functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles_among_the_projects_modules():
    modules = _project_modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is not a layer reaching back up
    for name in graph:
        graph[name] = {
            t
            for t in graph[name]
            if not (t.startswith(name + ".") and (ROOT / name.replace(".", "/")).is_dir())
        }
    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, set())})
    assert not cycles, f"modules importing each other: {cycles}"
    # and no longer cycles either: a depth-first search finds none
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(nxt) :] + [nxt])}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_science_package_never_imports_zenml_or_the_layers_above_it():
    modules = _project_modules()
    for name, path in modules.items():
        if not name.startswith("neurofm"):
            continue
        text = path.read_text(encoding="utf-8")
        assert "import zenml" not in text and "from zenml" not in text, name
        assert not (_imports(path, name, set(modules)) & {"run", "steps", "pipelines", "materializers"}), name


def test_import_neurofm_is_light_and_the_front_door_resolves():
    code = (
        "import sys, neurofm; heavy = [m for m in ('torch', 'scanpy', 'mlflow', 'zenml') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"import neurofm pulled in {out.stdout.strip()}"
    import neurofm
    from neurofm.embedding import embed
    from neurofm.model import ModelConfig, load_pretrained
    from neurofm.train import TrainConfig, pretrain

    assert neurofm.embed is embed and neurofm.load_pretrained is load_pretrained
    assert neurofm.pretrain is pretrain and neurofm.ModelConfig is ModelConfig
    assert neurofm.TrainConfig is TrainConfig and callable(neurofm.evaluate_embeddings)
    assert set(neurofm.__all__) <= set(dir(neurofm))
    with pytest.raises(AttributeError):
        neurofm.not_a_name  # noqa: B018


def test_embed_is_a_scanpy_style_verb():
    import inspect

    import neurofm

    signature = inspect.signature(neurofm.embed)
    names = list(signature.parameters)
    assert names[:3] == ["adata", "model", "tokenizer"]
    assert signature.parameters["key_added"].default == "X_neurofm"
    assert signature.parameters["copy"].default is False
    assert signature.parameters["key_added"].kind is inspect.Parameter.KEYWORD_ONLY
