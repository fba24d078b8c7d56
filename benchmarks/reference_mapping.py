"""Reference mapping across donors, in one table: the model's label transfer, its ablations and the tools a
user would pick instead, both directions, both label levels, mean ± sd over pre-training seeds (issue 30).

M1 donor 1 → donor 2 and donor 2 → donor 1 (``../shared/data/allen_m1_10x_donor{1,2}_141markers.h5ad``),
whole donors, at two label levels (``subclass_approx``, 18; ``cluster_label``, 127). One model pre-trained
per (direction, seed) on the reference donor only (:func:`pretrain_model`, the same budget for every row,
named in the JSON) serves both levels and every held-out type; the query donor is never seen by
pre-training, the reference or any setting. The rows come from five resumable scripts, each keyed by
(method, direction, level, seed[, held-out type]) and written as they land:

- ``mapping_heads.py``: ``neurofm reference`` + ``neurofm map`` end to end (the default head, chosen on
  reference cells only) and the head on genes / embedding / contextual states / random-weights controls,
  the logistic regression on the genes; ``--only-held-out``: ``unknown`` with a subclass held out;
- ``mapping_query_ari.py``: the query's own clustering (cluster-optimised ARI, ARI at resolution 1);
- ``mapping_unknown_space.py``: the unknown rule with its distances in the model's embedding, a
  random-weights encoder's, the genes' PCA or the genes (what pre-training adds to ``unknown``);
- ``mapping_baselines.py``: CellTypist (majority voting off/on), scVI + logistic, scANVI, Symphony, and
  their held-out rows.

``--run`` runs the five (each skips the rows it already has; at most one CPU-heavy process at a time);
without it the script only reads their JSON. Either way it prints one table and writes
``benchmarks/results/reference_mapping.json``: every method's transfer macro-F1 and accuracy (mean ± sd,
n seeds), its wall seconds to build the reference and to map the whole query, the default's margin over
the strongest baseline, what the model's features add over the same head on the genes, the query ARI,
and ``unknown`` per held-out type for every method with a confidence.

    PYTHONPATH=$PWD python benchmarks/reference_mapping.py --models /tmp/bench/models --seeds 0 1 2 [--run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._bench import write_report  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DONORS = {
    "donor1": DATA / "allen_m1_10x_donor1_141markers.h5ad",
    "donor2": DATA / "allen_m1_10x_donor2_141markers.h5ad",
}
LEVELS = ("subclass_approx", "cluster_label")
HELD_OUT = ("Inh_PVALB", "Exc_L6", "Oligo")  # chosen before any run: inhibitory, excitatory, glia


def sample(adata, n_cells: int, seed: int):
    if adata.n_obs <= n_cells:
        return adata.copy()
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False))
    return adata[rows].copy()


def pretrain_model(reference, epochs: int, seed: int, out_dir: Path, count_head_epochs: int | None = None,
                   batch_key: str | None = None) -> Path:  # fmt: skip
    from neurofm.model import ModelConfig
    from neurofm.tokenizer import TokenizerConfig
    from neurofm.train import TrainConfig, pretrain

    config = replace(TrainConfig(), epochs=epochs, seed=seed, progress=False, device="cpu", batch_key=batch_key)
    if count_head_epochs is not None:  # capped: scVI's rule gives 400 epochs at 10,000 cells
        config = replace(config, count_head_epochs=count_head_epochs)
    result = pretrain(reference, TokenizerConfig(), ModelConfig(), config, out_dir)
    return Path(result.model_dir)


RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = "neurofm map (default head)"
GENES_HEAD = "head mlp 256 on genes"
MODEL_FEATURES = ("head mlp 256 on genes+embedding", "head mlp 256 on genes+context")
UNKNOWN_PREFIX = "unknown (distance or probability, 0.95): "  # the default rule (mapping_heads.UNKNOWN_RULE)
NO_TRANSFER = ("unknown",)  # mapping_heads rows that are not transfer rows start with this


def commands(models: str, seeds: list[int]) -> list[list[str]]:
    """The five scripts, in the order ``--run`` runs them (each resumable)."""
    s = [str(seed) for seed in seeds]
    here = Path(__file__).resolve().parent
    return [
        [sys.executable, str(here / "mapping_heads.py"), "--models", models, "--seeds", *s, "--pretrain"],
        [sys.executable, str(here / "mapping_heads.py"), "--models", models, "--seeds", *s, "--only-held-out",
         "--out", str(RESULTS / "mapping_unknown.json")],
        [sys.executable, str(here / "mapping_query_ari.py"), "--models", models, "--seeds", *s],
        [sys.executable, str(here / "mapping_unknown_space.py"), "--models", models, "--seeds", *s],
        [sys.executable, str(here / "mapping_baselines.py"), "--seeds", *s],
        [sys.executable, str(here / "mapping_baselines.py"), "--seeds", "0", "--held-out", "--levels", LEVELS[0],
         "--out", str(RESULTS / "mapping_baselines_unknown.json")],
    ]  # fmt: skip


def _rows(name: str) -> list[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _stat(values: list[float]) -> dict:
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 4),
            "n": len(values)}  # fmt: skip


def transfer_table() -> list[dict]:
    """One row per (direction, level, method): macro-F1 and accuracy over seeds, wall seconds."""
    raw: dict[tuple, list[dict]] = {}
    for row in _rows("mapping_heads"):
        if row["method"].startswith(NO_TRANSFER):
            continue
        for level in LEVELS:
            if level in row:
                seconds = {"build_s": row.get("reference_cli_s"), "map_s": row.get("map_cli_s")}
                raw.setdefault((row["direction"], level, row["method"], "model / ablation"), []).append(
                    {**row[level], **seconds, "seed": row["seed"]}
                )
    for row in _rows("mapping_baselines"):
        if "held_out" not in row:
            raw.setdefault((row["direction"], row["level"], row["method"], "baseline"), []).append(row)
    table = []
    for (direction, level, method, kind), rows in sorted(raw.items()):
        table.append({"direction": direction, "level": level, "method": method, "kind": kind,
                      "seeds": sorted({r["seed"] for r in rows}),
                      "f1": _stat([r["f1"] for r in rows]), "accuracy": _stat([r["accuracy"] for r in rows]),
                      "build_s": _stat([r.get("build_s") for r in rows]),
                      "map_s": _stat([r.get("map_s") for r in rows])})  # fmt: skip
    return table


def verdicts(table: list[dict]) -> list[dict]:
    """Per (direction, level): the default against the strongest baseline (the tools a user would pick, the
    logistic regression and the same heads on the genes alone), and what the model's features add over the head on the genes."""
    out = []
    for direction, level in sorted({(r["direction"], r["level"]) for r in table}):
        rows = {r["method"]: r for r in table if (r["direction"], r["level"]) == (direction, level)}
        if DEFAULT not in rows:
            continue
        baselines = {m: r["f1"]["mean"] for m, r in rows.items()
                     if (r["kind"] == "baseline" or m.endswith(" on genes")) and r["f1"]["mean"] is not None}  # fmt: skip
        best = max(baselines, key=baselines.get) if baselines else None
        default = rows[DEFAULT]["f1"]
        verdict = {"direction": direction, "level": level, "default_f1": default,
                   "strongest_baseline": best, "strongest_f1": baselines.get(best),
                   "margin": None if best is None else round(default["mean"] - baselines[best], 4)}  # fmt: skip
        genes = rows.get(GENES_HEAD)
        if genes is not None:
            for name in MODEL_FEATURES:
                if name in rows:
                    by_seed = _paired(rows[name], genes, direction, level)
                    verdict[f"adds ({name.removeprefix('head mlp 256 on ')})"] = _stat(by_seed)
        out.append(verdict)
    return out


