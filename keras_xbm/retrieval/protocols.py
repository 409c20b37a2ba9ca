"""Evaluation protocols: who queries whom, with which search, and which K values each benchmark reports.

Two protocols cover the usual metric-learning benchmarks:

- leave-one-out: every item of one set queries all the others (Stanford
  Online Products, CUB-200-2011, Cars196, Omniglot, the VehicleID test lists);
- query against gallery: each query searches a separate gallery (In-Shop
  Clothes).

A query with no relevant reference (no other item of its class in
leave-one-out, or no gallery item of its class) is a miss for Recall@K and
scores 0 for MAP@R and R-precision. It is never dropped: the results count
such queries under `queries_without_relevant`. To compare with tools that
exclude them, such as pytorch-metric-learning's AccuracyCalculator, rescale
by `queries / (queries - queries_without_relevant)`.
"""

import collections
import logging

import numpy as np

from keras_xbm.retrieval.exact import exact_search
from keras_xbm.retrieval.inputs import (
    check_embeddings,
    check_ks,
    check_label_kinds,
    check_labels,
    check_not_empty,
    check_unit_norm,
    l2_normalize,
)
from keras_xbm.retrieval.metrics import ranks_from_neighbors, summarize_ranks
from keras_xbm.retrieval.ranking import RelevanceRanks, rank_relevant_items, relevant_counts
from keras_xbm.retrieval.scann_index import scann_search, scann_search_blocks

logger = logging.getLogger(__name__)

SEARCHES = {"exact": exact_search, "scann": scann_search}

Protocol = collections.namedtuple("Protocol", ["protocol", "ks"])

# The K values each benchmark's papers report, and how its test set is searched.
BENCHMARK_PROTOCOLS = {
    "sop": Protocol("leave_one_out", (1, 10, 100, 1000)),
    "inshop": Protocol("query_gallery", (1, 10, 20, 30, 40, 50)),
    "vehicleid": Protocol("leave_one_out", (1, 5)),
    "cub": Protocol("leave_one_out", (1, 2, 4, 8)),
    "cars": Protocol("leave_one_out", (1, 2, 4, 8)),
    "omniglot": Protocol("leave_one_out", (1, 2, 4, 8)),
}


def benchmark_ks(name):
    """Return the default K values of the benchmark `name`, such as `(1, 10, 100, 1000)` for `"sop"`."""
    if name not in BENCHMARK_PROTOCOLS:
        raise ValueError(f"Unknown benchmark {name!r}: expected one of {', '.join(BENCHMARK_PROTOCOLS)}.")
    return BENCHMARK_PROTOCOLS[name].ks


def check_retrieval_inputs(query_embeddings, query_labels, gallery_embeddings, gallery_labels, ks, normalize):
    """Validate and convert the inputs of `evaluate_retrieval`.

    Returns:
        `(queries, query_labels, gallery, gallery_labels, ks)`, with
        `gallery` and `gallery_labels` None for leave-one-out.
    """
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("Pass gallery_embeddings and gallery_labels together, or neither for leave-one-out.")
    ks = check_ks(ks)
    # Leave-one-out has no queries apart from the embeddings: name the arguments as the caller knows them.
    embeddings_name, labels_name = ("embeddings", "labels") if gallery_embeddings is None else ("query_embeddings", "query_labels")
    queries = check_embeddings(query_embeddings, embeddings_name)
    check_not_empty(queries, embeddings_name)
    query_labels = check_labels(query_labels, queries.shape[0], labels_name)
    gallery = None
    if gallery_embeddings is not None:
        gallery = check_embeddings(gallery_embeddings, "gallery_embeddings")
        check_not_empty(gallery, "gallery_embeddings")
        gallery_labels = check_labels(gallery_labels, gallery.shape[0], "gallery_labels")
        check_label_kinds(query_labels, gallery_labels)
        if gallery.shape[1] != queries.shape[1]:
            raise ValueError(
                f"Query embeddings have width {queries.shape[1]} but gallery embeddings have width {gallery.shape[1]}."
            )

    available = queries.shape[0] - 1 if gallery is None else gallery.shape[0]
    if max(ks) > available:
        raise ValueError(
            f"K={max(ks)} is larger than the {available} references each query has"
            f"{' (leave-one-out)' if gallery is None else ' in the gallery'}: expected K values up to {available}."
        )

    if normalize:
        queries = l2_normalize(queries, "query_embeddings")
        gallery = None if gallery is None else l2_normalize(gallery, "gallery_embeddings")
    else:
        check_unit_norm(queries, "query_embeddings")
        if gallery is not None:
            check_unit_norm(gallery, "gallery_embeddings")
    return queries, query_labels, gallery, gallery_labels, ks


