"""One human-readable report of an evaluation: ``report.md`` (figures by relative path) and
``report.html`` (the same content, figures embedded as base64 — a single self-contained file)."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurofm.io import ensure_writable_dir, write_text

if TYPE_CHECKING:
    from neurofm.evaluate.results import EvaluationResult

Block = tuple  # ("heading", level, text) | ("paragraph", text) | ("bullets", [text]) |
# ("table", header, rows) | ("images", [(path, caption)])

# (column in baselines.csv, header in the report, sd column or None)
_HEADLINE_COLUMNS = [
    ("embedding_dim", "dims", None),
    ("probe_classifier", "probe picked", None),
    ("probe_f1", "macro-F1", None),
    ("probe_accuracy", "accuracy", None),
    ("probe_auc", "ROC-AUC", None),
    ("probe_cv_f1_mean", "CV macro-F1", "probe_cv_f1_sd"),
    ("fewshot5_f1", "5-shot macro-F1", "fewshot5_f1_sd"),
    ("ari_optimised", "ARI (optimised)", None),
    ("nmi_optimised", "NMI (optimised)", None),
    ("ari_res1_mean", "ARI (res 1)", "ari_res1_sd"),
    ("n_clusters_res1_mean", "clusters (res 1)", None),
    ("silhouette", "silhouette", None),
]

_METHOD_FIGURES = [
    ("confusion_matrix_plot", "probe confusion matrix (test cells)"),
    ("roc_curve", "probe ROC curve (test cells)"),
    ("pca_2d", "first two principal components of the embedding"),
    ("tsne", "t-SNE coloured by label"),
    ("umap_by_label", "UMAP coloured by label"),
    ("umap_by_cluster", "UMAP coloured by Leiden cluster"),
    ("cluster_sizes_purity", "Leiden cluster sizes and purity"),
    ("cluster_confusion_plot", "label vs cluster-majority label"),
]


def _format(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value.is_integer() and abs(value) >= 1 and digits != 3:
            return str(int(value))
        return f"{value:.{digits}f}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def _mean_sd(mean: Any, sd: Any) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "–"
    if sd is None or (isinstance(sd, float) and not math.isfinite(sd)):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {sd:.3f}"


def _blocks(result: EvaluationResult, report_dir: Path, extra: Mapping[str, Any] | None) -> list[Block]:
    """Every block of the report, in order: title (and the "Model" table from ``extra``), data and
    protocol, the baselines table, the comparison with the strongest baseline, label efficiency,
    per-method figures (linked relative to ``report_dir``) and notes."""
    return (
        _title_blocks(extra)
        + _protocol_blocks(result)
        + _baselines_blocks(result)
        + _comparison_sentences(result)
        + _label_efficiency_blocks(result, report_dir)
        + _figure_blocks(result, report_dir)
        + _notes_blocks()
    )


def _title_blocks(extra: Mapping[str, Any] | None) -> list[Block]:
    """The title, when the report was generated, and a "Model" table of ``extra`` when given."""
    blocks: list[Block] = [
        ("heading", 1, "neurofm evaluation report"),
        (
            "paragraph",
            f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Every method is "
            "scored with the same probe, clustering and split, in the same run.",
        ),
    ]
    if extra:
        blocks += [
            ("heading", 2, "Model"),
            ("table", ["item", "value"], [[str(k), _format(v)] for k, v in extra.items()]),
        ]
    return blocks


def _protocol_blocks(result: EvaluationResult) -> list[Block]:
    """ "Data and protocol": the cells and classes, the probe and its split, the clustering, the methods."""
    settings = result.settings
    probe = settings["probe"]
    classes = ", ".join(f"{name} ({count})" for name, count in result.class_counts.items())
    return [
        ("heading", 2, "Data and protocol"),
        (
            "bullets",
            [
                f"{sum(result.class_counts.values())} cells; classes: {classes}",
                "Probe: the same classifier menu for every method — logistic regression on the raw and "
                f"on the z-scored embedding (C in {list(probe['C_grid'])}) and k-nearest neighbours "
                f"(k in {list(probe['k_grid'])}) — picked by inner cross-validation on the labelled "
                "(training) cells only (leave-one-out when there are at most "
                f"{probe['loo_max_cells']} of them); {_split_text(result)}",
                _clustering_text(result),
                "Methods: " + ", ".join(result.methods),
            ],
        ),
    ]


def _split_text(result: EvaluationResult) -> str:
    """The hold-out split and the cross-validation, in words."""
    split, probe = result.split, result.settings["probe"]
    split_text = (
        ("group-aware hold-out (no group on both sides)" if split.grouped else "stratified hold-out")
        + f", test share {probe['test_size']}, seed {probe['seed']}: {len(split.train_indices)} training / "
        f"{len(split.test_indices)} test cells"
    )
    cv_text = (
        f"{split.n_splits}-fold {'group ' if split.grouped else 'stratified '}cross-validation × "
        f"{probe['n_repeats']} "
        f"repeat(s) on all cells ({len(split.cv_folds)} fits, the classifier re-picked in each)"
        if split.cv_folds
        else "no cross-validation"
    )
    return f"{split_text}; {cv_text}"


def _clustering_text(result: EvaluationResult) -> str:
    """The clustering protocol in words: graph, Leiden, the headline and resolution-1 scores, the sample."""
    settings = result.settings
    cluster = settings["cluster"]
    n_cells = sum(result.class_counts.values())
    resolution_text = (
        f"chosen by modularity among {cluster['resolutions']} (label-free)"
        if cluster["select_resolution"]
        else f"{cluster['resolution']}"
    )
    return (
        f"Clustering: kNN graph ({cluster['n_neighbors']} neighbours, {cluster['metric']}), "
        f"Leiden; headline: the best ARI and the best NMI over resolutions "
        f"{min(cluster['optimise_resolutions'])}–{max(cluster['optimise_resolutions'])} (scib's "
        f"cluster-optimised metric); beside it ARI at resolution {resolution_text} as mean ± sd over "
        f"seeds {list(cluster['seeds'])}; silhouette of the labels in the embedding (−1 … 1)"
        + (
            f"; on a seeded sample of {settings['n_cells_clustered']} of {n_cells} cells"
            if settings.get("n_cells_clustered", 0) < n_cells
            else ""
        )
    )


def _baselines_blocks(result: EvaluationResult) -> list[Block]:
    """ "The model against its baselines": one row per method over :data:`_HEADLINE_COLUMNS`."""
    header = ["method"] + [title for _, title, _ in _HEADLINE_COLUMNS]
    rows = [_headline_row(record) for record in result.baselines.to_dict(orient="records")]
    return [
        ("heading", 2, "The model against its baselines"),
        (
            "paragraph",
            "Hold-out metrics on the shared test cells with the classifier each method picked; CV and "
            "5-shot columns are mean ± sd over folds / draws. ARI/NMI (optimised) are the best over the "
            "resolution sweep; ARI (res 1) mostly measures how many clusters Leiden happens to cut. "
            "Full table: baselines.csv.",
        ),
        ("table", header, rows),
    ]


def _headline_row(record: Mapping[str, Any]) -> list[str]:
    """One baselines.csv record as report cells: the method, then each headline column formatted."""
    row = [str(record["method"])]
    for column, _, sd_column in _HEADLINE_COLUMNS:
        value = record.get(column)
        if sd_column:
            row.append(_mean_sd(value, record.get(sd_column)))
        elif column == "embedding_dim":
            row.append("–" if value is None or not math.isfinite(float(value)) else str(int(value)))
        elif column == "probe_classifier":
            row.append(str(value))
        elif column == "n_clusters_res1_mean":
            row.append("–" if value is None or not math.isfinite(float(value)) else f"{float(value):.1f}")
        else:
            row.append(_format(value))
    return row


def _label_efficiency_blocks(result: EvaluationResult, report_dir: Path) -> list[Block]:
    """ "Label efficiency": a table per metric (macro-F1, accuracy, ROC-AUC) by shots, and its figure;
    nothing when the run has no label-efficiency rows."""
    efficiency = result.label_efficiency
    if not len(efficiency):
        return []
    blocks: list[Block] = []
    shots = list(dict.fromkeys(efficiency["shots"].astype(str)))
    for metric, title in (("f1", "macro-F1"), ("accuracy", "accuracy"), ("auc", "ROC-AUC")):
        table_rows = []
        for method in dict.fromkeys(efficiency["method"]):
            part = efficiency[efficiency["method"] == method].set_index("shots")
            table_rows.append(
                [method]
                + [_mean_sd(part.loc[s, f"{metric}_mean"], part.loc[s, f"{metric}_sd"]) for s in shots]
            )
        if metric == "f1":
            blocks += [
                ("heading", 2, "Label efficiency"),
                (
                    "paragraph",
                    f"Probe trained on k labelled cells per class drawn from the training part "
                    f"({result.settings['label_efficiency']['n_draws']} draws, the same for every method), "
                    "scored on the shared test cells; mean ± sd over draws.",
                ),
            ]
        blocks += [
            ("paragraph", f"Probe {title} by labelled cells per class:"),
            ("table", ["method"] + shots, table_rows),
        ]
    if "label_efficiency_plot" in result.paths:
        blocks.append(
            ("images", [(_relative(result.paths["label_efficiency_plot"], report_dir), "label efficiency")])
        )
    return blocks


def _figure_blocks(result: EvaluationResult, report_dir: Path) -> list[Block]:
    """ "Figures: <method>" for every method that drew any of :data:`_METHOD_FIGURES`."""
    blocks: list[Block] = []
    for name, method in result.methods.items():
        figures = [
            (_relative(method.paths[key], report_dir), f"{name}: {caption}")
            for key, caption in _METHOD_FIGURES
            if key in method.paths
        ]
        if figures:
            blocks += [("heading", 2, f"Figures: {name}"), ("images", figures)]
    return blocks


def _notes_blocks() -> list[Block]:
    """ "Notes": how to read the PCA baseline, the clusters and the undefined metrics."""
    notes = [
        "The PCA baseline is unsupervised (it never sees labels) but is fit on all cells, test cells "
        "included, as is usual in single-cell analysis.",
        "Leiden clusters are computed without labels; labels only score them. ARI penalises splitting one "
        "class into several clusters — homogeneity and the cluster-majority accuracy show whether clusters "
        "are pure.",
        "Undefined metrics (e.g. AUC when the test part lacks a class) are shown as '–' and left out of "
        "summary.json.",
    ]
    return [("heading", 2, "Notes"), ("bullets", notes)]


def _comparison_sentences(result: EvaluationResult) -> list[Block]:
    """The model beside the strongest baseline on every headline metric, said plainly."""
    strongest = result.settings.get("strongest_baselines", {})
    if not strongest or "model" not in result.methods:
        return []
    rows, wins, losses = [], [], []
    for entry in strongest.values():
        margin = entry["margin"]
        verdict = "ahead" if margin > 0.01 else ("behind" if margin < -0.01 else "level (within 0.01)")
        rows.append(
            [
                entry["title"],
                _format(entry["model_value"]),
                f"{entry['baseline']} {_format(entry['baseline_value'])}",
                f"{margin:+.3f}",
                verdict,
            ]
        )
        (wins if margin > 0.01 else losses if margin < -0.01 else []).append(entry["title"])
    summary = (
        "The model is behind the strongest baseline on: " + ", ".join(losses) + "."
        if losses
        else "The model is not behind the strongest baseline on any headline metric."
    )
    if wins:
        summary += " It is ahead on: " + ", ".join(wins) + "."
    return [
        ("heading", 2, "The model against the strongest baseline"),
        (
            "paragraph",
            "For every headline metric, the strongest baseline of this run (the random-weights encoder "
            "is a control, not a baseline) and the model's margin to it. " + summary,
        ),
        ("table", ["metric", "model", "strongest baseline", "margin", "verdict"], rows),
    ]


def _relative(path: Path, report_dir: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), report_dir.resolve())).as_posix()


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """Markdown for report blocks (images linked by relative path)."""
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "paragraph":
            lines += [block[1], ""]
        elif kind == "bullets":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(_markdown_cell(h) for h in header) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
            lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "images":
            for path, caption in block[1]:
                lines += [f"![{caption}]({path})", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; max-width: 560px; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
"""


