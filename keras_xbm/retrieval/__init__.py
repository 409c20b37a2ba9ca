"""Nearest-neighbour search and retrieval metrics."""

from keras_xbm.retrieval.exact import exact_search
from keras_xbm.retrieval.metrics import first_relevant_rank, ranks_from_neighbors, recall_at_k, summarize_ranks
from keras_xbm.retrieval.protocols import (
    BENCHMARK_PROTOCOLS,
    benchmark_ks,
    evaluate_retrieval,
    leave_one_out_recall,
)
from keras_xbm.retrieval.ranking import RelevanceRanks, rank_relevant_items, relevant_counts
from keras_xbm.retrieval.scann_index import build_scann_searcher, scann_neighbor_recall, scann_search, scann_settings

__all__ = [
    "BENCHMARK_PROTOCOLS",
    "RelevanceRanks",
    "benchmark_ks",
    "build_scann_searcher",
    "evaluate_retrieval",
    "exact_search",
    "first_relevant_rank",
    "leave_one_out_recall",
    "rank_relevant_items",
    "ranks_from_neighbors",
    "recall_at_k",
    "relevant_counts",
    "scann_neighbor_recall",
    "scann_search",
    "scann_settings",
    "summarize_ranks",
]
