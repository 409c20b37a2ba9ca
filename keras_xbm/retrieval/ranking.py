"""Exact ranks of the relevant references of every query, in blocks of queries.

A reference is relevant to a query when their labels are equal. The ranking
of a query's references is by inner product, highest first, with equal scores
in ascending reference index, the order `exact_search` returns. In
leave-one-out evaluation the query's own row is excluded by index.

For each query this module computes, without ever holding the
`num_queries x num_references` score matrix:

- the rank of its first relevant reference, over all references, so
  Recall@K is exact for any K without a top-K search;
- average precision at R and R-precision, from its top-R list, where R is
  its number of relevant references.
"""

import dataclasses
import logging

import numpy as np

from keras_xbm.retrieval.blocks import check_block_size, score_blocks, select_candidates, top_k_from_candidates
from keras_xbm.retrieval.inputs import check_label_kinds

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RelevanceRanks:
    """Per-query retrieval results, each an array `[num_queries]`.

    Attributes:
        first_relevant_rank: 1-based rank of the best-ranked relevant
            reference, or 0 when the query has no relevant reference.
        relevant_count: R, the number of relevant references.
        average_precision_at_r: AP@R, 0 when R is 0.
        r_precision: the fraction of relevant references among the top R, 0
            when R is 0.
        searched: the number of ranked neighbours `first_relevant_rank`
            covers. Exact ranking covers all references; an index that
            returns k neighbours covers k, and a rank beyond it is stored
            as 0.
    """

    first_relevant_rank: np.ndarray
    relevant_count: np.ndarray
    average_precision_at_r: np.ndarray
    r_precision: np.ndarray
    searched: int


class LabelIndex:
    """The references of each label, for looking up a query's relevant references.

    Args:
        reference_labels: `[num_references]` labels.
    """

    def __init__(self, reference_labels):
        # A stable sort keeps each label's references in ascending index order.
        self.order = np.argsort(reference_labels, kind="stable")
        sorted_labels = reference_labels[self.order]
        self.labels, self.starts, self.counts = np.unique(sorted_labels, return_index=True, return_counts=True)

    def lookup(self, query_labels):
        """Return `(start, count)` of each query label's references within `order` (count 0 when absent)."""
        check_label_kinds(query_labels, self.labels)
        position = np.searchsorted(self.labels, query_labels)
        position = np.minimum(position, max(0, self.labels.size - 1))
        present = (self.labels.size > 0) & (self.labels[position] == query_labels)
        start = np.where(present, self.starts[position], 0)
        count = np.where(present, self.counts[position], 0)
        return start, count


def relevant_counts(query_labels, reference_labels, leave_one_out):
    """Return R per query: the references sharing its label, itself excluded in leave-one-out."""
    _, count = LabelIndex(reference_labels).lookup(query_labels)
    return count - 1 if leave_one_out else count


