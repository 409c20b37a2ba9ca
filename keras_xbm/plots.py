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
            color = "black" if hit is None else ("tab:green" if hit else "tab:red")
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
