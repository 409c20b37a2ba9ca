"""Evaluation protocols: who queries whom, and with which search."""

import numpy as np

from keras_xbm.retrieval.exact import exact_search
from keras_xbm.retrieval.metrics import recall_at_k
from keras_xbm.retrieval.scann_index import scann_search

SEARCHES = {"exact": exact_search, "scann": scann_search}


def leave_one_out_recall(embeddings, labels, ks=(1, 2, 4, 8), index="exact"):
    """Return `{"recall@K": value}` where every item queries all the others.

    Args:
        embeddings: float `[count, dim]`, L2-normalised rows.
        labels: `[count]` labels.
        ks: the K values. Defaults to `(1, 2, 4, 8)`.
        index: `"exact"` (blocked brute force, the ground truth) or `"scann"`.
            Defaults to `"exact"`.
    """
    if index not in SEARCHES:
        raise ValueError(f"Unknown index={index!r}: expected one of {', '.join(SEARCHES)}.")
    labels = np.asarray(labels)
    embeddings = np.asarray(embeddings)
    if labels.ndim != 1 or embeddings.ndim != 2 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"Expected one label per embedding row; received labels of shape {labels.shape} "
            f"and embeddings of shape {embeddings.shape}."
        )
    indices, _ = SEARCHES[index](embeddings, None, k=max(ks))
    return recall_at_k(labels, labels[indices], ks)


def evaluate_retrieval(query_embeddings, query_labels, gallery_embeddings=None, gallery_labels=None, ks=(1, 2, 4, 8), index="exact"):
    """Return `{"recall@K": value}` for either protocol.

    With `gallery_embeddings=None` every query searches all the other queries
    (leave-one-out, as SOP, CUB, Cars and Omniglot are evaluated); otherwise
    each query searches the gallery (as In-Shop is evaluated). A query whose
    label is absent from the gallery counts as a miss.
    """
    if gallery_embeddings is None:
        return leave_one_out_recall(query_embeddings, query_labels, ks=ks, index=index)
    if index not in SEARCHES:
        raise ValueError(f"Unknown index={index!r}: expected one of {', '.join(SEARCHES)}.")
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    indices, _ = SEARCHES[index](query_embeddings, gallery_embeddings, k=max(ks))
    return recall_at_k(query_labels, gallery_labels[indices], ks)