def _paired(with_model: dict, genes: dict, direction: str, level: str) -> list[float]:
    """Per seed: the head on genes + model features minus the head on the genes alone (same seed)."""
    rows = [r for r in _rows("mapping_heads") if (r["direction"], r.get(level) is not None) == (direction, True)]
    scores = {(r["method"], r["seed"]): r[level]["f1"] for r in rows}
    return [scores[(with_model["method"], seed)] - scores[(genes["method"], seed)]
            for seed in with_model["seeds"] if (genes["method"], seed) in scores]  # fmt: skip


def unknown_table() -> list[dict]:
    """``unknown`` per (direction, held-out type, method): AUROC of the score, the share of held-out and of
    other query cells called unknown (the model: its default rule; a tool: its own threshold), over seeds."""
    raw: dict[tuple, list[dict]] = {}
    for row in _rows("mapping_unknown"):
        if row["method"].startswith(UNKNOWN_PREFIX):
            raw.setdefault((row["direction"], row["held_out"], "neurofm map (default rule)"), []).append(
                {"auroc": row["auroc_score"], "held": row["held_out_unknown"], "others": row["others_unknown"]})
    for row in _rows("mapping_baselines_unknown"):
        if "held_out" in row:
            raw.setdefault((row["direction"], row["held_out"], row["method"]), []).append(
                {"auroc": row["auroc"], "held": row["held_out_below_threshold"],
                 "others": row["others_below_threshold"]})  # fmt: skip
    return [{"direction": d, "held_out": h, "method": m, "auroc": _stat([r["auroc"] for r in rows]),
             "held_out_unknown": _stat([r["held"] for r in rows]), "others_unknown": _stat([r["others"] for r in rows])}
            for (d, h, m), rows in sorted(raw.items())]  # fmt: skip


