"""The pair losses beside the contrastive loss, against loop-by-loop numpy oracles in float64.

Gradients are checked against central finite differences of the oracle. The
inputs keep every similarity away from the kinks of the losses (mining
boundaries, hinges, ties), where a finite difference would straddle two
pieces.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_xbm import XBMModel
from keras_xbm.losses import (
    BinomialDevianceLoss,
    CircleLoss,
    ContrastiveLoss,
    DirectWeightLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    TripletLoss,
    binomial_deviance_loss,
    circle_loss,
    direct_weight_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    triplet_loss,
)
from keras_xbm.weighting import Constant, Exponential, Linear, Softmax, Step

NORMALIZATIONS = ["sum", "batch", "pairs", "anchor"]


def rows(mask, i):
    return [j for j in range(mask.shape[1]) if mask[i, j]]


def valid_anchor_list(pos, neg):
    return [i for i in range(pos.shape[0]) if rows(pos, i) and rows(neg, i)]


def reduce_terms(pos_terms, neg_terms, num_queries, normalization):
    """Reduce {query: [term, ...]} of active pairs the four ways of the losses module."""
    all_pos = [t for i in pos_terms for t in pos_terms[i]]
    all_neg = [t for i in neg_terms for t in neg_terms[i]]
    if normalization == "sum":
        return sum(all_pos) + sum(all_neg)
    if normalization == "batch":
        return (sum(all_pos) + sum(all_neg)) / num_queries
    if normalization == "pairs":
        return (np.mean(all_pos) if all_pos else 0.0) + (np.mean(all_neg) if all_neg else 0.0)
    anchors = [i for i in range(num_queries) if pos_terms.get(i) or neg_terms.get(i)]
    total = 0.0
    for i in anchors:
        total += np.mean(pos_terms[i]) if pos_terms.get(i) else 0.0
        total += np.mean(neg_terms[i]) if neg_terms.get(i) else 0.0
    return total / len(anchors) if anchors else 0.0


def multi_similarity_oracle(s, pos, neg, alpha=2.0, beta=40.0, lam=0.5, eps=0.1):
    anchors = valid_anchor_list(pos, neg)
    total = 0.0
    for i in anchors:
        p, n = rows(pos, i), rows(neg, i)
        kept_p = [j for j in p if s[i, j] - eps < max(s[i, k] for k in n)]
        kept_n = [j for j in n if s[i, j] + eps > min(s[i, k] for k in p)]
        total += np.log1p(sum(np.exp(-alpha * (s[i, j] - lam)) for j in kept_p)) / alpha
        total += np.log1p(sum(np.exp(beta * (s[i, j] - lam)) for j in kept_n)) / beta
    return total / len(anchors) if anchors else 0.0


def binomial_deviance_oracle(s, pos, neg, alpha=2.0, beta=10.0, lam=0.5, normalization="pairs"):
    pos_terms = {i: [np.log1p(np.exp(-alpha * (s[i, j] - lam))) for j in rows(pos, i)] for i in range(s.shape[0])}
    neg_terms = {i: [np.log1p(np.exp(beta * (s[i, j] - lam))) for j in rows(neg, i)] for i in range(s.shape[0])}
    return reduce_terms(pos_terms, neg_terms, s.shape[0], normalization)


def lifted_structure_oracle(s, pos, neg, scale=10.0, margin=0.1):
    anchors = valid_anchor_list(pos, neg)
    total = 0.0
    for i in anchors:
        soft_max_neg = np.log(sum(np.exp(scale * s[i, j]) for j in rows(neg, i))) / scale
        soft_min_pos = -np.log(sum(np.exp(-scale * s[i, j]) for j in rows(pos, i))) / scale
        total += max(0.0, soft_max_neg - soft_min_pos + margin)
    return total / len(anchors) if anchors else 0.0


def circle_oracle(s, pos, neg, margin=0.4, scale=80.0, alpha_from=None):
    """Circle loss; `alpha_from` gives the similarities the stop-gradient factors are computed on."""
    alpha_from = s if alpha_from is None else alpha_from
    anchors = valid_anchor_list(pos, neg)
    total = 0.0
    for i in anchors:
        neg_sum = sum(
            np.exp(scale * max(0.0, alpha_from[i, j] + margin) * (s[i, j] - margin)) for j in rows(neg, i)
        )
        pos_sum = sum(
            np.exp(-scale * max(0.0, 1.0 + margin - alpha_from[i, j]) * (s[i, j] - 1.0 + margin)) for j in rows(pos, i)
        )
        total += np.log1p(neg_sum * pos_sum)
    return total / len(anchors) if anchors else 0.0


def triplet_oracle(s, pos, neg, margin=0.1, mining="batch_hard"):
    anchors = valid_anchor_list(pos, neg)
    if mining == "batch_hard":
        losses = [
            max(0.0, max(s[i, j] for j in rows(neg, i)) - min(s[i, j] for j in rows(pos, i)) + margin) for i in anchors
        ]
        return np.mean(losses) if losses else 0.0
    losses = []
    for i in anchors:
        negatives = [s[i, j] for j in rows(neg, i)]
        for p in rows(pos, i):
            below = [value for value in negatives if value < s[i, p]]
            chosen = max(below) if below else min(negatives)
            losses.append(max(0.0, chosen - s[i, p] + margin))
    return np.mean(losses) if losses else 0.0


def finite_difference(oracle, s, step=1e-6):
    s = s.astype(np.float64)
    gradient = np.zeros_like(s)
    for index in np.ndindex(*s.shape):
        up, down = s.copy(), s.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (oracle(up) - oracle(down)) / (2 * step)
    return gradient


def tf_value_and_gradient(function, s, pos, neg):
    similarity = tf.constant(s, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(similarity)
        value = function(similarity, pos, neg)
    return float(value), tape.gradient(value, similarity).numpy()


def fixed_pairs(seed):
    """Fixed random inputs: 6 queries x 10 references, one query with no positive, one with no negative."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-0.9, 0.9, (6, 10)).astype(np.float32)
    kind = rng.choice([0, 1, 2, 2], size=(6, 10))
    kind[:, 0] = 1
    kind[:, 1] = 2
    kind[4] = np.where(kind[4] == 1, 2, kind[4])
    kind[5] = np.where(kind[5] == 2, 0, kind[5])
    return s, kind == 1, kind == 2


