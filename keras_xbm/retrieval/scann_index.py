"""Approximate nearest-neighbour search with ScaNN, checked against exact search.

The index configuration follows the number of references:

- up to `brute_force_limit` (20,000) references, ScaNN scores every one of
  them, exact up to float32 rounding;
- above it, a k-means tree of about `sqrt(n)` leaves partitions the
  references, each query scores the references of its nearest leaves with
  anisotropic hashing (`score_ah`, Guo et al., "Accelerating Large-Scale
  Inference with Anisotropic Vector Quantization", ICML 2020), and the best
  candidates are re-scored exactly (`reorder`).

`scann_settings` returns the settings it would use, and every one of them can
be overridden through the keyword arguments of `build_scann_searcher`,
`scann_search` and `evaluate_retrieval(index="scann", ...)`.
`scann_neighbor_recall` measures how many exact neighbours an index finds.
"""

import logging

import numpy as np

from keras_xbm.retrieval.inputs import check_embeddings, check_search_inputs

logger = logging.getLogger(__name__)

# Below this many references ScaNN scores every one of them (exact up to float error).
BRUTE_FORCE_LIMIT = 20_000

# Queries searched per call, which bounds the neighbour arrays held at once.
SEARCH_BLOCK = 8192


def scann_settings(count, k, brute_force_limit=BRUTE_FORCE_LIMIT, num_leaves=None, num_leaves_to_search=None, reorder_k=None, dimensions_per_block=2, anisotropic_quantization_threshold=0.2, training_sample_size=None):
    """Return the ScaNN settings for `count` references and `k` neighbours.

    Args:
        count: number of references.
        k: neighbours each search returns.
        brute_force_limit: largest `count` scored by brute force. Defaults to 20,000.
        num_leaves: leaves of the partitioning tree. Defaults to `sqrt(count)`,
            rounded.
        num_leaves_to_search: leaves scored per query. Defaults to 15% of
            the leaves, or more when that many leaves contain fewer than
            `4 * reorder_k` references on average. On 60,502 clustered
            embeddings (benchmarks/retrieval.py) 10% of the leaves lost 0.13
            to 0.27 points of Recall@1 against exact search, 15% lost 0.07.
        reorder_k: candidates re-scored exactly. Defaults to `max(k, 200)`.
        dimensions_per_block: dimensions per anisotropic hashing block.
            Defaults to 2.
        anisotropic_quantization_threshold: the threshold T of anisotropic
            hashing, for unit-norm data. Defaults to 0.2.
        training_sample_size: references used to train the tree and the
            hashing. Defaults to 40 per leaf, at least 10,000 and at most
            `count`.

    Returns:
        A dictionary of settings with key `"mode"` equal to `"brute_force"`
        or `"tree_ah"`.
    """
    if count <= brute_force_limit:
        return {"mode": "brute_force"}
    num_leaves = min(count, num_leaves or max(1, int(round(np.sqrt(count)))))
    reorder_k = max(k, reorder_k or 200)
    if num_leaves_to_search is None:
        covering = int(np.ceil(num_leaves * 4 * reorder_k / count))
        num_leaves_to_search = max(num_leaves * 3 // 20, covering)
    return {
        "mode": "tree_ah",
        "num_leaves": num_leaves,
        "num_leaves_to_search": int(min(num_leaves, max(1, num_leaves_to_search))),
        "reorder_k": reorder_k,
        "dimensions_per_block": dimensions_per_block,
        "anisotropic_quantization_threshold": anisotropic_quantization_threshold,
        "training_sample_size": int(training_sample_size or min(count, max(10_000, 40 * num_leaves))),
    }


def build_scann_searcher(references, k, **settings):
    """Build a ScaNN searcher over `references` for dot-product search.

    Args:
        references: float `[count, dim]`.
        k: default number of neighbours per search.
        **settings: overrides of `scann_settings` (`brute_force_limit`,
            `num_leaves`, `num_leaves_to_search`, `reorder_k`,
            `dimensions_per_block`, `anisotropic_quantization_threshold`,
            `training_sample_size`).

    Returns:
        A `scann_ops_pybind` searcher.
    """
    import scann

    references = check_embeddings(references, "references")
    chosen = scann_settings(references.shape[0], k, **settings)
    logger.info("Building a ScaNN index over %d references: %s", references.shape[0], chosen)
    builder = scann.scann_ops_pybind.builder(references, k, "dot_product")
    if chosen["mode"] == "brute_force":
        return builder.score_brute_force().build()
    return (
        builder.tree(
            num_leaves=chosen["num_leaves"],
            num_leaves_to_search=chosen["num_leaves_to_search"],
            training_sample_size=chosen["training_sample_size"],
        )
        .score_ah(
            chosen["dimensions_per_block"],
            anisotropic_quantization_threshold=chosen["anisotropic_quantization_threshold"],
            training_sample_size=chosen["training_sample_size"],
        )
        .reorder(chosen["reorder_k"])
        .build()
    )


def search_blocks(searcher, queries, references, k, block_size=SEARCH_BLOCK):
    """Yield `(start, stop, indices, scores)` of a searcher, `block_size` queries at a time.

    ScaNN pads the result of a query whose searched leaves contain fewer than
    `k` references with index 0 and a NaN score. Such queries are searched
    again exactly against `references`, and a warning gives their count.
    """
    from keras_xbm.retrieval.exact import exact_search

    for start in range(0, queries.shape[0], block_size):
        stop = min(start + block_size, queries.shape[0])
        indices, scores = searcher.search_batched_parallel(queries[start:stop], final_num_neighbors=k)
        indices = np.asarray(indices, np.int64)
        scores = np.asarray(scores, np.float32)
        short = np.flatnonzero(~np.isfinite(scores).all(axis=1))
        if short.size:
            logger.warning(
                "ScaNN returned fewer than %d neighbours for %d queries; searching them exactly. "
                "Searching more leaves (num_leaves_to_search) avoids this.",
                k, short.size,
            )
            indices[short], scores[short] = exact_search(queries[start + short], references, k=k)
        yield start, stop, indices, scores


def drop_own_index(indices, scores, first_query, k):
    """Remove each query's own row from `k + 1` neighbours, or the last neighbour when it is absent."""
    rows = indices.shape[0]
    own = indices == (first_query + np.arange(rows))[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones(indices.shape, bool)
    keep[np.arange(rows), drop] = False
    return indices[keep].reshape(rows, k), scores[keep].reshape(rows, k)


def scann_search_blocks(queries, references=None, k=1, **settings):
    """Yield `(start, stop, indices, scores)` of ScaNN search, in blocks of queries.

    Takes the arguments of `scann_search`. Builds one index and searches it
    `SEARCH_BLOCK` queries at a time, so only one block of neighbours is held.
    """
    leave_one_out = references is None
    queries, references, _ = check_search_inputs(queries, references, k)
    search_k = k + 1 if leave_one_out else k
    searcher = build_scann_searcher(references, search_k, **settings)
    for start, stop, indices, scores in search_blocks(searcher, queries, references, search_k):
        if leave_one_out:
            indices, scores = drop_own_index(indices, scores, start, k)
        yield start, stop, indices, scores


def scann_search(queries, references=None, k=1, **settings):
    """Search like `exact_search`, with a ScaNN index.

    For leave-one-out search (`references=None`) the index returns `k + 1`
    neighbours, and the query's own index is removed from them wherever it
    ranks. When it is not among them, the last one is dropped.

    Args:
        queries: float `[num_queries, dim]`.
        references: float `[num_references, dim]`, or `None` for leave-one-out.
        k: number of neighbours.
        **settings: overrides of `scann_settings`.

    Returns:
        `(indices, scores)`: int64 and float32 `[num_queries, k]`.
    """
    blocks = list(scann_search_blocks(queries, references, k, **settings))
    return np.concatenate([block[2] for block in blocks]), np.concatenate([block[3] for block in blocks])


def count_found(found, expected):
    """Return how many entries of each row of `expected` appear in the same row of `found`.

    Args:
        found: int `[rows, k]` neighbour indices, each row without repeats.
        expected: int `[rows, m]` neighbour indices.

    Returns:
        int64 `[rows]`.
    """
    found = np.asarray(found, np.int64)
    expected = np.asarray(expected, np.int64)
    # Offsetting row i by i * width makes the row-sorted neighbours one sorted
    # array, so membership is a single searchsorted.
    width = int(max(found.max(initial=0), expected.max(initial=0))) + 1
    offsets = np.arange(found.shape[0])[:, None] * width
    flat_found = (np.sort(found, axis=1) + offsets).ravel()
    flat_expected = (expected + offsets).ravel()
    positions = np.minimum(np.searchsorted(flat_found, flat_expected), flat_found.size - 1)
    return (flat_found[positions] == flat_expected).reshape(expected.shape).sum(axis=1)


def scann_neighbor_recall(queries, references=None, k=10, exact_indices=None, **settings):
    """Return the fraction of the exact top-`k` neighbours that ScaNN's top `k` contain.

    Args:
        queries, references: as for `scann_search`.
        k: neighbours compared per query. Defaults to 10.
        exact_indices: optional `[num_queries, >= k]` exact neighbours, best
            first, to skip the exact search.
        **settings: overrides of `scann_settings`.

    Returns:
        `{"neighbor_recall@k": value, "top1_agreement": value}`: the share of
        exact neighbours found, and the share of queries whose first ScaNN
        neighbour is the exact first neighbour.
    """
    from keras_xbm.retrieval.exact import exact_search

    if exact_indices is None:
        exact_indices, _ = exact_search(queries, references, k=k)
    exact_indices = np.asarray(exact_indices)[:, :k]
    found = 0
    top1 = 0
    for start, stop, indices, _ in scann_search_blocks(queries, references, k, **settings):
        expected = exact_indices[start:stop]
        found += int(count_found(indices, expected).sum())
        top1 += int(np.count_nonzero(indices[:, 0] == expected[:, 0]))
    count = exact_indices.shape[0]
    return {f"neighbor_recall@{k}": found / (count * k), "top1_agreement": top1 / count}
