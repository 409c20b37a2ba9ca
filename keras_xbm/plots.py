"""Pictures of what a model learned, written as PNG files."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_retrieval_gallery(query_images, neighbor_images, neighbor_hits, path, max_queries=8):
    """Draw each query next to its nearest neighbours, framing hits in green and misses in red.

    Args:
        query_images: `[num_queries, height, width, channels]` images in [0, 1].
        neighbor_images: `[num_queries, k, height, width, channels]`.
        neighbor_hits: bool `[num_queries, k]`, true where the neighbour has
            the query's label.
        path: the PNG file to write.
        max_queries: rows drawn at most. Defaults to 8.
    """
    query_images = np.asarray(query_images)[:max_queries]
    neighbor_images = np.asarray(neighbor_images)[:max_queries]
    neighbor_hits = np.asarray(neighbor_hits)[:max_queries]
    rows, k = neighbor_hits.shape
    figure, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.3 * rows), squeeze=False)
    for row in range(rows):
        cells = [(query_images[row], None)] + [(neighbor_images[row, j], neighbor_hits[row, j]) for j in range(k)]
        for column, (image, hit) in enumerate(cells):
            axis = axes[row, column]
            axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray_r", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if hit is None:
                color = "black"
            else:
                color = "tab:green" if hit else "tab:red"
            for spine in axis.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3 if hit is not None else 1)
        axes[row, 0].set_ylabel(f"query {row}", fontsize=7)
    axes[0, 0].set_title("query", fontsize=8)
    for column in range(1, k + 1):
        axes[0, column].set_title(f"#{column}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def as_labelled_curves(curves):
    """Return `[(label, curve), ...]` from a mapping or a sequence of pairs."""
    return list(curves.items()) if isinstance(curves, dict) else list(curves)


def draw_weight_curves(axis, curves, positive_similarities=None, negative_similarities=None, num_points=201):
    """Draw weight curves against the similarity S in [-1, 1] on a matplotlib axis.

    A curve that depends on the anchor's other pairs (`Softmax`) is drawn
    with the evenly spaced points of S as the anchor's pairs. The histograms
    of the given similarities go on a second y-axis as densities, positives
    in green and negatives in red.

    Args:
        axis: a matplotlib `Axes`.
        curves: `{label: curve}` or a sequence of `(label, curve)`, each a
            `keras_xbm.weighting` curve.
        positive_similarities: optional 1-D array of positive pair similarities.
        negative_similarities: optional 1-D array of negative pair similarities.
        num_points: points on S. Defaults to 201.

    Returns:
        The list of drawn `Line2D` objects, one per curve.
    """
    grid = np.linspace(-1.0, 1.0, num_points, dtype=np.float32)
    lines = []
    for label, curve in as_labelled_curves(curves):
        weights = np.asarray(curve(grid[None, :]))[0]
        (line,) = axis.plot(grid, weights, label=label, linewidth=1.8)
        lines.append(line)
    axis.set_xlim(-1.0, 1.0)
    axis.set_xlabel("similarity S")
    axis.set_ylabel("weight w(S)")

    if positive_similarities is not None or negative_similarities is not None:
        density_axis = axis.twinx()
        bins = np.linspace(-1.0, 1.0, 81)
        for values, color, name in (
            (positive_similarities, "tab:green", "positive pairs"),
            (negative_similarities, "tab:red", "negative pairs"),
        ):
            if values is not None and len(values):
                density_axis.hist(np.asarray(values), bins=bins, density=True, color=color, alpha=0.3, label=name)
        density_axis.set_ylabel("density of S")
        density_axis.legend(loc="upper center", fontsize=7, frameon=False)
    axis.legend(loc="upper left", fontsize=7, frameon=False)
    return lines


def plot_weight_curves(curves, path, positive_similarities=None, negative_similarities=None, title=None):
    """Write a PNG of weight curves against S in [-1, 1], optionally over real similarities.

    Args:
        curves: `{label: curve}` or a sequence of `(label, curve)`.
        path: the PNG file to write.
        positive_similarities: optional 1-D array, for example the similarities
            of a batch against the memory on positive pairs.
        negative_similarities: optional 1-D array, the same on negative pairs.
        title: optional figure title.

    Returns:
        `path`.
    """
    figure, axis = plt.subplots(figsize=(6.0, 3.6))
    draw_weight_curves(axis, curves, positive_similarities, negative_similarities)
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_curves_with_recall(rows, path):
    """Write a PNG with one row per study entry: its weight curves, and its Recall@1 as a bar.

    Args:
        rows: sequence of dicts with keys `label`, `positive_curve` and
            `negative_curve` (curves, or `None` for a loss without curves, whose
            row then names the loss), `recall_mean` and `recall_std` (None for a single seed).
        path: the PNG file to write.

    Returns:
        `path`.
    """
    rows = list(rows)
    figure, axes = plt.subplots(
        len(rows), 2, figsize=(8.0, 1.25 * len(rows) + 0.6), squeeze=False, gridspec_kw={"width_ratios": [1.0, 1.6]}
    )
    grid = np.linspace(-1.0, 1.0, 201, dtype=np.float32)
    means = [row["recall_mean"] for row in rows]
    low = max(0.0, min(means) - 0.05) if means else 0.0
    high = min(1.0, max(means) + 0.05) if means else 1.0
    for row, (curve_axis, bar_axis) in zip(rows, axes):
        if row.get("positive_curve") is not None:
            for curve, color in ((row["positive_curve"], "tab:green"), (row["negative_curve"], "tab:red")):
                weights = np.asarray(curve(grid[None, :]))[0]
                peak = float(np.max(weights))
                # Each curve is scaled to a peak of 1, so shapes compare across rows.
                curve_axis.plot(grid, weights / peak if peak > 0 else weights, color=color, linewidth=1.5)
            curve_axis.set_ylim(-0.05, 1.1)
        else:
            curve_axis.text(0.0, 0.5, "loss-defined weights", ha="center", va="center", fontsize=7, color="gray")
            curve_axis.set_ylim(0.0, 1.0)
        curve_axis.set_xlim(-1.0, 1.0)
        curve_axis.set_yticks([])
        curve_axis.tick_params(labelsize=6)
        std = row.get("recall_std")
        bar_axis.barh([0], [row["recall_mean"]], xerr=None if std is None else [std], color="tab:blue", height=0.6, capsize=3)
        bar_axis.set_xlim(low, high)
        bar_axis.set_yticks([])
        bar_axis.tick_params(labelsize=6)
        bar_axis.set_title(
            f"{row['label']}: R@1 {row['recall_mean']:.3f}" + ("" if std is None else f" ± {std:.3f}"), fontsize=7, loc="left"
        )
    axes[0, 0].set_title("w_pos (green), w_neg (red), peak 1", fontsize=7)
    axes[-1, 0].set_xlabel("similarity S", fontsize=7)
    axes[-1, 1].set_xlabel("Recall@1 (mean ± std over seeds)", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
