"""Exact nearest-neighbour search by inner product, in blocks of queries.

The ground truth of every retrieval number in keras_xbm. Queries are scored in
blocks of `block_size` rows, so the largest matrix held is
`block_size x num_references`, never `num_queries x num_references`.
"""

import numpy as np
import tensorflow as tf


def check_embeddings(embeddings, name):
    """Return `embeddings` as a float32 2-D array, rejecting NaN and Inf rows."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"Expected {name} of shape [count, dim], received shape {embeddings.shape}.")
    bad_rows = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad_rows.size:
        shown = ", ".join(str(row) for row in bad_rows[:10])
        more = " ..." if bad_rows.size > 10 else ""
        raise ValueError(f"{name} has {bad_rows.size} row(s) with NaN or Inf values: rows {shown}{more}.")
    return embeddings


def exact_search(queries, references=None, k=1, block_size=1024):
    """Find the `k` references with the largest inner product for each query.

    Args:
        queries: float `[num_queries, dim]`.
        references: float `[num_references, dim]`, or `None` for leave-one-out
            search within `queries`: each query is compared with every other
            row, and only its own row is excluded (by index, so an exact
            duplicate of the query still counts as a neighbour).
        k: number of neighbours. At most the number of references (minus one
            in leave-one-out search).
        block_size: number of queries scored at once. Defaults to 1024.

    Returns:
        `(indices, scores)`: int64 and float32 arrays `[num_queries, k]`, best
        first. Equal scores are ordered by reference index.
    """
    leave_one_out = references is None
    queries = check_embeddings(queries, "queries")
    references = queries if leave_one_out else check_embeddings(references, "references")
    if queries.shape[1] != references.shape[1]:
        raise ValueError(
            f"Queries have width {queries.shape[1]} but references have width {references.shape[1]}."
        )
    available = references.shape[0] - (1 if leave_one_out else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"Invalid k={k!r}: expected a positive integer.")
    if k > available:
        raise ValueError(
            f"k={k} is larger than the {available} references available to each query: expected k <= {available}."
        )
    if block_size < 1:
        raise ValueError(f"Invalid block_size={block_size!r}: expected a positive integer.")

    reference_tensor = tf.constant(references)
    all_indices = np.empty((queries.shape[0], k), np.int64)
    all_scores = np.empty((queries.shape[0], k), np.float32)
    for start in range(0, queries.shape[0], block_size):
        stop = min(start + block_size, queries.shape[0])
        scores = tf.matmul(queries[start:stop], reference_tensor, transpose_b=True)
        if leave_one_out:
            own = tf.range(start, stop)
            own_position = tf.stack([tf.range(stop - start), own], axis=1)
            scores = tf.tensor_scatter_nd_update(scores, own_position, tf.fill([stop - start], -np.inf))
        # top_k returns the lower index first among equal values.
        top = tf.math.top_k(scores, k=k, sorted=True)
        all_indices[start:stop] = top.indices.numpy()
        all_scores[start:stop] = top.values.numpy()
    return all_indices, all_scores
