"""Nearest-neighbour search and retrieval metrics."""

from keras_xbm.retrieval.exact import exact_search
from keras_xbm.retrieval.metrics import recall_at_k
from keras_xbm.retrieval.scann_index import build_scann_searcher, scann_search

__all__ = ["build_scann_searcher", "exact_search", "recall_at_k", "scann_search"]