def best_relevant(scores, member_start, member_count, order):
    """Return the highest relevant score of each row and the reference holding it.

    Among equal scores the lowest reference index wins, matching the ranking
    order. Rows without a relevant reference get `-inf` and reference -1.
    The query's own column is `-inf` in leave-one-out blocks, so it never wins
    over another relevant reference.
    """
    num_rows = scores.shape[0]
    best = np.full(num_rows, -np.inf, np.float32)
    best_index = np.full(num_rows, -1, np.int64)
    widest = int(member_count.max(initial=0))
    if widest == 0:
        return best, best_index

    # Gather the relevant scores row chunk by row chunk, so the gathered block
    # stays a quarter of the score block even when one label has most references.
    chunk = max(1, scores.size // (4 * widest))
    offsets = np.arange(widest)
    for first in range(0, num_rows, chunk):
        rows = slice(first, min(first + chunk, num_rows))
        valid = offsets[None, :] < member_count[rows, None]
        members = order[np.where(valid, member_start[rows, None] + offsets[None, :], 0)]
        gathered = np.take_along_axis(scores[rows], members, axis=1)
        gathered[~valid] = -np.inf
        column = gathered.argmax(axis=1)
        best[rows] = gathered[np.arange(gathered.shape[0]), column]
        best_index[rows] = np.where(np.isneginf(best[rows]), -1, members[np.arange(members.shape[0]), column])
    return best, best_index


def rank_of_reference(scores, value, index):
    """Return the 1-based rank of reference `index` (score `value`) in each row, counting the whole row."""
    above = np.count_nonzero(scores > value[:, None], axis=1)
    tied_before = np.count_nonzero((scores == value[:, None]) & (np.arange(scores.shape[1])[None, :] < index[:, None]), axis=1)
    return 1 + above + tied_before


def precision_at_r(relevance, relevant_count):
    """Return AP@R and R-precision of each row of a ranked relevance matrix.

    Args:
        relevance: bool `[rows, width]`, True where the ranked neighbour is
            relevant, best first; `width` at least the largest R.
        relevant_count: `[rows]` R values.

    Returns:
        `(average_precision_at_r, r_precision)`, float64 `[rows]`:
        `AP@R = (1/R) * sum over i <= R of P(i) * rel(i)`, with `P(i)` the
        precision of the first i neighbours, and `R-precision = P(R)`;
        both 0 when R is 0.
    """
    width = relevance.shape[1]
    within_r = np.arange(1, width + 1)[None, :] <= relevant_count[:, None]
    hits = relevance & within_r
    cumulative = np.cumsum(hits, axis=1)
    precision = cumulative / np.arange(1, width + 1)[None, :]
    safe_count = np.maximum(relevant_count, 1)
    average_precision = np.where(relevant_count > 0, (precision * hits).sum(axis=1) / safe_count, 0.0)
    r_precision = np.where(relevant_count > 0, cumulative[:, -1] / safe_count, 0.0)
    return average_precision, r_precision


def rank_relevant_items(queries, query_labels, references, reference_labels, block_size=None):
    """Rank every query's relevant references exactly, in blocks of queries.

    Args:
        queries: float32 `[num_queries, dim]`, checked (see `inputs`).
        query_labels: `[num_queries]` labels.
        references: float32 `[num_references, dim]`, or `None` for
            leave-one-out ranking within `queries`.
        reference_labels: `[num_references]` labels, or `None` with
            `references=None`.
        block_size: queries scored at once. Defaults to `None`, which fits a
            block of scores in 128 MiB.

    Returns:
        A `RelevanceRanks`.

    NOTE: a query whose relevant references all rank far down (first relevant
    rank above about `R * num_references / 2048`) is counted over its whole
    row, which costs one extra pass over that row.
    """
    leave_one_out = references is None
    if leave_one_out:
        references, reference_labels = queries, query_labels
    num_queries, num_references = queries.shape[0], references.shape[0]
    block_size = check_block_size(block_size, num_references)

    label_index = LabelIndex(reference_labels)
    member_start, member_count = label_index.lookup(query_labels)
    relevant_count = member_count - 1 if leave_one_out else member_count

    first_rank = np.zeros(num_queries, np.int64)
    average_precision = np.zeros(num_queries, np.float64)
    r_precision = np.zeros(num_queries, np.float64)
    mask = None
    for start, stop, scores in score_blocks(queries, references, block_size, leave_one_out):
        block = slice(start, stop)
        if mask is None:
            mask = np.empty(scores.shape, bool)
        count = relevant_count[block]
        best, best_index = best_relevant(scores, member_start[block], member_count[block], label_index.order)

        # The candidates contain each row's top `depth`, enough for its top R.
        depth = max(1, int(count.max(initial=0)))
        threshold, rows, columns, values = select_candidates(scores, depth, mask[: stop - start])

        # Where the best relevant score reaches the threshold, every reference
        # ranked above it is a candidate, so counting candidates gives its rank.
        ahead = (values > best[rows]) | ((values == best[rows]) & (columns < best_index[rows]))
        rank = 1 + np.bincount(rows, weights=ahead, minlength=stop - start).astype(np.int64)
        far = np.flatnonzero((best < threshold) & (count > 0))
        if far.size:
            rank[far] = rank_of_reference(scores[far], best[far], best_index[far])
        first_rank[block] = np.where(count > 0, rank, 0)

        if count.max(initial=0) > 0:
            neighbors, _ = top_k_from_candidates(rows, columns, values, stop - start, depth)
            relevance = reference_labels[neighbors] == query_labels[block, None]
            average_precision[block], r_precision[block] = precision_at_r(relevance, count)
        logger.debug("Exact ranking: %d of %d queries", stop, num_queries)

    return RelevanceRanks(first_rank, relevant_count, average_precision, r_precision, searched=num_references - leave_one_out)