def scann_relevance_ranks(queries, query_labels, gallery, gallery_labels, ks, index_options):
    """Return `RelevanceRanks` from ScaNN neighbour lists deep enough for every K and every R."""
    leave_one_out = gallery is None
    reference_labels = query_labels if leave_one_out else gallery_labels
    counts = relevant_counts(query_labels, reference_labels, leave_one_out)
    depth = max(max(ks), int(counts.max(initial=0)))
    parts = []
    for start, stop, indices, _ in scann_search_blocks(queries, gallery, depth, **index_options):
        parts.append(ranks_from_neighbors(query_labels[start:stop], reference_labels[indices], counts[start:stop]))
    return RelevanceRanks(
        np.concatenate([part.first_relevant_rank for part in parts]),
        counts,
        np.concatenate([part.average_precision_at_r for part in parts]),
        np.concatenate([part.r_precision for part in parts]),
        searched=depth,
    )


def evaluate_retrieval(query_embeddings, query_labels, gallery_embeddings=None, gallery_labels=None, ks=(1, 2, 4, 8), index="exact", normalize=False, block_size=None, index_options=None, return_per_query=False):
    """Evaluate retrieval by Recall@K, MAP@R and R-precision, with either protocol.

    With `gallery_embeddings=None` every query searches all the other queries
    (leave-one-out, as SOP, CUB, Cars, VehicleID and Omniglot are evaluated);
    otherwise each query searches the gallery (as In-Shop is evaluated).
    Ranking is by inner product, so the rows must be L2-normalised (or pass
    `normalize=True`). A query whose label is absent from its references
    counts as a miss and is counted under `queries_without_relevant`.

    With `index="exact"` the rank of every query's first relevant reference
    is computed over all references, so every Recall@K is exact. MAP@R comes
    from each query's exact top-R list. No `num_queries x num_references`
    matrix is held (see `ranking.rank_relevant_items`).
    With `index="scann"` the metrics come from ScaNN's top
    `max(max(ks), largest R)` neighbours.

    Args:
        query_embeddings: float `[num_queries, dim]`.
        query_labels: `[num_queries]` labels (integers or strings).
        gallery_embeddings: float `[num_gallery, dim]`, or `None` for
            leave-one-out. Defaults to `None`.
        gallery_labels: `[num_gallery]` labels, with `gallery_embeddings`.
        ks: the K values of Recall@K, each at most the number of references
            of a query. Defaults to `(1, 2, 4, 8)`.
        index: `"exact"` (the ground truth) or `"scann"`. Defaults to `"exact"`.
        normalize: L2-normalise the rows first, for embeddings that are not
            unit length. Defaults to False, which raises on such rows.
        block_size: queries scored at once by exact search. Defaults to
            `None`, a block of scores of 128 MiB.
        index_options: overrides of `scann_index.scann_settings` for
            `index="scann"`, such as `{"num_leaves_to_search": 40}`.
        return_per_query: also return the per-query `RelevanceRanks`.
            Defaults to False.

    Returns:
        A dictionary with `recall@K` for each K, `map@r`, `r_precision`,
        `queries` and `queries_without_relevant`; with
        `return_per_query=True`, the pair `(results, ranks)`.

    Raises:
        ValueError: for an unknown index, NaN or Inf rows, label counts that
            differ from the embedding rows, an empty query set or gallery, a
            K larger than the references of a query, or rows that are not
            unit length without `normalize=True`.
    """
    if index not in SEARCHES:
        raise ValueError(f"Unknown index={index!r}: expected one of {', '.join(SEARCHES)}.")
    queries, query_labels, gallery, gallery_labels, ks = check_retrieval_inputs(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels, ks, normalize
    )
    if index == "exact":
        ranks = rank_relevant_items(queries, query_labels, gallery, gallery_labels, block_size=block_size)
    else:
        ranks = scann_relevance_ranks(queries, query_labels, gallery, gallery_labels, ks, index_options or {})

    results = summarize_ranks(ranks, ks)
    if results["queries_without_relevant"]:
        logger.warning(
            "%d of %d queries have no relevant reference; they count as misses.",
            results["queries_without_relevant"], results["queries"],
        )
    return (results, ranks) if return_per_query else results


def leave_one_out_recall(embeddings, labels, ks=(1, 2, 4, 8), index="exact"):
    """Return `{"recall@K": value}` where every item queries all the others.

    Args:
        embeddings: float `[count, dim]`, L2-normalised rows.
        labels: `[count]` labels.
        ks: the K values. Defaults to `(1, 2, 4, 8)`.
        index: `"exact"` (blocked brute force, the ground truth) or `"scann"`.
            Defaults to `"exact"`.
    """
    results = evaluate_retrieval(embeddings, labels, ks=ks, index=index)
    return {key: value for key, value in results.items() if key.startswith("recall@")}