# Each case: (name, TF function of (s, pos, neg), numpy oracle of (s, pos, neg)).
CASES = [
    (
        "multi_similarity",
        lambda s, p, n: multi_similarity_loss(s, p, n, 2.0, 40.0, 0.5, 0.1),
        lambda s, p, n: multi_similarity_oracle(s, p, n, 2.0, 40.0, 0.5, 0.1),
    ),
    (
        "multi_similarity_wide_mining",
        lambda s, p, n: multi_similarity_loss(s, p, n, 3.0, 10.0, 0.2, 0.6),
        lambda s, p, n: multi_similarity_oracle(s, p, n, 3.0, 10.0, 0.2, 0.6),
    ),
    *[
        (
            f"binomial_deviance_{normalization}",
            lambda s, p, n, normalization=normalization: binomial_deviance_loss(s, p, n, 2.0, 10.0, 0.5, normalization),
            lambda s, p, n, normalization=normalization: binomial_deviance_oracle(s, p, n, 2.0, 10.0, 0.5, normalization),
        )
        for normalization in NORMALIZATIONS
    ],
    (
        "lifted_structure",
        lambda s, p, n: lifted_structure_loss(s, p, n, 10.0, 0.1),
        lambda s, p, n: lifted_structure_oracle(s, p, n, 10.0, 0.1),
    ),
    (
        "lifted_structure_soft",
        lambda s, p, n: lifted_structure_loss(s, p, n, 1.0, 0.0),
        lambda s, p, n: lifted_structure_oracle(s, p, n, 1.0, 0.0),
    ),
    (
        "triplet_batch_hard",
        lambda s, p, n: triplet_loss(s, p, n, 0.3, "batch_hard"),
        lambda s, p, n: triplet_oracle(s, p, n, 0.3, "batch_hard"),
    ),
    (
        "triplet_semi_hard",
        lambda s, p, n: triplet_loss(s, p, n, 0.3, "semi_hard"),
        lambda s, p, n: triplet_oracle(s, p, n, 0.3, "semi_hard"),
    ),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name, function, oracle", CASES, ids=[case[0] for case in CASES])
def test_loss_matches_oracle_in_value_and_gradient(name, function, oracle, seed):
    s, pos, neg = fixed_pairs(seed)
    value, gradient = tf_value_and_gradient(function, s, pos, neg)
    expected_value = oracle(s.astype(np.float64), pos, neg)
    expected_gradient = finite_difference(lambda x: oracle(x, pos, neg), s)
    assert value == pytest.approx(expected_value, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-3, atol=1e-5)
    assert np.abs(expected_gradient).sum() > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin, scale", [(0.4, 80.0), (0.25, 16.0)])
def test_circle_loss_matches_oracle(seed, margin, scale):
    s, pos, neg = fixed_pairs(seed)
    value, gradient = tf_value_and_gradient(lambda x, p, n: circle_loss(x, p, n, margin, scale), s, pos, neg)
    s64 = s.astype(np.float64)
    assert value == pytest.approx(circle_oracle(s64, pos, neg, margin, scale), rel=1e-5)
    # The factors a_p and a_n are constants of the gradient, so the finite difference keeps them at s.
    expected_gradient = finite_difference(lambda x: circle_oracle(x, pos, neg, margin, scale, alpha_from=s64), s)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-3, atol=1e-5)


