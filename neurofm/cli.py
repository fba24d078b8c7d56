"""The ``neurofm`` console command: dataset reports without a pipeline.

    neurofm inspect FILE [--column C] [--json]
    neurofm check-ids FILE METADATA_CSV [--obs-name-column C] [--barcode-column C] [--json]
    neurofm atlas-plot METADATA_CSV CLUSTER_CSV ANNOTATION_CSV --out PNG [--top-k K] [--highlight ID ...]
    neurofm make-synthetic OUT_DIR [--cells N] [--genes G] [--seed S]
    neurofm embed IN.h5ad --out OUT.h5ad [--model URI_OR_DIR] [--gene-col C] [--min-gene-overlap F]
    neurofm convert IN.h5ad OUT_DIR [--genes FILE] [--shard-size N] [--seed S] [--metadata CSV --clusters ID ...]
    neurofm convert A.h5ad[:batch=COL,genes=COL] B.h5ad … OUT_DIR [--batch-col C] [--gene-col C]
    neurofm reference MODEL_DIR CELLS.h5ad --labels COL[,COL…] [--max-cells N] [--unknown-quantile Q]
    neurofm map QUERY.h5ad --out OUT.h5ad [--model URI_OR_DIR] [--labels COL[,COL…]] [--gene-col C]

A user error prints one line, ``neurofm: error: <problem>; <fix>``, and exits with status 2 (``--debug``
shows the traceback instead). ``check-ids`` exits 1 when no metadata column matches the obs_names.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neurofm import __version__, keys
from neurofm.config import MIN_GENE_OVERLAP as DEFAULT_MIN_GENE_OVERLAP
from neurofm.errors import NeurofmError
from neurofm.pooling import DEFAULT_POOLING, POOLINGS


def _print_mapping(values: dict[str, Any], indent: str = "") -> None:
    for name, value in values.items():
        if isinstance(value, dict):
            print(f"{indent}{name}:")
            _print_mapping(value, indent + "  ")
        elif isinstance(value, list) and len(value) > 12:
            print(f"{indent}{name}: {value[:12]} … ({len(value)} in all)")
        else:
            print(f"{indent}{name}: {value}")


def _inspect(args: argparse.Namespace) -> int:
    from neurofm.data.reports import summarize
    from neurofm.io import read_h5ad

    adata = read_h5ad(args.file, backed=True)
    try:
        summary = summarize(adata, path=args.file, value_counts_column=args.column)
    finally:
        adata.file.close()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_mapping(summary)
    return 0


def _check_ids(args: argparse.Namespace) -> int:
    from neurofm.data.reports import check_ids

    result = check_ids(
        args.file, args.metadata, obs_name_column=args.obs_name_column, barcode_column=args.barcode_column
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_mapping(result)
    if result["best_column"] is None:
        print(
            "neurofm: no metadata column matches the obs_names; name the right column with --obs-name-column",
            file=sys.stderr,
        )
        return 1
    return 0


def _atlas_plot(args: argparse.Namespace) -> int:
    from neurofm.data.reports import atlas_plot

    path = atlas_plot(
        args.metadata,
        args.cluster,
        args.annotation,
        args.out,
        top_k=args.top_k,
        highlight_clusters=args.highlight,
    )
    print(path)
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    from neurofm.data.synthetic import write_synthetic_atlas

    files = write_synthetic_atlas(args.out_dir, n_cells=args.cells, n_genes=args.genes, seed=args.seed)
    for name, path in files.as_dict().items():
        print(f"{name}: {path}")
    return 0


# ---- embed: a released model applied to the user's own cells ------------------------------------
def _embed(args: argparse.Namespace) -> int:
    from neurofm.embedding import embed_file

    record = embed_file(
        args.file,
        args.out,
        model=args.model,
        gene_col=args.gene_col,
        min_gene_overlap=args.min_gene_overlap,
        unobserved=args.unobserved,
        pooling=args.pooling,
        batch_size=args.batch_size,
        device=args.device,
    )
    match = record["gene_match"]
    print(
        f"genes: {match['n_found']} of the model's {match['n_model_genes']} found among the data's "
        f"{match['n_data_genes']} ({match['overlap']:.1%}, by {match['data_key']})"
    )
    print(
        f"model: {record['model']}"
        + (f" (version {record['model_version']})" if "model_version" in record else "")
    )
    print(f"wrote {args.out}: obsm['{record['key_added']}'] for {record['n_cells']} cells")
    return 0


# --- convert (cell store) ---------------------------------------------------------------------------------
def _read_gene_list(value: str) -> list[str]:
    """Gene IDs from a file (one per line) or a comma-separated list."""
    from pathlib import Path

    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if "," in value or not path.suffix:
        return [gene.strip() for gene in value.split(",") if gene.strip()]
    raise NeurofmError(f"gene list file {value} does not exist; pass a file of gene IDs or a comma list")


def _convert(args: argparse.Namespace) -> int:
    from neurofm.data.store import CellStore, Selection, convert

    if len(args.files) > 1 or args.batch_col or args.gene_col or "=" in args.files[0].rpartition(":")[2]:
        return _convert_many(args)
    args.file = args.files[0]
    if args.clusters and not args.metadata:
        raise NeurofmError("--clusters needs --metadata CELL_METADATA_CSV to look the cells' clusters up")
    selection = Selection(
        genes=_read_gene_list(args.genes) if args.genes else None,
        metadata_csv=args.metadata,
        cluster_ids=args.clusters or None,
        region=args.region,
    )
    manifest = convert(
        args.file,
        args.out_dir,
        selection=selection,
        shard_size=args.shard_size,
        seed=args.seed,
        layer=args.layer,
        progress=True,
    )
    if args.verify:
        CellStore(args.out_dir, verify=True)
    print(
        f"{args.out_dir}: {manifest['n_cells']} cells × {manifest['n_genes']} genes in "
        f"{len(manifest['shards'])} shards"
    )
    return 0


def _convert_many(args: argparse.Namespace) -> int:
    from neurofm.data.store import CellStore, InputFile, convert_many

    if args.genes or args.metadata or args.clusters or args.region:
        raise NeurofmError(
            "--genes, --metadata, --clusters and --region select cells/genes of one input file; convert one "
            "file with them, or several files without them"
        )
    inputs = [InputFile.parse(spec, args.batch_col, args.gene_col) for spec in args.files]
    manifest = convert_many(
        inputs, args.out_dir, shard_size=args.shard_size, seed=args.seed, layer=args.layer, progress=True
    )
    if args.verify:
        CellStore(args.out_dir, verify=True)
    for record in manifest["datasets"]:
        genes = record["genes"]
        print(
            f"{record['name']}: {record['n_cells']} cells, {record['n_measured']} genes measured "
            f"({genes['n_matched']} matched by {genes['matched_by']}, {genes['n_added']} new, "
            f"{genes['n_duplicates_dropped']} duplicates dropped); batch: {record['batch_column'] or 'the dataset'}"
        )
    print(
        f"{args.out_dir}: {manifest['n_cells']} cells × {manifest['n_genes']} genes (union) from "
        f"{len(manifest['datasets'])} files in {len(manifest['shards'])} shards"
    )
    return 0


def _add_convert(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="write a pre-shuffled, sharded cell store for streaming pre-training (one or several files)",
        description="One file: its cells (with an optional selection). Several files: one store of the union "
        "of their genes (matched by ID or symbol as neurofm embed does; mouse to human by upper-cased symbol, "
        "an approximate orthology), their cells shuffled together, obs['dataset'] and obs['batch'] per cell. "
        "Per file options: FILE.h5ad:batch=COL,genes=COL,name=NAME (else --batch-col/--gene-col).",
    )
    convert.add_argument(
        "files",
        nargs="+",
        metavar="IN.h5ad",
        help="input .h5ad file(s) (raw counts; read backed, in row blocks), each optionally "
        "FILE:batch=COL,genes=COL,name=NAME",
    )
    convert.add_argument("out_dir", help="output store directory (new, empty, or an unfinished store)")
    convert.add_argument(
        "--batch-col", help="obs column of each file's batches (default: the file's name is the batch)"
    )
    convert.add_argument("--gene-col", help="var column naming each file's genes (default: var_names)")
    convert.add_argument("--genes", help="gene IDs to keep, in order: a file (one per line) or a comma list")
    convert.add_argument("--shard-size", type=int, default=65536, help="cells per shard (default 65536)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the cell permutation (default 0)")
    convert.add_argument("--layer", help="read counts from layers[LAYER] (default: layers['counts'] or X)")
    convert.add_argument("--metadata", help="cell_metadata.csv for the cluster subset (joined on cell_label)")
    convert.add_argument("--clusters", nargs="*", default=[], metavar="ID", help="cluster aliases to keep")
    convert.add_argument("--region", help=f"keep cells whose obs['{keys.REGION}'] equals this value")
    convert.add_argument("--verify", action="store_true", help="check every shard's SHA-256 afterwards")
    convert.set_defaults(handler=_convert)


# --- end convert -------------------------------------------------------------------------------------------


# --- reference mapping ---------------------------------------------------------------------------------
def _columns(value: str | None) -> list[str]:
    return [column.strip() for column in value.split(",") if column.strip()] if value else []


def _reference(args: argparse.Namespace) -> int:
    from neurofm.io import read_h5ad
    from neurofm.mapping import ReferenceConfig, add_reference
    from neurofm.model import run_model_dir

    columns = _columns(args.labels)
    if not columns:
        raise NeurofmError("--labels names no column; pass the obs column(s) to transfer, e.g. --labels subclass")
    config = ReferenceConfig(
        label_columns=tuple(columns), max_cells=args.max_cells,
        **({} if args.unknown_quantile is None else {"unknown_quantile": args.unknown_quantile}),
    )
    model_dir = run_model_dir(Path(args.model_dir))
    cells = read_h5ad(args.cells)
    reference = add_reference(model_dir, cells, config, source=str(args.cells), batch_key=args.batch_col)
    for column, ref in reference.columns.items():
        print(f"{column}: {len(ref.classes)} labels, classifier {ref.classifier_name}")
    print(f"stored a reference of {reference.n_cells} cells in {model_dir}")
    return 0


def _map(args: argparse.Namespace) -> int:
    from neurofm.mapping import map_file

    record = map_file(
        args.file,
        args.out,
        model=args.model,
        label_columns=_columns(args.labels) or None,
        gene_col=args.gene_col,
        min_gene_overlap=args.min_gene_overlap,
        unobserved=args.unobserved,
        batch_size=args.batch_size,
        device=args.device,
        batch_key=args.batch_col,
        adapt=args.adapt,
    )
    match = record["gene_match"]
    print(
        f"genes: {match['n_found']} of the model's {match['n_model_genes']} found among the data's "
        f"{match['n_data_genes']} ({match['overlap']:.1%}, by {match['data_key']})"
    )
    for column in record["label_columns"]:
        counts = record["counts"][column]
        top = ", ".join(f"{label} {n}" for label, n in list(counts.items())[:6])
        print(f"obs['neurofm_{column}']: {len(counts)} labels ({top}{' …' if len(counts) > 6 else ''}); "
              f"unknown {record['unknown_share'][column]:.1%}")  # fmt: skip
    if record.get("adapted_model"):
        print(f"adapted model (the query's batches fit; the model given was not changed): {record['adapted_model']}")
    print(f"wrote {args.out}: {record['n_cells']} cells mapped in {record['seconds']:.1f} s")
    return 0


def _add_mapping(commands) -> None:
    reference = commands.add_parser(
        "reference", help="store a labelled reference in a model directory (for neurofm map)"
    )
    reference.add_argument("model_dir", help="model directory (or a pretrain run directory)")
    reference.add_argument("cells", metavar="CELLS.h5ad", help="labelled raw counts: the reference cells")
    reference.add_argument("--labels", required=True, help="obs column(s) to transfer, comma-separated")
    reference.add_argument("--max-cells", type=int, default=200_000, help="a seeded sample above this many")
    reference.add_argument(
        "--unknown-quantile", type=float, default=None,
        help="the share of held-out reference cells the unknown rule keeps (default: reference.unknown_quantile "
        "in docs/configuration.md)",
    )  # fmt: skip
    reference.add_argument(
        "--batch-col", default=None,
        help="obs column of each cell's batch, for a model with a batch covariate (default: the model's own)",
    )  # fmt: skip
    reference.set_defaults(handler=_reference)

    mapper = commands.add_parser("map", help="map your cells onto a model's reference and transfer its labels")
    mapper.add_argument("file", metavar="QUERY.h5ad", help="raw counts (layers['counts'] if present, else X)")
    mapper.add_argument("--out", required=True, metavar="OUT.h5ad", help="new file: the input + the mapping")
    mapper.add_argument(
        "--model", default=None, help="model directory or MLflow URI (default models:/neurofm-encoder@champion)"
    )
    mapper.add_argument("--labels", help="reference label column(s) to transfer (default: all)")
    mapper.add_argument("--gene-col", default=None, help="var column naming the genes (default var_names)")
    mapper.add_argument(
        "--min-gene-overlap", type=float, default=DEFAULT_MIN_GENE_OVERLAP, help="share of model genes required"
    )
    mapper.add_argument("--unobserved", choices=["exclude", "zero"], default="exclude")
    mapper.add_argument("--batch-size", type=int, default=256, help="cells pooled at a time")
    mapper.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    mapper.add_argument(
        "--batch-col", default=None,
        help="obs column of each query cell's batch, for a model pre-trained with a batch covariate "
        "(default: none, every cell gets the no-batch vector)",
    )  # fmt: skip
    mapper.add_argument(
        "--adapt", action="store_true",
        help="fit the query's new batches (--batch-col, else the whole query as one) on its counts before "
        "mapping; the adapted model goes to OUT.adapted/, never into the model",
    )  # fmt: skip
    mapper.set_defaults(handler=_map)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurofm", description="neurofm dataset reports and utilities.")
    parser.add_argument("--version", action="version", version=f"neurofm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="summarise an .h5ad (X is not loaded)")
    inspect.add_argument("file", help=".h5ad file")
    inspect.add_argument("--column", help="obs column whose value counts to show, e.g. subtype")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=_inspect)

    check = commands.add_parser("check-ids", help="overlap of metadata cell labels / barcodes with obs_names")
    check.add_argument("file", help=".h5ad file")
    check.add_argument("metadata", metavar="METADATA_CSV", help="cell_metadata.csv")
    check.add_argument("--obs-name-column", default=keys.CELL_LABEL, help="metadata column expected to match")
    check.add_argument("--barcode-column", default=keys.CELL_BARCODE, help="metadata barcode column")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=_check_ids)

    plot = commands.add_parser("atlas-plot", help="cells at metadata x/y coloured by top-K base clusters")
    plot.add_argument("metadata", metavar="METADATA_CSV", help="cell_metadata.csv (cluster_alias, x, y)")
    plot.add_argument("cluster", metavar="CLUSTER_CSV", help="cluster.csv (cluster_alias, label)")
    plot.add_argument("annotation", metavar="ANNOTATION_CSV", help="cluster_annotation_term.csv")
    plot.add_argument("--out", required=True, help="output PNG path")
    plot.add_argument("--top-k", type=int, default=10, help="number of base clusters to colour (default 10)")
    plot.add_argument(
        "--highlight", type=int, nargs="*", default=[], metavar="ID", help="cluster IDs to circle"
    )
    plot.set_defaults(handler=_atlas_plot)

    synthetic = commands.add_parser("make-synthetic", help="write the synthetic atlas-shaped dataset")
    synthetic.add_argument("out_dir", help="output directory")
    synthetic.add_argument("--cells", type=int, default=1200, help="number of cells (default 1200)")
    synthetic.add_argument("--genes", type=int, default=600, help="number of genes (default 600)")
    synthetic.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synthetic.set_defaults(handler=_make_synthetic)

    embed = commands.add_parser("embed", help="embed your cells with a pre-trained model into a new .h5ad")
    embed.add_argument("file", metavar="IN.h5ad", help="raw counts (layers['counts'] if present, else X)")
    embed.add_argument(
        "--out", required=True, metavar="OUT.h5ad", help="new file: the input + obsm['X_neurofm']"
    )
    embed.add_argument(
        "--model",
        default=None,
        help="model directory or MLflow URI (default models:/neurofm-encoder@champion)",
    )
    embed.add_argument("--gene-col", default=None, help="var column naming the genes (default var_names)")
    embed.add_argument(
        "--min-gene-overlap", type=float, default=DEFAULT_MIN_GENE_OVERLAP,
        help=f"share of model genes required (default {DEFAULT_MIN_GENE_OVERLAP})",
    )
    embed.add_argument(
        "--unobserved",
        choices=["exclude", "zero"],
        default="exclude",
        help="model genes absent from the data: left out (default) or treated as zero counts",
    )
    embed.add_argument("--pooling", choices=list(POOLINGS), default=DEFAULT_POOLING)
    embed.add_argument("--batch-size", type=int, default=256, help="cells pooled at a time")
    embed.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    embed.set_defaults(handler=_embed)
    _add_convert(commands)
    _add_mapping(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``neurofm`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version or a usage error (argparse already printed it)
        return int(exit_.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return args.handler(args)
    except NeurofmError as error:
        if args.debug:
            raise
        print(f"neurofm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
