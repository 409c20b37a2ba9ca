import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_xbm.losses import ContrastiveLoss, contrastive_loss
from keras_xbm.pairs import in_batch_pairs

NORMALIZATIONS = ["sum", "batch", "pairs", "anchor"]


def contrastive_oracle(similarity, pos_mask, neg_mask, threshold, normalization):
    """Loop-by-loop numpy reference of the contrastive loss and of dL/dS."""
    num_queries, num_refs = similarity.shape
    pos_terms = {i: [] for i in range(num_queries)}
    neg_terms = {i: [] for i in range(num_queries)}
    for i in range(num_queries):
        for j in range(num_refs):
            if pos_mask[i, j]:
                pos_terms[i].append((j, 1.0 - similarity[i, j]))
            elif neg_mask[i, j] and similarity[i, j] > threshold:
                neg_terms[i].append((j, similarity[i, j]))

    grad = np.zeros_like(similarity, dtype=np.float64)
    all_pos = [term for i in pos_terms for term in pos_terms[i]]
    all_neg = [term for i in neg_terms for term in neg_terms[i]]
    if normalization in ("sum", "batch"):
        scale = 1.0 if normalization == "sum" else 1.0 / num_queries
        value = scale * (sum(t for _, t in all_pos) + sum(t for _, t in all_neg))
        for i in range(num_queries):
            for j, _ in pos_terms[i]:
                grad[i, j] = -scale
            for j, _ in neg_terms[i]:
                grad[i, j] = scale
        return value, grad
    if normalization == "pairs":
        value = 0.0
        if all_pos:
            value += np.mean([t for _, t in all_pos])
        if all_neg:
            value += np.mean([t for _, t in all_neg])
        for i in range(num_queries):
            for j, _ in pos_terms[i]:
                grad[i, j] = -1.0 / len(all_pos)
            for j, _ in neg_terms[i]:
                grad[i, j] = 1.0 / len(all_neg)
        return value, grad
    # anchor
    anchors = [i for i in range(num_queries) if pos_terms[i] or neg_terms[i]]
    value = 0.0
    for i in anchors:
        if pos_terms[i]:
            value += np.mean([t for _, t in pos_terms[i]]) / len(anchors)
            for j, _ in pos_terms[i]:
                grad[i, j] = -1.0 / len(pos_terms[i]) / len(anchors)
        if neg_terms[i]:
            value += np.mean([t for _, t in neg_terms[i]]) / len(anchors)
            for j, _ in neg_terms[i]:
                grad[i, j] = 1.0 / len(neg_terms[i]) / len(anchors)
    return value, grad


def loss_and_grad(similarity, pos, neg, threshold, normalization):
    similarity = tf.constant(similarity, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(similarity)
        value = contrastive_loss(similarity, pos, neg, threshold, normalization)
    return value.numpy(), tape.gradient(value, similarity).numpy()


FIXED_SIMILARITY = np.array(
    [[0.9, 0.7, 0.2, -0.4, 0.55], [0.3, 0.8, 0.6, 0.51, -0.9], [0.1, 0.2, 0.95, 0.45, 0.6]], np.float32
)
FIXED_POS = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], bool)
FIXED_NEG = np.array([[0, 1, 1, 1, 1], [1, 0, 1, 1, 0], [1, 1, 0, 1, 1]], bool)