def direct_weight_oracle(s, pos, neg, w_pos, w_neg, normalization):
    """Value and dL/dS of the direct weight loss, from numpy weights."""
    active_pos = pos & (w_pos != 0)
    active_neg = neg & (w_neg != 0)
    pos_terms = {i: [w_pos[i, j] * (1 - s[i, j]) for j in rows(active_pos, i)] for i in range(s.shape[0])}
    neg_terms = {i: [w_neg[i, j] * s[i, j] for j in rows(active_neg, i)] for i in range(s.shape[0])}
    value = reduce_terms(pos_terms, neg_terms, s.shape[0], normalization)
    # The weights are constants of the gradient, and each term is linear in S.
    gradient = np.zeros(s.shape)
    for i in range(s.shape[0]):
        if normalization == "anchor":
            anchors = sum(1 for k in range(s.shape[0]) if pos_terms[k] or neg_terms[k])
            pos_scale = 1.0 / (len(pos_terms[i]) * anchors) if pos_terms[i] else 0.0
            neg_scale = 1.0 / (len(neg_terms[i]) * anchors) if neg_terms[i] else 0.0
        else:
            pos_scale, neg_scale = {
                "sum": (1.0, 1.0),
                "batch": (1.0 / s.shape[0], 1.0 / s.shape[0]),
                "pairs": (1.0 / max(active_pos.sum(), 1), 1.0 / max(active_neg.sum(), 1)),
            }[normalization]
        for j in rows(active_pos, i):
            gradient[i, j] = -w_pos[i, j] * pos_scale
        for j in rows(active_neg, i):
            gradient[i, j] = w_neg[i, j] * neg_scale
    return value, gradient


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_direct_weight_loss_matches_oracle(normalization):
    s, pos, neg = fixed_pairs(0)
    w_pos = np.exp(-3.0 * (s - 0.5))
    w_neg = (s > 0.2) * np.exp(8.0 * (s - 0.2))
    value, gradient = tf_value_and_gradient(
        lambda x, p, n: direct_weight_loss(
            x, p, n, Exponential(3.0, 0.5, increasing=False), Step(0.2) * Exponential(8.0, 0.2), normalization
        ),
        s,
        pos,
        neg,
    )
    expected_value, expected_gradient = direct_weight_oracle(s.astype(np.float64), pos, neg, w_pos, w_neg, normalization)
    assert value == pytest.approx(expected_value, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-7)


