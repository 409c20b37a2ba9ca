"""Retrieval metrics: Recall@K, MAP@R, R-precision and the rank of the first relevant item.

A reference is relevant to a query when their labels are equal. The metrics
follow Musgrave et al., "A Metric Learning Reality Check", ECCV 2020, for
MAP@R and R-precision, where R is the number of references relevant to the
query:

    R-precision = (relevant among the top R) / R
    AP@R        = (1/R) * sum over i = 1..R of P(i) * rel(i)
    MAP@R       = mean of AP@R over the queries

with `P(i)` the precision of the first i neighbours and `rel(i)` 1 when the
i-th neighbour is relevant. A query with no relevant reference (R = 0) is a
miss for Recall@K and scores 0 for MAP@R and R-precision; it stays in every
mean, and `queries_without_relevant` counts it.
"""

import numpy as np

from keras_xbm.retrieval.ranking import RelevanceRanks, precision_at_r


def first_relevant_rank(query_labels, neighbor_labels):
    """Return the 1-based rank of the first neighbour sharing each query's label, 0 when none does.

    Args:
        query_labels: `[num_queries]` labels.
        neighbor_labels: `[num_queries, k]` labels of each query's ranked
            neighbours, best first.

    Returns:
        int64 `[num_queries]`.
    """
    query_labels = np.asarray(query_labels)
    neighbor_labels = np.asarray(neighbor_labels)
    if neighbor_labels.ndim != 2 or neighbor_labels.shape[0] != query_labels.shape[0]:
        raise ValueError(
            f"Expected neighbour labels of shape [{query_labels.shape[0]}, k], "
            f"received shape {neighbor_labels.shape}."
        )
    hits = neighbor_labels == query_labels[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0).astype(np.int64)


def recall_at_k(query_labels, neighbor_labels, ks=(1, 2, 4, 8)):
    """Return `{"recall@K": value}`: the fraction of queries with a same-label item among their K nearest.

    Args:
        query_labels: `[num_queries]` labels.
        neighbor_labels: `[num_queries, max_k]` labels of each query's ranked
            neighbours, best first.
        ks: the K values, each at most `max_k`. Defaults to `(1, 2, 4, 8)`.
    """
    first_rank = first_relevant_rank(query_labels, neighbor_labels)
    width = np.asarray(neighbor_labels).shape[1]
    results = {}
    for k in ks:
        if k > width:
            raise ValueError(f"recall@{k} needs {k} neighbours per query, only {width} were searched.")
        results[f"recall@{k}"] = float(np.mean((first_rank >= 1) & (first_rank <= k)))
    return results


def ranks_from_neighbors(query_labels, neighbor_labels, relevant_count):
    """Compute per-query results from ranked neighbour lists, as an approximate index returns them.

    Args:
        query_labels: `[num_queries]` labels.
        neighbor_labels: `[num_queries, k]` labels of the ranked neighbours.
        relevant_count: `[num_queries]` R values, counted over all references
            (see `ranking.relevant_counts`); `k` must be at least their maximum.

    Returns:
        A `RelevanceRanks` whose first relevant rank covers the `k` neighbours.
    """
    neighbor_labels = np.asarray(neighbor_labels)
    relevant_count = np.asarray(relevant_count)
    width = neighbor_labels.shape[1]
    if relevant_count.max(initial=0) > width:
        raise ValueError(
            f"MAP@R needs the top R neighbours of each query, but only {width} were searched "
            f"for queries with R up to {relevant_count.max()}."
        )
    first_rank = first_relevant_rank(query_labels, neighbor_labels)
    # AP@R and R-precision only look at the first R neighbours.
    depth = max(1, int(relevant_count.max(initial=0)))
    relevance = neighbor_labels[:, :depth] == np.asarray(query_labels)[:, None]
    average_precision, r_precision = precision_at_r(relevance, relevant_count)
    return RelevanceRanks(first_rank, relevant_count, average_precision, r_precision, searched=width)


def summarize_ranks(ranks, ks):
    """Return the metrics of per-query `RelevanceRanks` as a flat dictionary.

    Keys: `recall@K` for each K, `map@r`, `r_precision`, `queries` (the
    number of queries) and `queries_without_relevant` (queries with R = 0,
    counted as misses).

    Raises:
        ValueError: when a K exceeds the neighbours the ranks cover.
    """
    results = {}
    first_rank = ranks.first_relevant_rank
    for k in ks:
        if k > ranks.searched:
            raise ValueError(f"recall@{k} needs {k} neighbours per query, only {ranks.searched} were searched.")
        results[f"recall@{k}"] = float(np.mean((first_rank >= 1) & (first_rank <= k)))
    results["map@r"] = float(np.mean(ranks.average_precision_at_r))
    results["r_precision"] = float(np.mean(ranks.r_precision))
    results["queries"] = int(first_rank.shape[0])
    results["queries_without_relevant"] = int(np.count_nonzero(ranks.relevant_count == 0))
    return results
