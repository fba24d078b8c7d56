"""`neurofm embed` and the registered pyfunc: a new file with the embeddings, the input untouched, the
same numbers through the library call, the MLflow pyfunc and a served REST endpoint; bad input refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pytest

from neurofm import keys, tracking
from neurofm.cli import main
from neurofm.embedding import embed, embed_matrix, random_encoder_like
from neurofm.model import ModelConfig, load_pretrained
from neurofm.tokenizer import ExpressionTokenizer
from tests.test_tokenizer import synthetic_counts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    adata = synthetic_counts(n_cells=80, n_genes=30)
    adata.var["gene_symbol"] = [f"Sym{i}" for i in range(30)]
    tokenizer = ExpressionTokenizer().fit(adata)
    config = ModelConfig(n_genes=30, n_bins=20, d_model=16, n_heads=2, n_layers=1, ffn_dim=32, max_tokens=8)
    directory = tmp_path_factory.mktemp("model") / "best"
    random_encoder_like(config, seed=3).save_pretrained(directory, tokenizer)
    return directory


@pytest.fixture()
def cells_file(tmp_path) -> Path:
    adata = synthetic_counts(n_cells=50, n_genes=30, seed=7)
    adata.var["symbol"] = [f"SYM{i}" for i in range(30)]
    adata.var_names = [f"g{i}" for i in range(30)]  # named by neither the model's IDs nor its symbols
    path = tmp_path / "mine.h5ad"
    adata.write_h5ad(path)
    return path


def test_embed_command_writes_a_new_file_and_never_touches_the_input(
    model_dir, cells_file, tmp_path, file_sha256, capsys
):
    before = file_sha256(cells_file)
    out = tmp_path / "out" / "mine.embedded.h5ad"
    status = main(
        ["embed", str(cells_file), "--out", str(out), "--model", str(model_dir), "--gene-col", "symbol"]
    )
    assert status == 0
    assert file_sha256(cells_file) == before
    printed = capsys.readouterr().out
    assert "30 of the model's 30 found" in printed
    written = ad.read_h5ad(out)
    original = ad.read_h5ad(cells_file)
    assert (written.X != original.X).nnz == 0 and list(written.obs_names) == list(original.obs_names)
    record = written.uns[keys.EMBEDDING_PARAMS]
    assert record["gene_match"]["data_key"] == "var['symbol']" and record["model"] == str(model_dir)
    # the same numbers as the library call
    in_memory = ad.read_h5ad(cells_file)
    embed(in_memory, str(model_dir), gene_col="symbol", progress=False)
    np.testing.assert_allclose(written.obsm[keys.EMBEDDING], in_memory.obsm[keys.EMBEDDING], atol=1e-6)
    assert not list(out.parent.glob(".*tmp"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "only 0 of the model's 30 genes"),  # no overlap by var_names
        (["--gene-col", "nope"], "gene column 'nope' is not in"),
        (["--gene-col", "symbol", "--min-gene-overlap", "2"], "min_gene_overlap"),
    ],
)
def test_embed_command_bad_input_is_one_line(model_dir, cells_file, tmp_path, capsys, extra, message):
    out = tmp_path / "o.h5ad"
    status = main(["embed", str(cells_file), "--out", str(out), "--model", str(model_dir), *extra])
    error = capsys.readouterr().err.strip()
    assert status == 2 and error.startswith("neurofm: error:") and message in error
    assert len(error.splitlines()) == 1 and not out.exists()


def test_embed_command_refuses_non_h5ad_and_writing_over_its_input(model_dir, cells_file, tmp_path, capsys):
    text = tmp_path / "cells.csv"
    text.write_text("a,b\n1,2\n")
    assert main(["embed", str(text), "--out", str(tmp_path / "o.h5ad"), "--model", str(model_dir)]) == 2
    assert main(["embed", str(cells_file), "--out", str(cells_file), "--model", str(model_dir)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "is the input file" in errors[1]
    assert main(["embed", str(cells_file), "--out", str(tmp_path / "x.h5ad"), "--model", str(tmp_path)]) == 2


def test_registered_pyfunc_has_a_signature_and_predicts_the_embed_numbers(model_dir, tmp_path):
    with mlflow.start_run(experiment_id=tracking.ensure_experiment("pyfunc-signature")):
        registered = tracking.log_and_register_model(model_dir, "neurofm-signature-test")
    info = mlflow.models.get_model_info(registered.uri)
    assert info.signature is not None
    model, tokenizer = load_pretrained(model_dir)
    assert [column.name for column in info.signature.inputs.inputs] == list(tokenizer.gene_ids)
    example = _input_example(registered.uri)
    assert example.shape == (3, 30)
    pyfunc = mlflow.pyfunc.load_model(registered.uri)
    predicted = np.asarray(pyfunc.predict(example))
    cells = ad.AnnData(X=example.to_numpy(dtype=np.float32))
    cells.var_names = list(example.columns)
    expected = embed_matrix(model, tokenizer, cells, device="cpu", progress=False)
    np.testing.assert_allclose(predicted, expected, atol=1e-6)


def _input_example(uri: str):
    local = mlflow.artifacts.download_artifacts(uri)
    return mlflow.models.Model.load(local).load_input_example(local)


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_same_embeddings(model_dir, tmp_path):
    with mlflow.start_run(experiment_id=tracking.ensure_experiment("pyfunc-serve")):
        registered = tracking.log_and_register_model(model_dir, "neurofm-serve-test")
    example = _input_example(registered.uri)
    port = _free_port()
    # the server starts uvicorn by name: the environment's bin directory must be on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PATH": path}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            registered.uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.log").open("w"),
        start_new_session=True,
    )
    try:
        body = json.dumps({"dataframe_split": json.loads(example.to_json(orient="split"))}).encode()
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and answer is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
            except OSError:
                log_tail = (tmp_path / "serve.log").read_text()[-800:]
                assert server.poll() is None, f"the model server exited: {log_tail}"
                time.sleep(1)
        assert answer is not None, "the model server did not answer within 120 s"
        served = np.asarray(answer["predictions"], dtype=np.float32)
        local = np.asarray(mlflow.pyfunc.load_model(registered.uri).predict(example), dtype=np.float32)
        np.testing.assert_allclose(served, local, atol=1e-5)
        assert served.shape == (3, 16)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
