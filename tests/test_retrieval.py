import numpy as np
import pytest

from keras_xbm.retrieval import exact_search, recall_at_k, scann_search
from keras_xbm.retrieval.protocols import leave_one_out_recall


def unit_rows(count, dim, seed):
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_force_leave_one_out(embeddings, k):
    scores = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
    np.fill_diagonal(scores, -np.inf)
    # Stable sort of the negated scores: ties go to the lower index.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def brute_force_recall(embeddings, labels, ks):
    order = brute_force_leave_one_out(embeddings, max(ks))
    results = {}
    for k in ks:
        hits = [labels[i] in labels[order[i, :k]] for i in range(len(labels))]
        results[f"recall@{k}"] = float(np.mean(hits))
    return results


@pytest.mark.parametrize("block_size", [1, 7, 1000])
def test_exact_search_matches_brute_force(block_size):
    embeddings = unit_rows(120, 8, seed=0)
    indices, scores = exact_search(embeddings, k=5, block_size=block_size)
    expected = brute_force_leave_one_out(embeddings, 5)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(embeddings @ embeddings.T, expected, axis=1), atol=1e-6)


def test_exact_search_keeps_duplicates_of_query():
    base = unit_rows(3, 4, seed=1)
    embeddings = np.concatenate([base, base[:1]])  # row 3 duplicates row 0
    indices, _ = exact_search(embeddings, k=1)
    assert indices[0, 0] == 3
    assert indices[3, 0] == 0


def test_exact_search_query_against_gallery():
    queries, gallery = unit_rows(10, 6, seed=2), unit_rows(30, 6, seed=3)
    indices, _ = exact_search(queries, gallery, k=4, block_size=3)
    expected = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(indices, expected)


def test_ties_ordered_by_index():
    embeddings = np.array([[1.0, 0.0]] * 4, np.float32)
    indices, _ = exact_search(embeddings, k=3)
    np.testing.assert_array_equal(indices, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


def test_recall_matches_brute_force_on_clusters():
    rng = np.random.default_rng(4)
    centers = unit_rows(20, 16, seed=5)
    labels = np.repeat(np.arange(20), 6)
    embeddings = centers[labels] + 0.6 * rng.normal(size=(120, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ks = (1, 2, 4, 8)
    expected = brute_force_recall(embeddings, labels, ks)
    assert leave_one_out_recall(embeddings, labels, ks) == pytest.approx(expected)
    assert 0.0 < expected["recall@1"] < 1.0


def test_recall_at_k_by_hand():
    query_labels = np.array([0, 1, 2])
    neighbor_labels = np.array([[0, 1, 1], [0, 0, 1], [0, 1, 0]])
    assert recall_at_k(query_labels, neighbor_labels, ks=(1, 2, 3)) == {
        "recall@1": pytest.approx(1 / 3),
        "recall@2": pytest.approx(1 / 3),
        "recall@3": pytest.approx(2 / 3),
    }


def test_scann_builds_and_matches_exact_on_small_set():
    # A broken ScaNN wheel fails here, loudly.
    import scann  # noqa: F401

    embeddings = unit_rows(300, 16, seed=6)
    scann_indices, _ = scann_search(embeddings, k=5)
    exact_indices, _ = exact_search(embeddings, k=5)
    assert not (scann_indices == np.arange(300)[:, None]).any()
    agreement = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(scann_indices, exact_indices)])
    assert agreement > 0.99


def test_scann_partitioned_index_recalls_exact_neighbors():
    # Clustered like trained embeddings: 600 classes of 5 images.
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(600), 5)
    embeddings = unit_rows(600, 16, seed=8)[labels] + 0.3 * rng.normal(size=(3000, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    scann_indices, _ = scann_search(embeddings, k=10, brute_force_limit=1000)
    exact_indices, _ = exact_search(embeddings, k=10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(scann_indices, exact_indices)])
    assert not (scann_indices == np.arange(3000)[:, None]).any()
    assert overlap > 0.8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 10}, "k=10 is larger than the 9 references"),
        ({"k": 0}, "Invalid k=0"),
    ],
)
def test_bad_k_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        exact_search(unit_rows(10, 3, seed=0), **kwargs)


def test_nan_rows_named():
    embeddings = unit_rows(10, 3, seed=0)
    embeddings[[2, 7]] = np.nan
    with pytest.raises(ValueError, match="2 row\\(s\\) with NaN or Inf values: rows 2, 7"):
        exact_search(embeddings, k=1)


def test_label_count_mismatch_rejected():
    with pytest.raises(ValueError, match="one label per embedding row"):
        leave_one_out_recall(unit_rows(10, 3, seed=0), np.zeros(9))
