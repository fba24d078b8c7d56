"""Every figure neurofm draws, one function each.

Each function takes plain data (arrays, DataFrames, AnnData), draws one figure, writes it atomically
as PNG to ``path`` and returns the path. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from neurofm.io import atomic_path  # noqa: E402


def save_figure(figure: plt.Figure, path: str | os.PathLike, dpi: int = 130) -> Path:
    """Save ``figure`` to ``path`` atomically as PNG and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------
# Pre-training figures (neurofm.train): loss, perplexity against the frequency baseline, accuracy.


def plot_pretrain_curves(
    metrics: list[dict], path: str | os.PathLike, title: str = "masked-bin pre-training"
) -> Path:
    """Per-epoch train/validation loss, validation perplexity (with the frequency-table baseline as a
    dashed line) and validation masked accuracy, side by side. ``metrics`` rows carry the keys of
    ``neurofm.train.METRIC_COLUMNS``."""
    epochs = [row["epoch"] for row in metrics]
    figure, (loss_axes, perplexity_axes, accuracy_axes) = plt.subplots(1, 3, figsize=(13, 3.8))
    loss_axes.plot(epochs, [row["train_loss"] for row in metrics], marker=".", label="train")
    loss_axes.plot(epochs, [row["val_loss"] for row in metrics], marker=".", label="validation")
    loss_axes.set_ylabel("masked cross-entropy")
    loss_axes.legend()
    perplexity_axes.plot(epochs, [row["val_perplexity"] for row in metrics], marker=".", label="model")
    perplexity_axes.axhline(
        metrics[0]["baseline_perplexity"],
        color="grey",
        linestyle="--",
        label=f"per-gene frequency table ({metrics[0]['baseline_perplexity']:.2f})",
    )
    perplexity_axes.set_ylabel("validation perplexity")
    perplexity_axes.legend(fontsize=8)
    accuracy_axes.plot(epochs, [row["val_masked_accuracy"] for row in metrics], marker=".")
    accuracy_axes.set_ylabel("validation masked accuracy")
    for axes in (loss_axes, perplexity_axes, accuracy_axes):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


# ------------------------------------------------------------------------------------------------
# Evaluation figures (neurofm.evaluate): confusion matrices, ROC curves, 2-D embeddings, clusters,
# label efficiency. Imports are local so this block stays self-contained.


def _category_colors(categories: list) -> dict:
    """A distinct colour per category: tab10 up to 10, tab20 up to 20, then a continuous colormap."""
    import numpy as np

    n_categories = len(categories)
    if n_categories <= 10:
        colors = plt.get_cmap("tab10").colors[:n_categories]
    elif n_categories <= 20:
        colors = plt.get_cmap("tab20").colors[:n_categories]
    else:
        colors = plt.get_cmap("gist_ncar")(np.linspace(0.05, 0.95, n_categories))
    return dict(zip(categories, colors, strict=True))


