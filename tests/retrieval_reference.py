"""Straightforward numpy computations of retrieval results, the oracle for the retrieval tests.

Every query's references are sorted by float64 inner product, highest first,
with a stable sort, so equal scores keep ascending reference index. In
leave-one-out the query's own index is removed from the sorted list.
"""

import numpy as np


def grid_embeddings(count, seed, dim=8, nonzero=4):
    """Return unit rows with `nonzero` entries of +-1/sqrt(nonzero): inner products are exact in float32.

    Few distinct values means many exact ties and exact duplicate rows.
    """
    rng = np.random.default_rng(seed)
    rows = np.zeros((count, dim), np.float32)
    value = 1.0 / np.sqrt(nonzero)
    for row in rows:
        row[rng.choice(dim, nonzero, replace=False)] = rng.choice([-value, value], nonzero)
    return rows


def unit_rows(count, dim, seed):
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def ranked_references(queries, references=None):
    """Return, per query, the reference indices sorted best first (own index removed in leave-one-out)."""
    leave_one_out = references is None
    references = queries if leave_one_out else references
    scores = np.asarray(queries, np.float64) @ np.asarray(references, np.float64).T
    orders = []
    for i in range(scores.shape[0]):
        order = np.argsort(-scores[i], kind="stable")
        orders.append(order[order != i] if leave_one_out else order)
    return orders


def brute_force_ranks(queries, query_labels, references=None, reference_labels=None):
    """Return per-query `(first_relevant_rank, R, AP@R, R-precision)` arrays, with rank 0 when R is 0."""
    leave_one_out = references is None
    reference_labels = query_labels if leave_one_out else reference_labels
    first_ranks, counts, average_precisions, r_precisions = [], [], [], []
    for i, order in enumerate(ranked_references(queries, references)):
        relevant = reference_labels[order] == query_labels[i]
        r = int(relevant.sum())
        counts.append(r)
        first_ranks.append(int(np.argmax(relevant)) + 1 if r else 0)
        if r == 0:
            average_precisions.append(0.0)
            r_precisions.append(0.0)
            continue
        precision_sum = 0.0
        hits = 0
        for position in range(r):
            if relevant[position]:
                hits += 1
                precision_sum += hits / (position + 1)
        average_precisions.append(precision_sum / r)
        r_precisions.append(hits / r)
    return np.array(first_ranks), np.array(counts), np.array(average_precisions), np.array(r_precisions)


def brute_force_metrics(queries, query_labels, references=None, reference_labels=None, ks=(1, 2, 4, 8)):
    """Return the results dictionary `evaluate_retrieval` must return, computed by brute force."""
    first_ranks, counts, average_precisions, r_precisions = brute_force_ranks(
        queries, query_labels, references, reference_labels
    )
    results = {f"recall@{k}": float(np.mean((first_ranks >= 1) & (first_ranks <= k))) for k in ks}
    results["map@r"] = float(np.mean(average_precisions))
    results["r_precision"] = float(np.mean(r_precisions))
    results["queries"] = len(first_ranks)
    results["queries_without_relevant"] = int(np.count_nonzero(counts == 0))
    return results


def brute_force_top_k(queries, references=None, k=1):
    """Return the indices of each query's `k` best references."""
    return np.stack([order[:k] for order in ranked_references(queries, references)])
