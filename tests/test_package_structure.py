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


def _folder(name: str) -> str:
    """The node of ``name`` in the folder-level graph: a sub-package of ``neurofm`` (``neurofm.evaluate``,
    ``neurofm.data``) stands for all its modules; a top-level module (``neurofm.mapping``) for itself."""
    parts = name.split(".")
    if parts[0] == "neurofm" and len(parts) > 2:
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if parts[0] == "neurofm" else parts[0]


def folder_cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of folder-level nodes that reach each other (a loop at the folder level)."""
    folders: dict[str, set[str]] = {}
    for name, targets in graph.items():
        folders.setdefault(_folder(name), set()).update(_folder(t) for t in targets)
    for node, targets in folders.items():
        targets.discard(node)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in folders.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reach = {node: reachable(node) for node in folders}
    return sorted({tuple(sorted((a, b))) for a in folders for b in reach[a] if b != a and a in reach.get(b, set())})


def test_no_import_loops_between_folders():
    """``neurofm/evaluate`` may use ``neurofm.mapping`` or the reverse, never both (the same for every
    sub-package and top-level module): a loop through several modules of a folder is a loop too."""
    modules = _project_modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    for name in graph:  # a package's __init__ importing its own submodules
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    loops = folder_cycles(graph)
    assert not loops, f"folders importing each other (directly or through others): {loops}"


def test_the_folder_check_sees_a_loop_through_a_folder():
    graph = {
        "neurofm.mapping": {"neurofm.evaluate.probe"},
        "neurofm.evaluate.probe": {"neurofm.io"},
        "neurofm.evaluate.transfer": {"neurofm.mapping"},
        "neurofm.io": set(),
    }
    assert folder_cycles(graph) == [("neurofm.evaluate", "neurofm.mapping")]
    graph["neurofm.mapping"] = {"neurofm.classify"}
    assert folder_cycles(graph) == []


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
