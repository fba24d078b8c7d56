import json

import pandas as pd
import pytest

from neurofm import keys
from neurofm.cli import main


def test_inspect_prints_json_summary(capsys, atlas_files):
    assert main(["inspect", str(atlas_files.counts_h5ad), "--column", keys.LIBRARY_LABEL, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_cells"] == 1200 and sum(summary["value_counts"].values()) == 1200


def test_inspect_text_output(capsys, atlas_files):
    assert main(["inspect", str(atlas_files.counts_h5ad)]) == 0
    assert "n_genes: 600" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["missing.h5ad", "cell_metadata.csv"])
def test_bad_file_is_one_line_and_exit_2(capsys, tmp_path, atlas_files, name):
    path = atlas_files.cell_metadata_csv if name == "cell_metadata.csv" else tmp_path / name
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurofm: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    from neurofm.errors import NeurofmError

    with pytest.raises(NeurofmError):
        main(["--debug", "inspect", str(tmp_path / "missing.h5ad")])


def test_check_ids_exit_codes(capsys, atlas_files):
    assert (
        main(["check-ids", str(atlas_files.counts_h5ad), str(atlas_files.cell_metadata_csv), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["best_column"] == keys.CELL_LABEL
    wrong = ["check-ids", str(atlas_files.counts_h5ad), str(atlas_files.cell_metadata_csv)]
    assert main([*wrong, "--obs-name-column", keys.CELL_BARCODE]) == 1
    assert main([*wrong, "--obs-name-column", "nope"]) == 2
    assert "lacks column" in capsys.readouterr().err


def test_atlas_plot_command(tmp_path, atlas_files):
    out = tmp_path / "plots" / "atlas.png"
    args = [str(atlas_files.cell_metadata_csv), str(atlas_files.cluster_csv)]
    args += [str(atlas_files.cluster_annotation_term_csv), "--out", str(out), "--top-k", "4"]
    assert main(["atlas-plot", *args, "--highlight", "2523", "210"]) == 0
    assert out.stat().st_size > 10_000


def test_make_synthetic_command(tmp_path):
    assert (
        main(["make-synthetic", str(tmp_path / "atlas"), "--cells", "300", "--genes", "200", "--seed", "2"])
        == 0
    )
    metadata = pd.read_csv(tmp_path / "atlas" / "cell_metadata.csv")
    assert len(metadata) == 300


def test_usage_errors_and_help(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
