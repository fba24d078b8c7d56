"""The count head's batch covariate and query adaptation, measured (issue 30 item 5).

M1 donor 1 → donor 2 and donor 2 → donor 1 (whole donors), the batch = the 10x library of each nucleus
(the suffix of its barcode: 8 libraries in donor 1, 6 in donor 2; no library is shared by the donors).
Per (direction, seed), the same pre-training budget as ``benchmarks/mapping_heads.py`` (``--epochs``, the
count head's phase ``--count-head-epochs``), on the reference donor only:

- ``no covariate``: the model of ``mapping_heads.py`` (``--models DIR/<ref>_seed<N>``), as ``neurofm map``
  maps today;
- ``covariate, no-batch vector``: pre-trained with ``train.batch_key=library``; the reference cells
  embedded with their libraries, the query cells with the no-batch vector (``neurofm map`` without
  ``--adapt``);
- ``covariate + --adapt``: the same model adapted to the query's libraries (``neurofm.adapt``, its
  defaults), the query embedded with them.

Each with two references built the same way from the reference donor: the default label head
(``features: auto``) and a head on the embedding alone (which shows whether the latent itself transfers
better). Scored on every query cell: macro-F1 of the predicted label at 18 and 127 labels. Resumable,
rows keyed by (direction, seed, method).

    python benchmarks/mapping_adapt.py --models /tmp/bench/models --seeds 0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402
from benchmarks.mapping_heads import LEVELS, scores  # noqa: E402
from benchmarks.reference_mapping import DONORS, pretrain_model  # noqa: E402


def with_library(adata):
    adata.obs["library"] = adata.obs_names.str.split("-", n=1).str[1].astype(str)
    return adata


def rows_for(model_dir: Path, reference_cells, query_cells, adapt: bool, batch_key: str | None) -> dict:
    from neurofm.adapt import adapt_model_dir
    from neurofm.classify import HeadConfig
    from neurofm.mapping import REFERENCE_FILE, REFERENCE_META, ReferenceConfig, add_reference, map_labels

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="neurofm-bench-") as work:
        for name, head in (("default head", HeadConfig()), ("head on embedding", HeadConfig(features="embedding"))):
            copy = Path(work) / name.replace(" ", "_")
            shutil.copytree(model_dir, copy)
            for stale in (REFERENCE_FILE, REFERENCE_META):
                (copy / stale).unlink(missing_ok=True)
            add_reference(copy, reference_cells, ReferenceConfig(label_columns=LEVELS, head=head),
                          progress=False, batch_key=batch_key)  # fmt: skip
            mapped_with, query_key = copy, None
            if adapt:
                started = time.perf_counter()
                mapped_with = adapt_model_dir(copy, query_cells, "library", Path(work) / f"{copy.name}.adapted",
                                              (REFERENCE_FILE, REFERENCE_META))  # fmt: skip
                out["adapt_s"] = round(time.perf_counter() - started, 1)
                query_key = "library"
            frames = map_labels(query_cells, mapped_with, progress=False, batch_key=query_key)[1]
            out[name] = {level: scores(query_cells.obs[level], frames[level]["predicted"]) for level in LEVELS}
    return out


def main(argv: list[str] | None = None) -> None:
    import json

    import anndata as ad

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="mapping_heads.py's models (<ref>_seed<N>/done)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--count-head-epochs", type=int, default=10)
    parser.add_argument("--directions", nargs="+", default=["donor1->donor2", "donor2->donor1"])
    parser.add_argument("--out", default="benchmarks/results/mapping_adapt.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["direction"], r["seed"], r["method"]) for r in rows}

    def save(row: dict) -> None:
        rows.append(row)
        write_report({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "batch": "10x library",
                      "pretraining": {"epochs": args.epochs, "count_head_epochs": args.count_head_epochs},
                      "rows": rows}, out)  # fmt: skip
        f1 = "  ".join(f"{h}: {row[h][LEVELS[0]]['f1']:.3f} / {row[h][LEVELS[1]]['f1']:.3f}"
                       for h in ("default head", "head on embedding"))  # fmt: skip
        print(f"{row['direction']:16s} seed {row['seed']} {row['method']:30s} {f1}", flush=True)

    for direction in args.directions:
        ref, query = direction.split("->")
        reference_cells = with_library(ad.read_h5ad(DONORS[ref]))
        query_cells = with_library(ad.read_h5ad(DONORS[query]))
        for seed in args.seeds:
            plain = Path(args.models) / f"{ref}_seed{seed}" / "done"
            if (direction, seed, "no covariate") not in done and plain.is_file():
                model_dir = Path(plain.read_text().strip())
                save({"direction": direction, "seed": seed, "method": "no covariate",
                      **rows_for(model_dir, reference_cells, query_cells, False, None)})  # fmt: skip
            directory = Path(args.models) / f"{ref}_seed{seed}_library"
            if not (directory / "done").is_file():
                started = time.perf_counter()
                model_dir = pretrain_model(reference_cells, args.epochs, seed, directory, args.count_head_epochs,
                                           batch_key="library")  # fmt: skip
                (directory / "done").write_text(str(model_dir))
                print(f"pre-trained {directory} in {time.perf_counter() - started:.0f} s", flush=True)
            model_dir = Path((directory / "done").read_text().strip())
            for method, adapt in (("covariate, no-batch vector", False), ("covariate + --adapt", True)):
                if (direction, seed, method) not in done:
                    save({"direction": direction, "seed": seed, "method": method,
                          **rows_for(model_dir, reference_cells, query_cells, adapt, "library")})  # fmt: skip


if __name__ == "__main__":
    main()
