"""Approximate nearest-neighbour search with ScaNN, checked against exact search."""

import logging

import numpy as np

from keras_xbm.retrieval.exact import check_embeddings

logger = logging.getLogger(__name__)

# Below this many references ScaNN scores every one of them (exact up to float error).
BRUTE_FORCE_LIMIT = 20_000


def build_scann_searcher(references, k, brute_force_limit=BRUTE_FORCE_LIMIT, num_leaves=None, num_leaves_to_search=None, reorder_k=None):
    """Build a ScaNN searcher over `references` for dot-product search.

    Small sets (at most `brute_force_limit` rows) are scored by brute force.
    Larger sets are partitioned into `num_leaves` clusters (default about
    `sqrt(n)`), of which `num_leaves_to_search` (default a quarter) are scored
    with anisotropic hashing, and the best `reorder_k` (default `max(4k, 100)`)
    are re-scored exactly.
    """
    import scann

    references = check_embeddings(references, "references")
    count = references.shape[0]
    builder = scann.scann_ops_pybind.builder(references, k, "dot_product")
    if count <= brute_force_limit:
        return builder.score_brute_force().build()
    num_leaves = num_leaves or int(np.sqrt(count))
    num_leaves_to_search = num_leaves_to_search or max(1, num_leaves // 4)
    reorder_k = reorder_k or max(4 * k, 100)
    return (
        builder.tree(num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search, training_sample_size=min(count, 250_000))
        .score_ah(2, anisotropic_quantization_threshold=0.2)
        .reorder(reorder_k)
        .build()
    )


def scann_search(queries, references=None, k=1, **index_options):
    """Search like `exact_search`, with a ScaNN index.

    For leave-one-out search (`references=None`) the index returns `k + 1`
    neighbours and the query's own index is removed from them, wherever it
    ranks; when it is not among them the first `k` are kept.

    Returns:
        `(indices, scores)`: int64 and float32 `[num_queries, k]`.
    """
    leave_one_out = references is None
    queries = check_embeddings(queries, "queries")
    references = queries if leave_one_out else check_embeddings(references, "references")
    available = references.shape[0] - (1 if leave_one_out else 0)
    if k > available:
        raise ValueError(
            f"k={k} is larger than the {available} references available to each query: expected k <= {available}."
        )
    search_k = k + 1 if leave_one_out else k
    searcher = build_scann_searcher(references, search_k, **index_options)
    indices, scores = searcher.search_batched(queries, final_num_neighbors=search_k)
    indices = np.asarray(indices, np.int64)
    scores = np.asarray(scores, np.float32)
    if not leave_one_out:
        return indices, scores

    own = indices == np.arange(queries.shape[0])[:, None]
    # Drop the query's own column where it is present, else the last column.
    drop = np.where(own.any(axis=1), own.argmax(axis=1), search_k - 1)
    keep = np.ones_like(own)
    keep[np.arange(queries.shape[0]), drop] = False
    return indices[keep].reshape(-1, k), scores[keep].reshape(-1, k)