def test_fixed_values_by_hand():
    # One anchor, positives at 0.8 and 0.3, negatives at 0.6 and -0.2.
    s = np.array([[0.8, 0.3, 0.6, -0.2]], np.float32)
    pos = np.array([[True, True, False, False]])
    neg = np.array([[False, False, True, True]])
    # Batch hard: hardest negative 0.6, hardest positive 0.3, margin 0.1.
    assert float(triplet_loss(s, pos, neg, 0.1, "batch_hard")) == pytest.approx(0.6 - 0.3 + 0.1, abs=1e-6)
    # Semi-hard: for 0.8 the most similar negative below it is 0.6 (0.6 - 0.8 + 0.1 < 0, so 0);
    # for 0.3 it is -0.2: max(0, -0.2 - 0.3 + 0.1) = 0.
    assert float(triplet_loss(s, pos, neg, 0.1, "semi_hard")) == pytest.approx(0.0, abs=1e-6)
    # With margin 0.3: (0.6 - 0.8 + 0.3 = 0.1, -0.2 - 0.3 + 0.3 = -0.2 -> 0), mean 0.05.
    assert float(triplet_loss(s, pos, neg, 0.3, "semi_hard")) == pytest.approx(0.05, abs=1e-6)
    # Multi-similarity mining with eps 0.1: negative 0.6 kept (0.7 > 0.3), -0.2 dropped;
    # positive 0.3 kept (0.2 < 0.6), 0.8 dropped.
    expected = np.log1p(np.exp(-2.0 * (0.3 - 0.5))) / 2.0 + np.log1p(np.exp(40.0 * (0.6 - 0.5))) / 40.0
    assert float(multi_similarity_loss(s, pos, neg)) == pytest.approx(expected, rel=1e-5)


def loss_id(loss):
    return type(loss).__name__


EVERY_LOSS = [
    DirectWeightLoss(),
    DirectWeightLoss(Linear(increasing=False), Softmax(10.0)),
    DirectWeightLoss(Constant(1.0), Exponential(50.0, -1.0), normalization="anchor"),
    MultiSimilarityLoss(),
    BinomialDevianceLoss(),
    LiftedStructureLoss(),
    CircleLoss(),
    CircleLoss(margin=0.25, scale=256.0),
    TripletLoss(),
    TripletLoss(mining="semi_hard"),
    ContrastiveLoss(),
]


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 12)),
    loss=st.sampled_from(EVERY_LOSS),
)
def test_random_batches_give_finite_values(data, shape, loss):
    s = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    kind = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 2)))
    value, gradient = tf_value_and_gradient(loss.pair_loss, s, kind == 1, kind == 2)
    assert np.isfinite(value)
    assert np.isfinite(gradient).all()


ANCHOR_CASES = [
    ("multi_similarity", multi_similarity_loss, multi_similarity_oracle),
    ("lifted_structure", lifted_structure_loss, lifted_structure_oracle),
    ("circle", circle_loss, circle_oracle),
    ("triplet_batch_hard", triplet_loss, triplet_oracle),
    ("triplet_semi_hard", lambda s, p, n: triplet_loss(s, p, n, mining="semi_hard"), lambda s, p, n: triplet_oracle(s, p, n, mining="semi_hard")),
]


@pytest.mark.parametrize("name, function, oracle", ANCHOR_CASES, ids=[case[0] for case in ANCHOR_CASES])
@pytest.mark.parametrize("case", ["no pairs", "no positives", "no negatives", "one valid anchor"])
def test_empty_positive_or_negative_sets(name, function, oracle, case):
    s = np.array([[0.9, 0.7, 0.6], [0.2, 0.8, -0.5]], np.float32)
    pos = np.zeros((2, 3), bool)
    neg = np.zeros((2, 3), bool)
    if case == "no positives":
        neg[:] = True
    elif case == "no negatives":
        pos[:] = True
    elif case == "one valid anchor":
        pos[0] = [True, False, False]
        neg[0] = [False, True, True]
        pos[1] = True
    value, gradient = tf_value_and_gradient(function, s, pos, neg)
    assert np.isfinite(value)
    assert np.isfinite(gradient).all()
    assert value == pytest.approx(oracle(s.astype(np.float64), pos, neg), rel=1e-5, abs=1e-6)
    if case != "one valid anchor":
        assert value == 0.0
        assert np.all(gradient == 0.0)
    else:
        # The query without negatives sends no gradient.
        assert np.all(gradient[1] == 0.0)