def plot_confusion_matrix(
    matrix,
    row_labels: list,
    path: str | os.PathLike,
    title: str = "Confusion matrix",
    column_labels: list | None = None,
    xlabel: str = "predicted label",
    ylabel: str = "true label",
) -> Path:
    """Heatmap of a count matrix (rows: true classes), each cell annotated with count and row share."""
    import numpy as np

    matrix = np.asarray(matrix, dtype=float)
    column_labels = list(row_labels) if column_labels is None else list(column_labels)
    row_totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_totals, out=np.zeros_like(matrix), where=row_totals > 0)
    size = 2.2 + 1.1 * max(len(row_labels), len(column_labels))
    figure, axes = plt.subplots(figsize=(size + 1.2, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            axes.text(
                column,
                row,
                f"{int(matrix[row, column])}\n{shares[row, column]:.1%}",
                ha="center",
                va="center",
                color="white" if shares[row, column] > 0.6 else "black",
                fontsize=9,
            )
    axes.set_xticks(range(len(column_labels)), [str(c) for c in column_labels], rotation=30, ha="right")
    axes.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    return save_figure(figure, path)


def plot_roc_curves(
    true_labels, probabilities, classes: list, path: str | os.PathLike, title: str = "ROC curve"
) -> Path:
    """ROC curve on the test cells: one curve for two classes, one-vs-rest per class for more."""
    import numpy as np
    from sklearn.metrics import auc, roc_curve

    true_labels = np.asarray(true_labels)
    probabilities = np.asarray(probabilities)
    figure, axes = plt.subplots(figsize=(5.2, 4.8))
    shown = [classes[1]] if len(classes) == 2 else list(classes)
    colors = _category_colors(list(classes))
    for name in shown:
        column = list(classes).index(name)
        positive = true_labels == name
        if positive.all() or not positive.any():
            continue
        false_positive_rate, true_positive_rate, _ = roc_curve(positive, probabilities[:, column])
        area = auc(false_positive_rate, true_positive_rate)
        label = f"{name} (AUC {area:.3f})" if len(classes) > 2 else f"positive = {name} (AUC {area:.3f})"
        axes.plot(false_positive_rate, true_positive_rate, color=colors[name], lw=2, label=label)
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(title if len(classes) == 2 else f"{title} (one-vs-rest)")
    axes.legend(loc="lower right", fontsize=8)
    return save_figure(figure, path)


def plot_embedding_2d(
    coordinates,
    categories,
    path: str | os.PathLike,
    title: str,
    xlabel: str = "dimension 1",
    ylabel: str = "dimension 2",
    legend_title: str = "label",
    annotate: bool = False,
) -> Path:
    """Scatter of 2-D cell coordinates coloured by a categorical value (label or cluster).

    ``annotate`` writes each category's name at its median position (useful for many clusters).
    """
    import numpy as np

    coordinates = np.asarray(coordinates)
    categories = np.asarray(categories)
    try:
        order = sorted(np.unique(categories), key=lambda value: (int(value), str(value)))
    except (TypeError, ValueError):
        order = sorted(np.unique(categories), key=str)
    colors = _category_colors(order)
    figure, axes = plt.subplots(figsize=(6.4, 5.2))
    point_size = float(np.clip(6000 / max(len(coordinates), 1), 3, 25))
    for name in order:
        mask = categories == name
        axes.scatter(
            coordinates[mask, 0],
            coordinates[mask, 1],
            s=point_size,
            color=colors[name],
            label=f"{name} ({int(mask.sum())})",
            alpha=0.8,
            linewidths=0,
            rasterized=True,
        )
        if annotate:
            center = np.median(coordinates[mask], axis=0)
            axes.text(
                center[0],
                center[1],
                str(name),
                fontsize=9,
                weight="bold",
                ha="center",
                va="center",
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "linewidth": 0},
            )
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title)
    if len(order) <= 30:
        axes.legend(
            title=legend_title,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            fontsize=8,
            markerscale=max(1.0, 30 / point_size) ** 0.5,
            ncol=1 if len(order) <= 15 else 2,
        )
    return save_figure(figure, path)


def plot_cluster_sizes_purity(cluster_table, path: str | os.PathLike, title: str = "Leiden clusters") -> Path:
    """Bars of cluster sizes coloured by majority label, with each cluster's purity on a second axis.

    ``cluster_table`` has one row per cluster with columns ``size``, ``purity``, ``majority_label``.
    """
    import numpy as np
    from matplotlib.patches import Patch

    clusters = [str(c) for c in cluster_table.index]
    majority = cluster_table["majority_label"].astype(str).to_numpy()
    colors = _category_colors(sorted(set(majority)))
    width = max(5.5, 0.35 * len(clusters) + 2.5)
    figure, axes = plt.subplots(figsize=(width, 4.4))
    positions = np.arange(len(clusters))
    axes.bar(
        positions,
        cluster_table["size"].to_numpy(),
        color=[colors[m] for m in majority],
        edgecolor="black",
        linewidth=0.4,
    )
    axes.set_xticks(positions, clusters, rotation=0 if len(clusters) <= 20 else 90)
    axes.set_xlabel("Leiden cluster (0 = largest)")
    axes.set_ylabel("cells in cluster")
    purity_axes = axes.twinx()
    purity_axes.plot(positions, cluster_table["purity"].to_numpy(), color="black", marker="o", lw=1.2)
    purity_axes.set_ylim(0, 1.05)
    purity_axes.set_ylabel("purity (share of majority label)")
    handles = [Patch(color=colors[name], label=f"majority: {name}") for name in colors]
    handles.append(plt.Line2D([], [], color="black", marker="o", label="purity"))
    axes.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        fontsize=8,
        ncol=min(4, len(handles)),
        frameon=False,
    )
    axes.set_title(title)
    return save_figure(figure, path)


