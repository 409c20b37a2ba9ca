"""Bad input to retrieval evaluation: each case raises a ValueError that names the problem."""

import numpy as np
import pytest

from keras_xbm.retrieval import evaluate_retrieval
from tests.retrieval_reference import brute_force_metrics, unit_rows


def test_k_larger_than_leave_one_out_references():
    with pytest.raises(ValueError, match=r"K=10 is larger than the 9 references each query has \(leave-one-out\)"):
        evaluate_retrieval(unit_rows(10, 4, seed=0), np.arange(10) % 3, ks=(1, 10))


def test_k_larger_than_gallery():
    with pytest.raises(ValueError, match="K=8 is larger than the 5 references each query has in the gallery"):
        evaluate_retrieval(unit_rows(10, 4, seed=0), np.zeros(10), unit_rows(5, 4, seed=1), np.zeros(5), ks=(1, 8))


def test_single_item_has_no_reference():
    with pytest.raises(ValueError, match="K=1 is larger than the 0 references"):
        evaluate_retrieval(unit_rows(1, 4, seed=0), [0], ks=(1,))


@pytest.mark.parametrize("index", ["exact", "scann"])
def test_label_count_differs_from_rows(index):
    with pytest.raises(ValueError, match=r"\blabels has 9 entries but the embeddings have 10 rows"):
        evaluate_retrieval(unit_rows(10, 4, seed=0), np.zeros(9), index=index, ks=(1,))
    with pytest.raises(ValueError, match="gallery_labels has 6 entries but the embeddings have 5 rows"):
        evaluate_retrieval(unit_rows(10, 4, seed=0), np.zeros(10), unit_rows(5, 4, seed=1), np.zeros(6), index=index, ks=(1,))


def test_labels_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"Expected labels of shape \[count\], received shape \(10, 1\)"):
        evaluate_retrieval(unit_rows(10, 4, seed=0), np.zeros((10, 1)), ks=(1,))


def test_nan_and_inf_rows_counted_and_named():
    queries = unit_rows(20, 4, seed=0)
    queries[[3, 11]] = np.nan
    queries[17, 2] = np.inf
    with pytest.raises(ValueError, match=r"\bembeddings has 3 row\(s\) with NaN or Inf values: rows 3, 11, 17\."):
        evaluate_retrieval(queries, np.zeros(20), ks=(1,))
    gallery = unit_rows(30, 4, seed=1)
    gallery[::2] = -np.inf
    with pytest.raises(ValueError, match=r"gallery_embeddings has 15 row\(s\) with NaN or Inf values: rows 0, 2, 4, 6, 8, 10, 12, 14, 16, 18 \.\.\."):
        evaluate_retrieval(unit_rows(5, 4, seed=0), np.zeros(5), gallery, np.zeros(30), ks=(1,))


def test_empty_gallery():
    with pytest.raises(ValueError, match=r"gallery_embeddings is empty \(shape \(0, 4\)\)"):
        evaluate_retrieval(unit_rows(5, 4, seed=0), np.zeros(5), np.zeros((0, 4), np.float32), np.zeros(0), ks=(1,))


def test_empty_queries():
    with pytest.raises(ValueError, match="query_embeddings is empty"):
        evaluate_retrieval(np.zeros((0, 4), np.float32), np.zeros(0), unit_rows(5, 4, seed=0), np.zeros(5), ks=(1,))


def test_rows_not_unit_length():
    queries = unit_rows(12, 4, seed=0)
    queries[[1, 5]] *= 3.0
    with pytest.raises(ValueError, match=r"query_embeddings has 2 row\(s\) whose L2 norm is not 1 .*rows 1, 5, norms from 3 to 3.*normalize=True"):
        evaluate_retrieval(queries, np.arange(12) % 4, ks=(1,))


def test_normalize_equals_prenormalized_rows():
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(40, 6)).astype(np.float32) * rng.uniform(0.1, 10.0, size=(40, 1)).astype(np.float32)
    labels = np.arange(40) % 8
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    results = evaluate_retrieval(raw, labels, ks=(1, 4), normalize=True)
    assert results == pytest.approx(brute_force_metrics(unit, labels, ks=(1, 4)))


def test_normalize_rejects_zero_rows():
    raw = unit_rows(6, 3, seed=0)
    raw[4] = 0.0
    with pytest.raises(ValueError, match=r"query_embeddings has 1 all-zero row\(s\), which cannot be L2-normalised: rows 4\."):
        evaluate_retrieval(raw, np.zeros(6), ks=(1,), normalize=True)


def test_gallery_without_labels():
    with pytest.raises(ValueError, match="Pass gallery_embeddings and gallery_labels together"):
        evaluate_retrieval(unit_rows(5, 4, seed=0), np.zeros(5), unit_rows(5, 4, seed=1), ks=(1,))


def test_width_mismatch():
    with pytest.raises(ValueError, match="Query embeddings have width 4 but gallery embeddings have width 3"):
        evaluate_retrieval(unit_rows(5, 4, seed=0), np.zeros(5), unit_rows(5, 3, seed=1), np.zeros(5), ks=(1,))


def test_unknown_index():
    with pytest.raises(ValueError, match="Unknown index='faiss': expected one of exact, scann"):
        evaluate_retrieval(unit_rows(5, 4, seed=0), np.zeros(5), ks=(1,), index="faiss")


def test_label_kinds_differ():
    with pytest.raises(ValueError, match="cannot be compared with reference labels"):
        evaluate_retrieval(unit_rows(5, 4, seed=0), np.arange(5), unit_rows(5, 4, seed=1), np.array(list("abcde")), ks=(1,))


@pytest.mark.parametrize("ks, message", [((), "at least one K value"), ((0, 1), "Invalid K=0"), ((1.5,), "Invalid K=1.5"), ((True,), "Invalid K=True")])
def test_invalid_ks(ks, message):
    with pytest.raises(ValueError, match=message):
        evaluate_retrieval(unit_rows(5, 4, seed=0), np.zeros(5), ks=ks)


def test_three_dimensional_embeddings():
    with pytest.raises(ValueError, match=r"Expected embeddings of shape \[count, dim\], received shape \(2, 3, 4\)"):
        evaluate_retrieval(np.zeros((2, 3, 4), np.float32), np.zeros(2), ks=(1,))