def unknown_space_table() -> list[dict]:
    """``mapping_unknown_space.py``: the same unknown rule with distances in the model's embedding, a
    random-weights encoder's, the genes' PCA or the genes: what pre-training adds to ``unknown``."""
    raw: dict[tuple, list[dict]] = {}
    for row in _rows("mapping_unknown_space"):
        raw.setdefault((row["direction"], row["held_out"], row["space"]), []).append(row)
    return [{"direction": d, "held_out": h, "space": sp, "auroc": _stat([r["auroc"] for r in rows]),
             "held_out_unknown": _stat([r["held_out_unknown"] for r in rows]),
             "others_unknown": _stat([r["others_unknown"] for r in rows])} for (d, h, sp), rows in sorted(raw.items())]  # fmt: skip


def query_ari_table() -> list[dict]:
    raw: dict[tuple, list[dict]] = {}
    for row in _rows("mapping_query_ari"):
        raw.setdefault((row["direction"], row["method"]), []).append(row)
    return [{"direction": d, "method": m, "ari_optimised": _stat([r["ari_optimised"] for r in rows]),
             "ari_res1": _stat([r["ari_res1_mean"] for r in rows])} for (d, m), rows in sorted(raw.items())]  # fmt: skip


def _show(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat["n"] > 1 else "") + f" ({stat['n']})"


def print_tables(report: dict) -> None:
    for direction, level in sorted({(r["direction"], r["level"]) for r in report["transfer"]}):
        print(f"\n### {direction}, {level}\n")
        print("| method | macro-F1 (n seeds) | accuracy | build s | map s |\n|---|---|---|---|---|")
        rows = [r for r in report["transfer"] if (r["direction"], r["level"]) == (direction, level)]
        for r in sorted(rows, key=lambda r: -(r["f1"]["mean"] or 0)):
            print(f"| {r['method']} | {_show(r['f1'])} | {_show(r['accuracy'])} | {_show(r['build_s'], 0)} | "
                  f"{_show(r['map_s'], 0)} |")  # fmt: skip
    print("\n| direction | level | default | strongest baseline | margin | model features add |\n|---|---|---|---|---|---|")
    for v in report["verdicts"]:
        adds = "; ".join(f"{k.removeprefix('adds ')} {_show(s)}" for k, s in v.items() if k.startswith("adds"))
        print(f"| {v['direction']} | {v['level']} | {_show(v['default_f1'])} | {v['strongest_baseline']} "
              f"{v['strongest_f1']:.3f} | {v['margin']:+.3f} | {adds} |")  # fmt: skip
    print("\n| direction | held out | method | AUROC | held-out unknown | others unknown |\n|---|---|---|---|---|---|")
    for r in report["unknown"]:
        print(f"| {r['direction']} | {r['held_out']} | {r['method']} | {_show(r['auroc'])} | "
              f"{_show(r['held_out_unknown'])} | {_show(r['others_unknown'])} |")  # fmt: skip
    print("\n| direction | held out | distance in | AUROC | held-out unknown | others unknown |\n|---|---|---|---|---|---|")
    for r in report["unknown_space"]:
        print(f"| {r['direction']} | {r['held_out']} | {r['space']} | {_show(r['auroc'])} | "
              f"{_show(r['held_out_unknown'])} | {_show(r['others_unknown'])} |")  # fmt: skip
    print("\n| direction | embedding | query ARI optimised | ARI at resolution 1 |\n|---|---|---|---|")
    for r in report["query_ari"]:
        print(f"| {r['direction']} | {r['method']} | {_show(r['ari_optimised'])} | {_show(r['ari_res1'])} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="/tmp/bench/models", help="<ref>_seed<N>/ model directories")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run", action="store_true", help="run the five scripts first (each resumable)")
    parser.add_argument("--out", default=str(RESULTS / "reference_mapping.json"))
    args = parser.parse_args(argv)
    ran = []
    if args.run:
        for command in commands(args.models, args.seeds):
            started = time.perf_counter()
            subprocess.run(command, check=True)
            ran.append({"command": " ".join(command[1:]), "seconds": round(time.perf_counter() - started)})
    sources = {name: json.loads((RESULTS / f"{name}.json").read_text()).get("command")
               for name in ("mapping_heads", "mapping_unknown", "mapping_query_ari", "mapping_baselines",
                            "mapping_baselines_unknown", "mapping_unknown_space") if (RESULTS / f"{name}.json").is_file()}  # fmt: skip
    pretraining = json.loads((RESULTS / "mapping_heads.json").read_text()).get("pretraining") if sources else None
    transfer = transfer_table()
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "pretraining": pretraining,
              "sources": sources, "ran": ran, "transfer": transfer, "verdicts": verdicts(transfer),
              "unknown": unknown_table(), "unknown_space": unknown_space_table(), "query_ari": query_ari_table()}  # fmt: skip
    print_tables(report)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