@pytest.mark.parametrize("loss", [loss for loss in EVERY_LOSS if not isinstance(loss, ContrastiveLoss)], ids=loss_id)
def test_loss_serialization_round_trip(loss):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    s, pos, neg = fixed_pairs(1)
    assert float(restored.pair_loss(s, pos, neg)) == float(loss.pair_loss(s, pos, neg))


@pytest.mark.parametrize("loss", EVERY_LOSS, ids=loss_id)
def test_reference_set_of_other_width_rejected(loss):
    queries = np.eye(4, 8, dtype=np.float32)
    references = np.eye(6, 5, dtype=np.float32)
    with pytest.raises(ValueError, match="Queries have width 8 but references have width 5"):
        loss.reference_loss(queries, np.arange(4), references, np.arange(6))


def test_reference_loss_scores_any_reference_set():
    rng = np.random.default_rng(5)
    queries = rng.normal(size=(4, 6)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    references = rng.normal(size=(9, 6)).astype(np.float32)
    references /= np.linalg.norm(references, axis=1, keepdims=True)
    query_labels = np.array([0, 1, 2, 3])
    ref_labels = np.array([0, 0, 1, 2, 3, 3, 4, 5, 1])
    loss = MultiSimilarityLoss()
    value = float(loss.reference_loss(queries, query_labels, references, ref_labels))
    s = queries.astype(np.float64) @ references.T.astype(np.float64)
    pos = query_labels[:, None] == ref_labels[None, :]
    assert value == pytest.approx(multi_similarity_oracle(s, pos, ~pos), rel=1e-5)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MultiSimilarityLoss(negative_scale=-1.0), "negative_scale=-1.0"),
        (lambda: MultiSimilarityLoss(threshold=1.2), "threshold=1.2"),
        (lambda: MultiSimilarityLoss(mining_margin=-0.1), "mining_margin=-0.1"),
        (lambda: BinomialDevianceLoss(positive_scale=0.0), "positive_scale=0.0"),
        (lambda: BinomialDevianceLoss(threshold=-1.5), "threshold=-1.5"),
        (lambda: BinomialDevianceLoss(normalization="mean"), "normalization='mean'"),
        (lambda: LiftedStructureLoss(scale=-3.0), "scale=-3.0"),
        (lambda: CircleLoss(margin=1.5), "margin=1.5"),
        (lambda: CircleLoss(scale=-80.0), "scale=-80.0"),
        (lambda: TripletLoss(margin=-0.2), "margin=-0.2"),
        (lambda: TripletLoss(mining="hardest"), "mining='hardest'"),
        (lambda: DirectWeightLoss(normalization="mean"), "normalization='mean'"),
        (lambda: DirectWeightLoss(negative_curve="cosine"), "Unknown weight curve 'cosine'"),
    ],
)
def test_invalid_loss_arguments_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# The losses whose ops go beyond the contrastive loss's: softmax curves, mining, sort and search.
XLA_LOSSES = [EVERY_LOSS[1], MultiSimilarityLoss(), CircleLoss(), TripletLoss(mining="semi_hard")]


@pytest.mark.parametrize("loss", XLA_LOSSES, ids=loss_id)
def test_xbm_model_trains_with_loss_under_xla(loss):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 6)).astype(np.float32)
    targets = {"labels": np.repeat(np.arange(4), 4).astype(np.int32), "sample_ids": np.arange(16, dtype=np.int32)}
    keras.utils.set_random_seed(0)
    network = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)])
    model = XBMModel(network, memory_size=32, loss=loss, warmup_steps=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=True)
    for _ in range(3):
        logs = model.train_on_batch(images, targets, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert logs["memory_loss"] != 0.0
