"""The README's quick start, run as written on the outputs of a main job on the built-in data.

The main job itself (README "Set up", command 1) runs here with the test suite's size flags (a smaller
built-in atlas, 2 epochs); every quick-start line then runs unchanged, in the same working directory.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import anndata as ad
import pytest

import run
from neurofm import cli, keys

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = [
    "--set", "default_data.n_cells=3000",
    "--set", "default_data.n_genes=300",
    "--set", "default_data.crop={n_cells: 400, n_genes: 200}",
    "--set", "default_data.train.epochs=2",
    "--set", "train.count_head_epochs=5",
    "--set", "evaluate.baselines=[pca]",
    "--set", "evaluate.label_efficiency_draws=2",
    "--set", "evaluate.label_efficiency_shots=[5,all]",
]  # fmt: skip


def quick_start_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the README's "Quick start" section."""
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_the_quick_start_has_commands_and_code():
    languages = [language for language, _ in quick_start_blocks()]
    assert "bash" in languages and "python" in languages


@pytest.mark.slow
def test_every_quick_start_line_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run.main(SMALL) == 0  # README command 1's `python run.py`, at test size
    for language, code in quick_start_blocks():
        if language == "python":
            namespace: dict = {}
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
            adata = namespace["adata"]
            assert keys.EMBEDDING in adata.obsm and "leiden" in adata.obs
            assert "neurofm_subtype" in adata.obs and keys.MAP_PARAMS in adata.uns  # the map_query line
            continue
        for line in code.splitlines():
            command = shlex.split(line, comments=True)
            if not command or command[0] == ".":  # `. .venv/bin/activate`: this interpreter is the venv
                continue
            if command[:2] == ["python", "run.py"]:
                assert run.main([*command[2:], *SMALL]) == 0, line
            elif command[0] == "neurofm":
                assert cli.main(command[1:]) == 0, line
            else:
                raise AssertionError(f"the test does not know how to run: {line}")
    embedded = ad.read_h5ad(tmp_path / "outputs" / "prepared.neurofm.h5ad")
    assert embedded.obsm[keys.EMBEDDING].shape[0] == embedded.n_obs
    mapped = ad.read_h5ad(tmp_path / "outputs" / "prepared.mapped.h5ad")
    assert {"neurofm_subtype", "neurofm_subtype_score"} <= set(mapped.obs)
    assert "neurofm: error" not in capsys.readouterr().err
