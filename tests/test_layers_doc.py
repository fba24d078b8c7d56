"""docs/development.md's picture of the layers is true: no module of ``neurofm/`` imports one drawn above it,
and every module (or folder) is drawn."""

from __future__ import annotations

import re

from tests.test_package_structure import ROOT, _imports, _project_modules


def _rows() -> list[list[str]]:
    """The picture's rows inside the ``neurofm/`` box, top first, as the names they list."""
    text = (ROOT / "docs" / "development.md").read_text()
    picture = text.split("**The layers, in one picture.**", 1)[1].split("```", 2)[1]
    rows = []
    for line in picture.splitlines():
        if line.lstrip().startswith("│"):
            listed = line.strip().strip("│").strip()
            names = re.split(r"\s{3,}", listed, maxsplit=1)[0]  # the names, then the row's comment
            rows.append([name.rstrip("/") for name in re.split(r"\s*[·─]\s*", names) if name])
    return rows


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_the_layers_picture_matches_the_import_graph():
    rows = _rows()
    height = {name: len(rows) - index for index, row in enumerate(rows) for name in row}
    modules = _project_modules()
    science = {name: path for name, path in modules.items() if name.startswith("neurofm.")}
    undrawn = sorted({_layer(name) for name in science} - set(height))
    assert not undrawn, f"modules missing from docs/development.md's picture: {undrawn}"
    upward = sorted(
        f"{name} -> {target}"
        for name, path in science.items()
        for target in _imports(path, name, set(modules))
        if target.startswith("neurofm.") and height[_layer(target)] > height[_layer(name)]
    )
    assert not upward, f"imports of a layer drawn higher in docs/development.md: {upward}"
