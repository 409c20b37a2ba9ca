"""Recall@K, MAP@R, R-precision and first relevant ranks against a numpy brute force."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_xbm.retrieval import (
    BENCHMARK_PROTOCOLS,
    benchmark_ks,
    evaluate_retrieval,
    first_relevant_rank,
    leave_one_out_recall,
    rank_relevant_items,
    ranks_from_neighbors,
    relevant_counts,
)
from tests.retrieval_reference import brute_force_metrics, brute_force_ranks, grid_embeddings, unit_rows


def clustered_rows(num_classes, per_class, dim, noise, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    rows = unit_rows(num_classes, dim, seed)[labels] + noise * rng.normal(size=(labels.size, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True), labels


@settings(max_examples=40, deadline=None)
@given(count=st.integers(2, 120), num_labels=st.integers(1, 40), block_size=st.integers(1, 130), seed=st.integers(0, 2**31 - 1))
def test_leave_one_out_matches_brute_force(count, num_labels, block_size, seed):
    # Grid rows: exact float32 inner products, many exact ties and duplicates,
    # and singleton labels whose queries have no relevant reference.
    embeddings = grid_embeddings(count, seed)
    labels = np.random.default_rng(seed).integers(0, num_labels, count)
    ks = tuple(sorted({1, min(3, count - 1), count - 1}))
    results, ranks = evaluate_retrieval(embeddings, labels, ks=ks, block_size=block_size, return_per_query=True)
    assert results == pytest.approx(brute_force_metrics(embeddings, labels, ks=ks))
    first_ranks, counts, average_precisions, r_precisions = brute_force_ranks(embeddings, labels)
    np.testing.assert_array_equal(ranks.first_relevant_rank, first_ranks)
    np.testing.assert_array_equal(ranks.relevant_count, counts)
    np.testing.assert_allclose(ranks.average_precision_at_r, average_precisions)
    np.testing.assert_allclose(ranks.r_precision, r_precisions)


@settings(max_examples=40, deadline=None)
@given(
    num_queries=st.integers(1, 60),
    num_gallery=st.integers(1, 150),
    num_labels=st.integers(1, 30),
    block_size=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_query_gallery_matches_brute_force(num_queries, num_gallery, num_labels, block_size, seed):
    rng = np.random.default_rng(seed)
    queries = grid_embeddings(num_queries, seed)
    # Half the gallery copies queries exactly; labels leave some classes out of the gallery.
    gallery = np.concatenate([queries[rng.integers(0, num_queries, num_gallery // 2)], grid_embeddings(num_gallery - num_gallery // 2, seed + 1)])
    query_labels = rng.integers(0, num_labels, num_queries)
    gallery_labels = rng.integers(0, num_labels, num_gallery)
    ks = tuple(sorted({1, min(5, num_gallery), num_gallery}))
    results, ranks = evaluate_retrieval(queries, query_labels, gallery, gallery_labels, ks=ks, block_size=block_size, return_per_query=True)
    assert results == pytest.approx(brute_force_metrics(queries, query_labels, gallery, gallery_labels, ks=ks))
    first_ranks, counts, _, _ = brute_force_ranks(queries, query_labels, gallery, gallery_labels)
    np.testing.assert_array_equal(ranks.first_relevant_rank, first_ranks)
    np.testing.assert_array_equal(ranks.relevant_count, counts)


def test_continuous_clusters_match_brute_force():
    embeddings, labels = clustered_rows(40, 6, dim=16, noise=0.6, seed=4)
    ks = (1, 2, 4, 8, 100)
    expected = brute_force_metrics(embeddings, labels, ks=ks)
    assert evaluate_retrieval(embeddings, labels, ks=ks) == pytest.approx(expected)
    assert 0.0 < expected["recall@1"] < 1.0
    assert 0.0 < expected["map@r"] < expected["recall@1"]


def test_first_relevant_rank_beyond_candidates():
    # Random labels over 4,000 grid rows: most relevant references rank far
    # below each row's candidates, and their ranks are counted over the row.
    gallery = grid_embeddings(4000, seed=21, dim=16, nonzero=16)
    gallery_labels = np.random.default_rng(21).integers(0, 1000, 4000)
    queries = grid_embeddings(300, seed=22, dim=16, nonzero=16)
    query_labels = np.random.default_rng(22).integers(0, 1000, 300)
    results, ranks = evaluate_retrieval(queries, query_labels, gallery, gallery_labels, ks=(1, 100, 1000, 4000), return_per_query=True)
    first_ranks, _, average_precisions, _ = brute_force_ranks(queries, query_labels, gallery, gallery_labels)
    np.testing.assert_array_equal(ranks.first_relevant_rank, first_ranks)
    np.testing.assert_allclose(ranks.average_precision_at_r, average_precisions)
    assert (first_ranks > 100).mean() > 0.5
    assert results["recall@4000"] == pytest.approx(np.mean(first_ranks > 0))


def test_absent_class_counts_as_miss():
    queries = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    gallery = np.array([[1, 0], [0, 1], [0.8, 0.6]], np.float32)
    results = evaluate_retrieval(queries, [0, 1, 2], gallery, [0, 1, 1], ks=(1, 3))
    # Query 0 finds its one class-0 item first. Query 1 ranks its two class-1
    # items first (scores 1.0 and 0.6). Query 2 has no class-2 item.
    assert results == {
        "recall@1": pytest.approx(2 / 3),
        "recall@3": pytest.approx(2 / 3),
        "map@r": pytest.approx((1.0 + 1.0 + 0.0) / 3),
        "r_precision": pytest.approx((1.0 + 1.0 + 0.0) / 3),
        "queries": 3,
        "queries_without_relevant": 1,
    }


def test_map_at_r_by_hand():
    # Query 0 (label 0) ranks, best first: 1 (label 0), 2 (label 1), 3 (label 0).
    # R = 2 and the top 2 contain one relevant item, at rank 1: AP@R = (1/1) / 2.
    embeddings = np.array([[1.0, 0.0], [0.96, 0.28], [0.8, 0.6], [0.6, 0.8]], np.float32)
    labels = np.array([0, 0, 1, 0])
    _, ranks = evaluate_retrieval(embeddings, labels, ks=(1,), return_per_query=True)
    assert ranks.relevant_count[0] == 2
    assert ranks.average_precision_at_r[0] == pytest.approx(0.5)
    assert ranks.r_precision[0] == pytest.approx(0.5)
    assert ranks.first_relevant_rank[0] == 1
    # Query 3 ranks 2 (label 1), 1, 0. R = 2, and of its relevant items at ranks 2 and 3 only rank 2 is within R.
    assert ranks.first_relevant_rank[3] == 2
    assert ranks.average_precision_at_r[3] == pytest.approx((1 / 2) / 2)


def test_duplicate_of_query_counts_as_neighbor():
    # Row 2 duplicates row 0: leave-one-out removes only the query's own row.
    embeddings = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    results, ranks = evaluate_retrieval(embeddings, [5, 6, 5], ks=(1,), return_per_query=True)
    np.testing.assert_array_equal(ranks.first_relevant_rank, [1, 0, 1])
    assert results["recall@1"] == pytest.approx(2 / 3)
    assert results["queries_without_relevant"] == 1


def test_string_labels():
    embeddings, labels = clustered_rows(10, 4, dim=8, noise=0.5, seed=2)
    names = np.array([f"product_{label}" for label in labels])
    assert evaluate_retrieval(embeddings, names, ks=(1, 4)) == evaluate_retrieval(embeddings, labels, ks=(1, 4))


def test_scann_matches_exact_on_brute_force_index():
    embeddings, labels = clustered_rows(300, 5, dim=32, noise=0.7, seed=3)
    ks = (1, 10, 100)
    exact, exact_ranks = evaluate_retrieval(embeddings, labels, ks=ks, return_per_query=True)
    scann, scann_ranks = evaluate_retrieval(embeddings, labels, ks=ks, index="scann", return_per_query=True)
    assert scann_ranks.searched == 100
    within = exact_ranks.first_relevant_rank <= 100
    agreement = np.mean(scann_ranks.first_relevant_rank[within] == exact_ranks.first_relevant_rank[within])
    assert agreement > 0.99
    for key in exact:
        assert scann[key] == pytest.approx(exact[key], abs=0.005)


def test_scann_partitioned_index_close_to_exact():
    embeddings, labels = clustered_rows(1000, 5, dim=16, noise=0.5, seed=6)
    exact = evaluate_retrieval(embeddings, labels, ks=(1, 10))
    scann = evaluate_retrieval(embeddings, labels, ks=(1, 10), index="scann", index_options={"brute_force_limit": 1000})
    assert scann["recall@1"] == pytest.approx(exact["recall@1"], abs=0.02)
    assert scann["map@r"] == pytest.approx(exact["map@r"], abs=0.02)


def test_ranks_from_neighbors_by_hand():
    neighbor_labels = np.array([[1, 0, 0, 2], [3, 3, 3, 3], [2, 2, 1, 1]])
    ranks = ranks_from_neighbors([0, 1, 2], neighbor_labels, relevant_count=np.array([2, 1, 3]))
    np.testing.assert_array_equal(ranks.first_relevant_rank, [2, 0, 1])
    # Query 0: relevant at ranks 2, 3 with R = 2 -> (1/2) / 2. Query 2: ranks 1, 2 within R = 3 -> (1 + 1) / 3.
    np.testing.assert_allclose(ranks.average_precision_at_r, [0.25, 0.0, 2 / 3])
    np.testing.assert_allclose(ranks.r_precision, [0.5, 0.0, 2 / 3])
    assert ranks.searched == 4


def test_ranks_from_neighbors_needs_depth_r():
    with pytest.raises(ValueError, match="only 2 were searched for queries with R up to 3"):
        ranks_from_neighbors([0], np.array([[0, 0]]), relevant_count=np.array([3]))


def test_first_relevant_rank_by_hand():
    np.testing.assert_array_equal(first_relevant_rank([0, 1, 2], [[1, 0], [1, 1], [0, 0]]), [2, 1, 0])


def test_relevant_counts():
    np.testing.assert_array_equal(relevant_counts(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 2]), leave_one_out=True), [1, 1, 0, 0])
    np.testing.assert_array_equal(relevant_counts(np.array([0, 3]), np.array([0, 0, 1]), leave_one_out=False), [2, 0])


def test_rank_relevant_items_bounds_memory_by_block(monkeypatch):
    # The score blocks never exceed block_size rows, whatever the query count.
    from keras_xbm.retrieval import ranking

    shapes = []
    original = ranking.score_blocks

    def recording_score_blocks(*args):
        for start, stop, scores in original(*args):
            shapes.append(scores.shape)
            yield start, stop, scores

    monkeypatch.setattr(ranking, "score_blocks", recording_score_blocks)
    embeddings, labels = clustered_rows(50, 4, dim=8, noise=0.5, seed=1)
    rank_relevant_items(embeddings, labels, None, None, block_size=32)
    assert max(rows for rows, _ in shapes) == 32
    assert sum(rows for rows, _ in shapes) == 200
    assert {columns for _, columns in shapes} == {200}


def test_leave_one_out_recall_keeps_recall_keys():
    embeddings, labels = clustered_rows(20, 5, dim=8, noise=0.6, seed=3)
    recalls = leave_one_out_recall(embeddings, labels, ks=(1, 4))
    assert set(recalls) == {"recall@1", "recall@4"}
    expected = brute_force_metrics(embeddings, labels, ks=(1, 4))
    assert recalls["recall@1"] == pytest.approx(expected["recall@1"])


def test_benchmark_protocols():
    assert benchmark_ks("sop") == (1, 10, 100, 1000)
    assert benchmark_ks("inshop") == (1, 10, 20, 30, 40, 50)
    assert benchmark_ks("vehicleid") == (1, 5)
    assert benchmark_ks("cub") == benchmark_ks("cars") == benchmark_ks("omniglot") == (1, 2, 4, 8)
    assert BENCHMARK_PROTOCOLS["inshop"].protocol == "query_gallery"
    assert {name for name, entry in BENCHMARK_PROTOCOLS.items() if entry.protocol == "leave_one_out"} == {
        "sop", "vehicleid", "cub", "cars", "omniglot"
    }
    with pytest.raises(ValueError, match="Unknown benchmark 'imagenet'"):
        benchmark_ks("imagenet")
