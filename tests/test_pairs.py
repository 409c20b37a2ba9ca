import numpy as np
import pytest

from keras_xbm.pairs import cosine_similarity, in_batch_pairs, pair_masks


def test_masks_by_label_id_and_validity():
    pos, neg = pair_masks(
        query_labels=[1, 2],
        ref_labels=[1, 1, 2, 3, 1],
        query_ids=[10, 20],
        ref_ids=[10, 11, 21, 22, 12],
        ref_valid=[True, True, True, True, False],
    )
    # Query 0 (label 1, id 10): ref 0 is itself, ref 1 a positive, ref 4 an empty slot.
    np.testing.assert_array_equal(pos.numpy()[0], [False, True, False, False, False])
    np.testing.assert_array_equal(neg.numpy()[0], [False, False, True, True, False])
    # Query 1 (label 2, id 20): ref 2 is a positive.
    np.testing.assert_array_equal(pos.numpy()[1], [False, False, True, False, False])
    np.testing.assert_array_equal(neg.numpy()[1], [True, True, False, True, False])


def test_stale_copy_masked_by_id_not_similarity():
    # The memory contains an old copy of query id 5 whose embedding has drifted,
    # and a different image that is exactly identical to the query.
    queries = np.array([[1.0, 0.0]], np.float32)
    references = np.array([[0.6, 0.8], [1.0, 0.0]], np.float32)
    similarity = cosine_similarity(queries, references).numpy()
    pos, neg = pair_masks([3], [3, 3], query_ids=[5], ref_ids=[5, 6])
    np.testing.assert_allclose(similarity, [[0.6, 1.0]], atol=1e-6)
    np.testing.assert_array_equal(pos.numpy(), [[False, True]])
    np.testing.assert_array_equal(neg.numpy(), [[False, False]])


def test_in_batch_pairs_drop_diagonal_without_ids():
    embeddings = np.eye(3, dtype=np.float32)
    _, pos, neg = in_batch_pairs(embeddings, [0, 0, 1])
    np.testing.assert_array_equal(pos.numpy(), [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(neg.numpy(), [[0, 0, 1], [0, 0, 1], [1, 1, 0]])


def test_in_batch_pairs_drop_repeated_image():
    # Rows 0 and 1 are the same image drawn twice (same sample id).
    embeddings = np.eye(3, dtype=np.float32)
    _, pos, _ = in_batch_pairs(embeddings, [0, 0, 0], sample_ids=[7, 7, 8])
    np.testing.assert_array_equal(pos.numpy(), [[0, 0, 1], [0, 0, 1], [1, 1, 0]])


def test_width_mismatch_names_both_widths():
    with pytest.raises(ValueError, match="Queries have width 4 but references have width 3"):
        cosine_similarity(np.ones((2, 4)), np.ones((5, 3)))


def test_ids_on_one_side_only_rejected():
    with pytest.raises(ValueError, match="both query_ids and ref_ids"):
        pair_masks([0], [0], query_ids=[1])