def plot_label_efficiency(table, path: str | os.PathLike, title: str = "Label efficiency") -> Path:
    """Probe accuracy and ROC-AUC (mean ± sd over draws) against labelled cells per class, per method.

    ``table`` is :func:`neurofm.evaluate.label_efficiency.label_efficiency` output.
    """
    import numpy as np

    shots = list(dict.fromkeys(table["shots"].astype(str)))
    positions = {shot: index for index, shot in enumerate(shots)}
    methods = list(dict.fromkeys(table["method"]))
    colors = _category_colors(methods)
    figure, (accuracy_axes, auc_axes) = plt.subplots(1, 2, figsize=(10, 4.2))
    for axes, metric, label in (
        (accuracy_axes, "accuracy", "probe accuracy"),
        (auc_axes, "auc", "probe ROC-AUC"),
    ):
        for method in methods:
            rows = table[table["method"] == method]
            x = [positions[str(s)] for s in rows["shots"]]
            errors = np.nan_to_num(rows[f"{metric}_sd"].to_numpy(dtype=float))
            axes.errorbar(
                x,
                rows[f"{metric}_mean"],
                yerr=errors,
                marker="o",
                capsize=3,
                label=method,
                color=colors[method],
            )
        axes.set_xticks(range(len(shots)), shots)
        axes.set_xlabel("labelled training cells per class")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(title="embedding", fontsize=8)
    accuracy_axes.set_title("accuracy (mean ± sd over draws)")
    auc_axes.set_title("ROC-AUC (mean ± sd over draws)")
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_atlas(
    cells,
    path: str | os.PathLike,
    top_k: int = 10,
    highlight_clusters=(),
    title: str = "Atlas: cells by base cluster",
) -> Path:
    """Cells at ``x``/``y`` coloured by the ``top_k`` most populous ``base_name`` s (others grey), cells of
    ``highlight_clusters`` (``cluster_alias`` values) overlaid as hollow black circles.

    ``cells`` is :func:`neurofm.data.reports.atlas_cells` output (columns x, y, base_name, cluster_alias).
    """
    import numpy as np

    counts = cells["base_name"].value_counts()
    top = [name for name in counts.index if name != "unannotated"][: max(0, top_k)]
    colors = _category_colors(top)
    n_cells = len(cells)
    size = float(np.clip(3000.0 / max(n_cells, 1) ** 0.75, 0.3, 12.0))
    figure, axes = plt.subplots(figsize=(9.5, 7))
    others = ~cells["base_name"].isin(top).to_numpy()
    axes.scatter(
        cells["x"][others],
        cells["y"][others],
        s=size,
        c="#c8c8c8",
        linewidths=0,
        rasterized=True,
        label=f"other ({int(others.sum()):,})",
    )
    for name in top:
        mine = (cells["base_name"] == name).to_numpy()
        axes.scatter(
            cells["x"][mine],
            cells["y"][mine],
            s=size,
            color=colors[name],
            linewidths=0,
            rasterized=True,
            label=f"{name} ({int(mine.sum()):,})",
        )
    highlight = [str(value) for value in highlight_clusters]
    if highlight:
        chosen = cells["cluster_alias"].astype(str).isin(highlight).to_numpy()
        axes.scatter(
            cells["x"][chosen],
            cells["y"][chosen],
            s=max(size * 3, 10),
            facecolors="none",
            edgecolors="black",
            linewidths=0.35,
            alpha=0.8,
            rasterized=True,
            label=f"clusters {', '.join(highlight)} ({int(chosen.sum()):,})",
        )
    axes.set_xlabel("x")
    axes.set_ylabel("y")
    axes.set_aspect("equal", adjustable="datalim")
    axes.set_title(f"{title} ({n_cells:,} cells; top {len(top)} coloured)")
    legend = axes.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        markerscale=max(1.0, 6.0 / size**0.5),
    )
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
    figure.tight_layout()
    return save_figure(figure, path)


# ------------------------------------------------------------------------------------------------
# Tuning figures (neurofm.tune): the optimisation history and the parameter importances of a study.


def plot_optimization_history(
    trials: list[dict],
    path: str | os.PathLike,
    objective: str = "objective",
    minimize: bool = True,
    title: str = "Optuna optimisation history",
) -> Path:
    """Objective value per finished trial with the running best as a step line. ``trials`` rows carry
    ``number``, ``state`` ("COMPLETE" or "PRUNED") and ``value`` (for pruned trials the last reported
    intermediate value, or None when pruned before any epoch); pruned trials are drawn as grey crosses."""
    figure, axes = plt.subplots(figsize=(7, 4))
    complete = [row for row in trials if row["state"] == "COMPLETE" and row["value"] is not None]
    pruned = [row for row in trials if row["state"] == "PRUNED" and row["value"] is not None]
    if pruned:
        axes.scatter(
            [row["number"] for row in pruned],
            [row["value"] for row in pruned],
            marker="x",
            color="grey",
            label="pruned (last epoch reported)",
        )
    if complete:
        numbers = [row["number"] for row in complete]
        values = [row["value"] for row in complete]
        axes.scatter(numbers, values, color="tab:blue", label="complete", zorder=3)
        best, running = [], None
        for value in values:
            running = value if running is None else (min(running, value) if minimize else max(running, value))
            best.append(running)
        axes.step(numbers, best, where="post", color="tab:red", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel(objective)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_param_importances(
    importances: dict[str, float],
    path: str | os.PathLike,
    title: str = "Hyper-parameter importances (fANOVA)",
) -> Path:
    """Horizontal bars of each tuned parameter's share of the objective's variance, largest on top."""
    names = sorted(importances, key=importances.get)
    figure, axes = plt.subplots(figsize=(7, 0.45 * max(3, len(names)) + 1))
    axes.barh(names, [importances[name] for name in names], color="tab:blue")
    for y, name in enumerate(names):
        axes.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=8)
    axes.set_xlabel("importance (share of variance)")
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    return save_figure(figure, path)
