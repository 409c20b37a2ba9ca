"""Exact nearest-neighbour search by inner product, in blocks of queries.

The ground truth of every retrieval number in keras_xbm. Queries are scored in
blocks of `block_size` rows, so the largest matrix held is
`block_size x num_references`, never `num_queries x num_references`.
"""

import logging

import numpy as np

from keras_xbm.retrieval.blocks import check_block_size, score_blocks, top_k_rows
from keras_xbm.retrieval.inputs import check_embeddings, check_search_inputs

__all__ = ["check_embeddings", "exact_search"]

logger = logging.getLogger(__name__)


def exact_search(queries, references=None, k=1, block_size=None):
    """Find the `k` references with the largest inner product for each query.

    Args:
        queries: float `[num_queries, dim]`.
        references: float `[num_references, dim]`, or `None` for leave-one-out
            search within `queries`: each query is compared with every other
            row, and only its own row is excluded (by index, so an exact
            duplicate of the query still counts as a neighbour).
        k: number of neighbours. At most the number of references (minus one
            in leave-one-out search).
        block_size: number of queries scored at once. Defaults to `None`,
            which fits a block of scores in 128 MiB.

    Returns:
        `(indices, scores)`: int64 and float32 arrays `[num_queries, k]`, best
        first. Equal scores are ordered by reference index.

    Raises:
        ValueError: for NaN or Inf rows, widths that differ, an invalid `k`
            or `block_size`, or a `k` larger than the references available.
    """
    leave_one_out = references is None
    queries, references, _ = check_search_inputs(queries, references, k)
    block_size = check_block_size(block_size, references.shape[0])

    all_indices = np.empty((queries.shape[0], k), np.int64)
    all_scores = np.empty((queries.shape[0], k), np.float32)
    mask = None
    for start, stop, scores in score_blocks(queries, references, block_size, leave_one_out):
        if mask is None:
            mask = np.empty(scores.shape, bool)
        all_indices[start:stop], all_scores[start:stop] = top_k_rows(scores, k, mask[: stop - start])
        logger.debug("Exact search: %d of %d queries", stop, queries.shape[0])
    return all_indices, all_scores
