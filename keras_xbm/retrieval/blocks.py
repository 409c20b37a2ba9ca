"""Blocked inner-product scoring and exact top-k selection, the core of exact search.

Queries are scored against all references in blocks of rows, so the largest
score matrix held is `block_size x num_references`. The top k of each row
is selected without sorting the row:

1. The k-th largest score among the first `sample` columns of a row is a lower
   bound of the row's k-th largest score, because those columns are a subset
   of the row.
2. Every score at or above that bound is a candidate: the candidates contain
   the row's top k, and on average about `k * num_references / sample` of them.
3. The candidates are ranked exactly, by score and then by reference index.

One comparison pass over the block replaces a partial sort of every row,
which keeps exact search close to the cost of the matrix product itself.
"""

import numpy as np

# Size of one block of float32 scores. 128 MiB keeps exact evaluation of
# 60,502 references under 1 GiB of peak memory (benchmarks/retrieval.py).
DEFAULT_BLOCK_BYTES = 128 * 2**20

# Minimum number of columns used to estimate the top-k threshold of a row.
MIN_THRESHOLD_SAMPLE = 2048


def default_block_size(num_references, block_bytes=DEFAULT_BLOCK_BYTES):
    """Return how many query rows fit in `block_bytes` of float32 scores, at least 1."""
    return max(1, block_bytes // (4 * max(1, num_references)))


def check_block_size(block_size, num_references):
    """Return `block_size`, or the default for `num_references` when it is None."""
    if block_size is None:
        return default_block_size(num_references)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"Invalid block_size={block_size!r}: expected a positive integer or None.")
    return int(block_size)


def duplicate_rows(matrix):
    """Return `(duplicates, originals)`: each row equal to an earlier row, and the first row it equals."""
    rows = np.ascontiguousarray(matrix).view(np.dtype((np.void, matrix.dtype.itemsize * matrix.shape[1])))[:, 0]
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    originals = first[inverse.reshape(-1)]
    duplicates = np.flatnonzero(originals != np.arange(matrix.shape[0]))
    return duplicates, originals[duplicates]


def score_blocks(queries, references, block_size, leave_one_out):
    """Yield `(start, stop, scores)` with `scores = queries[start:stop] @ references.T`.

    In leave-one-out search (`references` is `queries`), each query's own
    column is set to `-inf`, so it is excluded by index and never by value:
    an exact duplicate of the query keeps its score.

    Exact duplicate references get the score of their first copy. A float32
    matrix product can give identical columns scores one unit in the last
    place apart, depending on where they sit in the product's tiles, and
    copying makes their tie exact, so it is ordered by index.

    The same buffer is reused for every block: copy what must outlive the
    next iteration.
    """
    num_queries, num_references = queries.shape[0], references.shape[0]
    block_size = min(block_size, max(1, num_queries))
    duplicates, originals = duplicate_rows(references)
    buffer = np.empty((block_size, num_references), np.float32)
    for start in range(0, num_queries, block_size):
        stop = min(start + block_size, num_queries)
        scores = buffer[: stop - start]
        np.matmul(queries[start:stop], references.T, out=scores)
        if duplicates.size:
            scores[:, duplicates] = scores[:, originals]
        if leave_one_out:
            scores[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        yield start, stop, scores


def candidate_threshold(scores, k):
    """Return, per row, a lower bound of the k-th largest score.

    The bound is the k-th largest of the first `max(2048, 8k)` columns, or the
    exact k-th largest when the row is shorter than that.
    """
    width = scores.shape[1]
    sample = min(width, max(MIN_THRESHOLD_SAMPLE, 8 * k))
    return np.partition(scores[:, :sample], sample - k, axis=1)[:, sample - k]


def select_candidates(scores, k, mask=None):
    """Return the scores of each row at or above `candidate_threshold`.

    Args:
        scores: float32 `[rows, width]`, with `k <= width`.
        k: the number of top scores each row's candidates must contain.
        mask: optional bool buffer of the same shape, reused across blocks.

    Returns:
        `(threshold, rows, columns, values)`: the per-row bound, then the
        candidates as flat arrays, ordered by row and then by column.
    """
    threshold = candidate_threshold(scores, k)
    if mask is None:
        mask = np.empty(scores.shape, bool)
    np.greater_equal(scores, threshold[:, None], out=mask)
    flat = np.flatnonzero(mask)
    rows, columns = np.divmod(flat, scores.shape[1])
    return threshold, rows, columns, scores.reshape(-1)[flat]


def top_k_from_candidates(rows, columns, values, num_rows, k):
    """Rank candidates and return the top `k` of every row.

    Candidates must be ordered by row and then by column, and every row must
    have at least `k` of them.

    Returns:
        `(indices, scores)`: int64 and float32 `[num_rows, k]`, best first,
        equal scores in ascending column order.
    """
    counts = np.bincount(rows, minlength=num_rows)
    width = int(counts.max())
    position = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    padded = np.full((num_rows, width), -np.inf, np.float32)
    padded_columns = np.zeros((num_rows, width), np.int64)
    padded[rows, position] = values
    padded_columns[rows, position] = columns
    # Padding sorts after every real candidate with the same value.
    is_padding = np.arange(width)[None, :] >= counts[:, None]

    if width > k:
        # Keep exactly k per row: everything above the k-th largest value, then
        # the lowest columns among the entries equal to it.
        kth = np.partition(padded, width - k, axis=1)[:, width - k]
        above = padded > kth[:, None]
        tied = (padded == kth[:, None]) & ~is_padding
        needed = k - above.sum(axis=1)
        keep = above | (tied & (np.cumsum(tied, axis=1) <= needed[:, None]))
        padded = padded[keep].reshape(num_rows, k)
        padded_columns = padded_columns[keep].reshape(num_rows, k)

    # A stable sort of the negated scores keeps equal scores in column order.
    order = np.argsort(-padded, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(padded_columns, order, axis=1), np.take_along_axis(padded, order, axis=1)


def top_k_rows(scores, k, mask=None):
    """Return the exact top `k` of every row of `scores`, ties in ascending column order.

    Returns:
        `(indices, values)`: int64 and float32 `[rows, k]`, best first.
    """
    _, rows, columns, values = select_candidates(scores, k, mask)
    return top_k_from_candidates(rows, columns, values, scores.shape[0], k)
