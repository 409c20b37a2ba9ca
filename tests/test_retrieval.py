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


# Exact search at scale: candidate selection, ties and duplicates.

from hypothesis import given, settings
from hypothesis import strategies as st

from keras_xbm.retrieval import scann_neighbor_recall, scann_settings
from keras_xbm.retrieval.blocks import duplicate_rows, top_k_rows
from keras_xbm.retrieval.scann_index import count_found
from tests.retrieval_reference import brute_force_top_k, grid_embeddings


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 300), data=st.data())
def test_top_k_rows_matches_stable_sort(rows, width, data):
    k = data.draw(st.integers(1, width))
    # Scores from a handful of values: most rows are full of exact ties.
    levels = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**31 - 1))
    scores = np.random.default_rng(seed).integers(0, levels, size=(rows, width)).astype(np.float32)
    indices, values = top_k_rows(scores, k)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(scores, expected, axis=1))


def test_top_k_rows_with_threshold_sample():
    # 5000 columns with k = 300: the threshold comes from the first 2400
    # columns, and the candidates are ranked exactly.
    scores = np.round(np.random.default_rng(3).normal(size=(7, 5000)), 2).astype(np.float32)
    indices, _ = top_k_rows(scores, 300)
    np.testing.assert_array_equal(indices, np.argsort(-scores, axis=1, kind="stable")[:, :300])


@pytest.mark.parametrize("block_size", [1, 13, None])
def test_exact_search_grid_ties_match_brute_force(block_size):
    embeddings = grid_embeddings(400, seed=11)
    indices, _ = exact_search(embeddings, k=40, block_size=block_size)
    np.testing.assert_array_equal(indices, brute_force_top_k(embeddings, k=40))
    gallery = grid_embeddings(250, seed=12)
    indices, _ = exact_search(embeddings, gallery, k=250, block_size=block_size)
    np.testing.assert_array_equal(indices, brute_force_top_k(embeddings, gallery, k=250))


def test_duplicate_references_tie_in_index_order():
    # Three-dimensional rows, where a float32 matrix product gives identical
    # columns scores one unit in the last place apart by their position.
    rng = np.random.default_rng(0)
    queries = unit_rows(47, 3, seed=0)
    gallery = queries[rng.integers(0, 47, 85)]
    indices, scores = exact_search(queries, gallery, k=85, block_size=49)
    duplicates, originals = duplicate_rows(gallery)
    assert duplicates.size > 0
    for row_indices, row_scores in zip(indices, scores):
        position = {index: place for place, index in enumerate(row_indices)}
        for duplicate, original in zip(duplicates, originals):
            assert row_scores[position[duplicate]] == row_scores[position[original]]
            assert position[original] < position[duplicate]


def test_duplicate_rows_finds_first_copy():
    matrix = np.array([[1, 2], [3, 4], [1, 2], [3, 4], [1, 2], [5, 6]], np.float32)
    duplicates, originals = duplicate_rows(matrix)
    np.testing.assert_array_equal(duplicates, [2, 3, 4])
    np.testing.assert_array_equal(originals, [0, 1, 0])


def test_exact_search_rejects_bad_block_size():
    with pytest.raises(ValueError, match="Invalid block_size=0"):
        exact_search(unit_rows(10, 3, seed=0), k=1, block_size=0)


def test_exact_search_rejects_width_mismatch():
    with pytest.raises(ValueError, match="Queries have width 3 but references have width 4"):
        exact_search(unit_rows(10, 3, seed=0), unit_rows(10, 4, seed=0), k=1)


# ScaNN configuration and its recall of the exact neighbours.


def test_scann_settings_follow_data_size():
    assert scann_settings(20_000, 10) == {"mode": "brute_force"}
    large = scann_settings(60_502, 1001)
    assert large["mode"] == "tree_ah"
    assert large["num_leaves"] == 246
    assert large["num_leaves_to_search"] == 36
    assert large["reorder_k"] == 1001
    assert large["training_sample_size"] == 10_000
    small_k = scann_settings(60_502, 10)
    assert small_k["reorder_k"] == 200
    assert scann_settings(200_000, 10)["training_sample_size"] == 40 * 447


def test_scann_settings_overrides():
    chosen = scann_settings(
        50_000, 10, brute_force_limit=1_000, num_leaves=100, num_leaves_to_search=7, reorder_k=50,
        dimensions_per_block=4, anisotropic_quantization_threshold=0.3, training_sample_size=5_000,
    )
    assert chosen == {
        "mode": "tree_ah",
        "num_leaves": 100,
        "num_leaves_to_search": 7,
        "reorder_k": 50,
        "dimensions_per_block": 4,
        "anisotropic_quantization_threshold": 0.3,
        "training_sample_size": 5_000,
    }
    assert scann_settings(50_000, 10, brute_force_limit=60_000) == {"mode": "brute_force"}


def test_scann_neighbor_recall_brute_force_is_complete():
    embeddings = unit_rows(500, 16, seed=9)
    recall = scann_neighbor_recall(embeddings, k=10)
    assert recall["neighbor_recall@10"] > 0.99
    assert recall["top1_agreement"] > 0.99


def test_count_found_matches_set_intersection():
    rng = np.random.default_rng(5)
    found = np.stack([rng.choice(50, 10, replace=False) for _ in range(30)])
    expected = np.stack([rng.choice(50, 10, replace=False) for _ in range(30)])
    counts = count_found(found, expected)
    np.testing.assert_array_equal(counts, [len(set(a) & set(b)) for a, b in zip(found, expected)])


def test_scann_neighbor_recall_counts_missed_neighbors():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(600), 5)
    embeddings = unit_rows(600, 16, seed=8)[labels] + 0.3 * rng.normal(size=(3000, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    exact_indices, _ = exact_search(embeddings, k=10)
    few_leaves = scann_neighbor_recall(embeddings, k=10, exact_indices=exact_indices, brute_force_limit=1000, num_leaves_to_search=2)
    many_leaves = scann_neighbor_recall(embeddings, k=10, brute_force_limit=1000, num_leaves_to_search=40)
    assert 0.3 < few_leaves["neighbor_recall@10"] < 0.95
    assert many_leaves["neighbor_recall@10"] > 0.95
    assert few_leaves["top1_agreement"] < many_leaves["top1_agreement"]


def test_scann_short_results_are_searched_exactly(caplog):
    # One leaf of about 55 rows cannot hold 200 neighbours: ScaNN pads them,
    # and those queries are searched exactly instead.
    embeddings = unit_rows(3000, 16, seed=10)
    with caplog.at_level("WARNING", logger="keras_xbm.retrieval.scann_index"):
        indices, scores = scann_search(embeddings, k=200, brute_force_limit=1000, num_leaves_to_search=1)
    exact_indices, exact_scores = exact_search(embeddings, k=200)
    assert np.isfinite(scores).all()
    assert "searching them exactly" in caplog.text
    np.testing.assert_allclose(np.sort(scores, axis=1), np.sort(exact_scores, axis=1), atol=1e-5)