def test_fixed_values_by_hand():
    # Positives: 0.1, 0.2, 0.05. Hard negatives (> 0.5): 0.7, 0.55 | 0.6, 0.51 | 0.6.
    value, grad = loss_and_grad(FIXED_SIMILARITY, FIXED_POS, FIXED_NEG, 0.5, "sum")
    assert value == pytest.approx(0.35 + 2.96, abs=1e-5)
    assert value == pytest.approx(0.35 + 0.7 + 0.55 + 0.6 + 0.51 + 0.6, abs=1e-5)
    expected_grad = np.array([[-1, 1, 0, 0, 1], [0, -1, 1, 1, 0], [0, 0, -1, 0, 1]], np.float32)
    np.testing.assert_array_equal(grad, expected_grad)

    value, _ = loss_and_grad(FIXED_SIMILARITY, FIXED_POS, FIXED_NEG, 0.5, "pairs")
    assert value == pytest.approx(0.35 / 3 + 2.96 / 5, abs=1e-5)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_fixed_inputs_match_oracle(normalization):
    value, grad = loss_and_grad(FIXED_SIMILARITY, FIXED_POS, FIXED_NEG, 0.5, normalization)
    expected_value, expected_grad = contrastive_oracle(FIXED_SIMILARITY, FIXED_POS, FIXED_NEG, 0.5, normalization)
    assert value == pytest.approx(expected_value, abs=1e-5)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 9)),
    threshold=st.sampled_from([-0.2, 0.0, 0.5, 0.8]),
    normalization=st.sampled_from(NORMALIZATIONS),
)
def test_random_inputs_match_oracle(data, shape, threshold, normalization):
    similarity = data.draw(
        hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32).filter(lambda s: abs(s - threshold) > 1e-3))
    )
    kind = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 2)))
    pos, neg = kind == 1, kind == 2
    value, grad = loss_and_grad(similarity, pos, neg, threshold, normalization)
    expected_value, expected_grad = contrastive_oracle(similarity, pos, neg, threshold, normalization)
    assert np.isfinite(value)
    assert value == pytest.approx(expected_value, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("case", ["no pairs", "no positives", "no negatives", "only easy negatives"])
def test_degenerate_batches_give_finite_loss(normalization, case):
    similarity = np.full((2, 3), 0.9, np.float32)
    pos = np.zeros((2, 3), bool)
    neg = np.zeros((2, 3), bool)
    if case == "no positives":
        neg[:] = True
    elif case == "no negatives":
        pos[:] = True
    elif case == "only easy negatives":
        similarity[:] = -0.3
        neg[:] = True
    value, grad = loss_and_grad(similarity, pos, neg, 0.5, normalization)
    assert np.isfinite(value)
    assert np.isfinite(grad).all()
    expected_value, _ = contrastive_oracle(similarity, pos, neg, 0.5, normalization)
    assert value == pytest.approx(expected_value, abs=1e-6)


def test_keras_loss_matches_function_on_batch():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(8, 5)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    loss = ContrastiveLoss(negative_threshold=0.1, normalization="anchor")
    similarity, pos, neg = in_batch_pairs(embeddings, labels)
    expected, _ = contrastive_oracle(embeddings @ embeddings.T, pos.numpy(), neg.numpy(), 0.1, "anchor")
    assert float(loss(labels, embeddings)) == pytest.approx(expected, abs=1e-5)
    assert float(loss(labels[:, None], embeddings)) == pytest.approx(expected, abs=1e-5)


def test_keras_loss_trains_through_compile():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 6)).astype(np.float32)
    labels = np.repeat(np.arange(16), 4)
    network = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()])
    network.compile(optimizer="adam", loss=ContrastiveLoss())
    history = network.fit(images, labels, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_serialization_round_trip():
    loss = ContrastiveLoss(negative_threshold=0.3, normalization="anchor", name="xbm")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, ContrastiveLoss)
    assert restored.get_config() == loss.get_config()
    assert restored.negative_threshold == 0.3
    assert restored.normalization == "anchor"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"negative_threshold": 1.5}, "negative_threshold=1.5"),
        ({"normalization": "mean"}, "normalization='mean'"),
    ],
)
def test_invalid_arguments_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveLoss(**kwargs)


def test_mask_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="pos_mask"):
        contrastive_loss(np.zeros((2, 3)), np.zeros((2, 4), bool), np.zeros((2, 3), bool))


def test_sample_weight_rejected():
    with pytest.raises(ValueError, match="does not take sample weights"):
        ContrastiveLoss()(np.array([0, 1]), np.eye(2, dtype=np.float32), sample_weight=np.ones(2))


def test_float_labels_rejected():
    with pytest.raises(ValueError, match="Expected integer labels"):
        ContrastiveLoss()(np.array([0.0, 1.0]), np.eye(2, dtype=np.float32))
