"""Retrieval metrics computed from ranked neighbour labels."""

import numpy as np


def recall_at_k(query_labels, neighbor_labels, ks=(1, 2, 4, 8)):
    """Return `{"recall@K": value}`: the fraction of queries with a same-label item among their K nearest.

    Args:
        query_labels: `[num_queries]` labels.
        neighbor_labels: `[num_queries, max_k]` labels of each query's ranked
            neighbours, best first.
        ks: the K values, each at most `max_k`. Defaults to `(1, 2, 4, 8)`.
    """
    query_labels = np.asarray(query_labels)
    neighbor_labels = np.asarray(neighbor_labels)
    if neighbor_labels.ndim != 2 or neighbor_labels.shape[0] != query_labels.shape[0]:
        raise ValueError(
            f"Expected neighbour labels of shape [{query_labels.shape[0]}, max_k], "
            f"received shape {neighbor_labels.shape}."
        )
    hits = neighbor_labels == query_labels[:, None]
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), neighbor_labels.shape[1])
    results = {}
    for k in ks:
        if k > neighbor_labels.shape[1]:
            raise ValueError(f"recall@{k} needs {k} neighbours per query, only {neighbor_labels.shape[1]} were searched.")
        results[f"recall@{k}"] = float(np.mean(first_hit < k))
    return results