def render_html(blocks: list[Block], report_dir: Path) -> str:
    """A self-contained HTML page for report blocks; images are embedded as base64 PNG data."""
    parts = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'><title>neurofm evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "paragraph":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "bullets":
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            header, rows = block[1], block[2]
            parts.append(
                "<table><thead><tr>"
                + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                + "</tr></thead><tbody>"
            )
            parts += [
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
            ]
            parts.append("</tbody></table>")
        elif kind == "images":
            parts.append("<div class='figures'>")
            for path, caption in block[1]:
                data = base64.b64encode((report_dir / path).read_bytes()).decode("ascii")
                parts.append(
                    f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    result: EvaluationResult, out_dir: str | os.PathLike | None = None, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``report.md`` and ``report.html`` for ``result`` into ``out_dir`` (default: its own).

    ``extra`` adds a "Model" table at the top (model URI/version, pretraining perplexity vs the
    frequency baseline, …); values are shown as text, dicts as JSON. The Markdown links figures by
    path relative to ``out_dir``; the HTML embeds them, so it is one self-contained file. Returns
    the path of ``report.md``.
    """
    report_dir = ensure_writable_dir(out_dir if out_dir is not None else result.out_dir)
    blocks = _blocks(result, report_dir, extra)
    markdown_path = write_text(render_markdown(blocks), report_dir / "report.md")
    write_text(render_html(blocks, report_dir), report_dir / "report.html")
    return markdown_path
