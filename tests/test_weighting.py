import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_xbm import weighting
from keras_xbm.losses import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    DirectWeightLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    build_loss,
)
from keras_xbm.weighting import (
    CURVES,
    Constant,
    Exponential,
    Linear,
    Power,
    Product,
    Sigmoid,
    Softmax,
    Step,
    Sum,
    deserialize_curve,
    induced_weights,
    parse_curve,
    serialize_curve,
)

NORMALIZATIONS = ["sum", "batch", "pairs", "anchor"]
GRID = np.linspace(-1.0, 1.0, 41).astype(np.float32)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def evaluate(curve, similarity, mask=None):
    return np.asarray(curve(similarity, mask))


@pytest.mark.parametrize(
    "curve, expected",
    [
        (Constant(0.5), np.full_like(GRID, 0.5)),
        (Step(0.5), (GRID > 0.5).astype(np.float32)),
        (Step(0.2, increasing=False), (GRID < 0.2).astype(np.float32)),
        (Linear(), GRID + 1.0),
        (Linear(2.0, threshold=0.5), 2.0 * np.maximum(0.0, GRID - 0.5)),
        (Linear(increasing=False), 1.0 - GRID),
        (Power(2.0, threshold=0.0), np.maximum(0.0, GRID) ** 2),
        (Power(0.5, increasing=False), np.sqrt(1.0 - GRID)),
        (Exponential(10.0, 0.5), np.exp(10.0 * (GRID - 0.5))),
        (Exponential(3.0, 0.2, increasing=False), np.exp(-3.0 * (GRID - 0.2))),
        (Sigmoid(10.0, 0.5), sigmoid(10.0 * (GRID - 0.5))),
        (Sigmoid(4.0, 0.0, increasing=False), sigmoid(-4.0 * GRID)),
        (Step(0.5) * Exponential(10.0, 0.5), (GRID > 0.5) * np.exp(10.0 * (GRID - 0.5))),
        (Constant(1.0) + Linear(), GRID + 2.0),
    ],
    ids=repr,
)
def test_curve_values_match_formula(curve, expected):
    np.testing.assert_allclose(evaluate(curve, GRID[None, :])[0], expected, rtol=1e-5, atol=1e-6)


def softmax_oracle(similarity, mask, scale, sign, normalize):
    weights = np.zeros(similarity.shape)
    for i in range(similarity.shape[0]):
        members = np.flatnonzero(mask[i])
        if not len(members):
            continue
        numerators = np.exp(sign * scale * similarity[i, members].astype(np.float64))
        weights[i, members] = numerators / numerators.sum()
        if normalize == "mean":
            weights[i, members] *= len(members)
    return weights


@pytest.mark.parametrize("increasing, normalize", [(True, "mean"), (False, "mean"), (True, "sum")])
def test_softmax_over_anchor_mask(increasing, normalize):
    rng = np.random.default_rng(0)
    similarity = rng.uniform(-1, 1, (4, 6)).astype(np.float32)
    mask = rng.uniform(size=(4, 6)) < 0.5
    mask[2] = False
    mask[3] = True
    curve = Softmax(8.0, increasing=increasing, normalize=normalize)
    weights = evaluate(curve, similarity, mask)
    expected = softmax_oracle(similarity, mask, 8.0, 1.0 if increasing else -1.0, normalize)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)
    assert np.all(weights[2] == 0.0)
    if normalize == "sum":
        np.testing.assert_allclose(weights[3].sum(), 1.0, rtol=1e-5)
    else:
        np.testing.assert_allclose(weights[3].mean(), 1.0, rtol=1e-5)


def test_softmax_without_mask_uses_whole_row():
    similarity = np.array([[0.0, 0.5, 1.0]], np.float32)
    weights = evaluate(Softmax(2.0, normalize="sum"), similarity)
    expected = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose(weights[0], expected, rtol=1e-5)


def test_exponential_caps_exponent():
    weights = evaluate(Exponential(100.0, -1.0), np.array([[1.0]], np.float32))
    assert np.isfinite(weights).all()
    assert weights[0, 0] == pytest.approx(np.exp(80.0), rel=1e-5)


EVERY_CURVE = [
    Constant(0.25),
    Step(-0.3, increasing=False),
    Linear(3.0, threshold=0.1, increasing=False),
    Power(1.5, threshold=-0.5),
    Exponential(7.0, 0.4, increasing=False),
    Sigmoid(12.0, -0.2),
    Softmax(4.0, increasing=False, normalize="sum"),
    Product([Step(0.3), Exponential(5.0, 0.3)]),
    Sum([Constant(0.1), Sigmoid(3.0, 0.0)]),
]


def test_every_registered_curve_is_covered():
    assert {type(curve).__name__ for curve in EVERY_CURVE} == set(CURVES)


@pytest.mark.parametrize("curve", EVERY_CURVE, ids=repr)
def test_curve_config_round_trip(curve):
    restored = type(curve).from_config(curve.get_config())
    assert restored == curve
    assert restored.get_config() == curve.get_config()
    assert deserialize_curve(serialize_curve(curve)) == curve
    similarity = np.random.default_rng(1).uniform(-1, 1, (3, 5)).astype(np.float32)
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(evaluate(restored, similarity, mask), evaluate(curve, similarity, mask))


def test_product_flattens_nested_products():
    curve = Step(0.5) * Exponential(5.0, 0.5) * Constant(2.0)
    assert [type(part).__name__ for part in curve.curves] == ["Step", "Exponential", "Constant"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("constant", Constant(1.0)),
        ("Step(threshold=0.3)", Step(0.3)),
        ("linear(increasing=false)", Linear(increasing=False)),
        ("exponential(scale=10, threshold=0.5)", Exponential(10.0, 0.5)),
        ("softmax(scale=5, increasing=False, normalize=sum)", Softmax(5.0, increasing=False, normalize="sum")),
        ("step(threshold=0.5) * exponential(scale=10)", Product([Step(0.5), Exponential(10.0)])),
        ("power(exponent=2, threshold=none)", Power(2.0)),
    ],
)
def test_parse_curve(text, expected):
    assert parse_curve(text) == expected


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Exponential(scale=-1.0), "scale=-1.0"),
        (lambda: Sigmoid(scale=0.0), "scale=0.0"),
        (lambda: Softmax(scale=-2.0), "scale=-2.0"),
        (lambda: Linear(scale=float("nan")), "scale=nan"),
        (lambda: Step(threshold=1.5), r"threshold=1.5: expected a cosine similarity in \[-1, 1\]"),
        (lambda: Exponential(threshold=-2.0), "threshold=-2.0"),
        (lambda: Linear(threshold=3.0), "threshold=3.0"),
        (lambda: Power(exponent=0.0), "exponent=0.0"),
        (lambda: Constant(-1.0), "value=-1.0"),
        (lambda: Step(increasing="yes"), "increasing='yes'"),
        (lambda: Softmax(normalize="max"), "normalize='max'"),
        (lambda: Product([Step(0.5)]), "at least two curves"),
        (lambda: deserialize_curve({"class_name": "Cosine", "config": {}}), "Unknown weight curve 'Cosine'"),
        (lambda: deserialize_curve({"name": "Step"}), "Expected a curve config"),
        (lambda: parse_curve("cosine(scale=2)"), "Unknown weight curve 'cosine'"),
        (lambda: parse_curve("step(0.5)"), "expected key=value"),
        (lambda: parse_curve("step(width=0.5)"), "Invalid arguments of step"),
        (lambda: parse_curve("step[0.5]"), "Invalid weight curve"),
    ],
)
def test_bad_curves_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unknown_curve_in_loss_config_rejected():
    config = DirectWeightLoss().get_config()
    config["negative_curve"] = {"class_name": "Hinge", "config": {}}
    with pytest.raises(ValueError, match="Unknown weight curve 'Hinge'"):
        DirectWeightLoss.from_config(config)


def random_pairs(seed, shape=(5, 9)):
    rng = np.random.default_rng(seed)
    similarity = rng.uniform(-0.95, 0.95, shape).astype(np.float32)
    kind = rng.integers(0, 3, shape)
    return similarity, kind == 1, kind == 2


def test_induced_weights_of_direct_weight_loss_are_its_curves():
    similarity, pos, neg = random_pairs(0)
    positive_curve = Exponential(3.0, 0.5, increasing=False)
    negative_curve = Softmax(5.0)
    w_pos, w_neg = induced_weights(DirectWeightLoss(positive_curve, negative_curve, normalization="sum"), similarity, pos, neg)
    expected_pos = np.where(pos, np.exp(-3.0 * (similarity - 0.5)), 0.0)
    expected_neg = softmax_oracle(similarity, neg, 5.0, 1.0, "mean")
    np.testing.assert_allclose(w_pos.numpy(), expected_pos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_neg.numpy(), expected_neg, rtol=1e-5, atol=1e-6)


def test_induced_weights_of_contrastive_loss():
    similarity, pos, neg = random_pairs(1)
    w_pos, w_neg = induced_weights(ContrastiveLoss(0.3, normalization="sum"), similarity, pos, neg)
    np.testing.assert_array_equal(w_pos.numpy(), pos.astype(np.float32))
    np.testing.assert_array_equal(w_neg.numpy(), (neg & (similarity > 0.3)).astype(np.float32))


def multi_similarity_weights_oracle(similarity, pos, neg, alpha, beta, lam, eps):
    """The multi-similarity pair weights of Wang et al. (CVPR 2019), divided by the number of valid anchors."""
    w_pos = np.zeros(similarity.shape)
    w_neg = np.zeros(similarity.shape)
    anchors = [i for i in range(similarity.shape[0]) if pos[i].any() and neg[i].any()]
    for i in anchors:
        s = similarity[i].astype(np.float64)
        kept_pos = [j for j in np.flatnonzero(pos[i]) if s[j] - eps < s[neg[i]].max()]
        kept_neg = [j for j in np.flatnonzero(neg[i]) if s[j] + eps > s[pos[i]].min()]
        pos_denominator = 1.0 + sum(np.exp(-alpha * (s[k] - lam)) for k in kept_pos)
        neg_denominator = 1.0 + sum(np.exp(beta * (s[k] - lam)) for k in kept_neg)
        for j in kept_pos:
            w_pos[i, j] = np.exp(-alpha * (s[j] - lam)) / pos_denominator / len(anchors)
        for j in kept_neg:
            w_neg[i, j] = np.exp(beta * (s[j] - lam)) / neg_denominator / len(anchors)
    return w_pos, w_neg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_induced_weights_of_multi_similarity_are_analytic(seed):
    similarity, pos, neg = random_pairs(seed, (6, 12))
    loss = MultiSimilarityLoss(positive_scale=2.0, negative_scale=10.0, threshold=0.5, mining_margin=0.1)
    w_pos, w_neg = induced_weights(loss, similarity, pos, neg)
    expected_pos, expected_neg = multi_similarity_weights_oracle(similarity, pos, neg, 2.0, 10.0, 0.5, 0.1)
    assert expected_pos.any()
    assert expected_neg.any()
    np.testing.assert_allclose(w_pos.numpy(), expected_pos, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(w_neg.numpy(), expected_neg, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("normalization", ["sum", "pairs"])
def test_induced_weights_of_binomial_deviance_are_analytic(normalization):
    similarity, pos, neg = random_pairs(3)
    loss = BinomialDevianceLoss(positive_scale=2.0, negative_scale=10.0, threshold=0.4, normalization=normalization)
    w_pos, w_neg = induced_weights(loss, similarity, pos, neg)
    expected_pos = np.where(pos, 2.0 * sigmoid(-2.0 * (similarity - 0.4)), 0.0)
    expected_neg = np.where(neg, 10.0 * sigmoid(10.0 * (similarity - 0.4)), 0.0)
    if normalization == "pairs":
        expected_pos /= pos.sum()
        expected_neg /= neg.sum()
    np.testing.assert_allclose(w_pos.numpy(), expected_pos, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w_neg.numpy(), expected_neg, rtol=1e-5, atol=1e-7)


def test_induced_weights_of_lifted_structure_are_softmax_curves():
    similarity, pos, neg = random_pairs(4)
    pos[0] = False
    w_pos, w_neg = induced_weights(LiftedStructureLoss(scale=5.0, margin=2.0), similarity, pos, neg)
    valid = pos.any(axis=1) & neg.any(axis=1)
    expected_pos = softmax_oracle(similarity, pos & valid[:, None], 5.0, -1.0, "sum") / valid.sum()
    expected_neg = softmax_oracle(similarity, neg & valid[:, None], 5.0, 1.0, "sum") / valid.sum()
    np.testing.assert_allclose(w_pos.numpy(), expected_pos, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w_neg.numpy(), expected_neg, rtol=1e-5, atol=1e-7)
    # The same shape as the Softmax curves a DirectWeightLoss would use.
    np.testing.assert_allclose(
        w_neg.numpy()[valid] * valid.sum(), evaluate(Softmax(5.0, normalize="sum"), similarity, neg)[valid], rtol=1e-5, atol=1e-7
    )


def test_induced_weights_accepts_plain_function():
    similarity = np.array([[0.2, 0.9]], np.float32)
    w_pos, w_neg = induced_weights(
        lambda s, p, n: tf.reduce_sum(3.0 * s * tf.cast(n, tf.float32)), similarity, [[True, False]], [[False, True]]
    )
    np.testing.assert_array_equal(w_pos.numpy(), [[0.0, 0.0]])
    np.testing.assert_array_equal(w_neg.numpy(), [[0.0, 3.0]])


def value_and_gradient(loss, similarity, pos, neg):
    similarity = tf.constant(similarity, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(similarity)
        value = loss.pair_loss(similarity, pos, neg)
    return value.numpy(), tape.gradient(value, similarity).numpy()


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 9)),
    threshold=st.sampled_from([-0.5, 0.0, 0.5, 0.8]),
    normalization=st.sampled_from(NORMALIZATIONS),
)
def test_direct_weight_constant_step_equals_contrastive(data, shape, threshold, normalization):
    similarity = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    kind = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 2)))
    pos, neg = kind == 1, kind == 2
    direct = DirectWeightLoss(Constant(1.0), Step(threshold), normalization=normalization)
    contrastive = ContrastiveLoss(negative_threshold=threshold, normalization=normalization)
    direct_value, direct_gradient = value_and_gradient(direct, similarity, pos, neg)
    contrastive_value, contrastive_gradient = value_and_gradient(contrastive, similarity, pos, neg)
    assert direct_value == contrastive_value
    np.testing.assert_array_equal(direct_gradient, contrastive_gradient)


def test_build_loss_curves_match_contrastive():
    similarity = np.array([[0.9, 0.6, 0.2, -0.3], [0.55, 0.1, 0.8, 0.45]], np.float32)
    pos = np.array([[1, 0, 0, 1], [0, 1, 0, 0]], bool)
    neg = ~pos
    built = build_loss(" constant/step(threshold=0.4) ", normalization="anchor")
    assert isinstance(built, DirectWeightLoss)
    assert built.negative_curve == Step(0.4)
    contrastive = build_loss("contrastive", negative_threshold=0.4, normalization="anchor")
    assert contrastive.negative_threshold == 0.4
    built_value, built_gradient = value_and_gradient(built, similarity, pos, neg)
    contrastive_value, contrastive_gradient = value_and_gradient(contrastive, similarity, pos, neg)
    assert built_value == contrastive_value
    np.testing.assert_array_equal(built_gradient, contrastive_gradient)


def test_build_loss_by_name():
    assert isinstance(build_loss("multi_similarity"), MultiSimilarityLoss)
    assert isinstance(build_loss("lifted_structure"), LiftedStructureLoss)
    assert build_loss("binomial_deviance", normalization="sum").normalization == "sum"


def test_build_loss_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"Unknown loss 'arcface'.*multi_similarity"):
        build_loss("arcface")
    with pytest.raises(ValueError, match="wobble"):
        build_loss("constant/wobble")


def test_direct_weight_loss_serialization_round_trip():
    loss = DirectWeightLoss(Linear(increasing=False), Step(0.4) * Exponential(8.0, 0.4), normalization="anchor", name="dw")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, DirectWeightLoss)
    assert restored.get_config() == loss.get_config()
    assert restored.positive_curve == loss.positive_curve
    assert restored.negative_curve == loss.negative_curve


def test_direct_weight_loss_takes_curve_text():
    loss = DirectWeightLoss("constant", "step(threshold=0.5)")
    assert loss.positive_curve == Constant(1.0)
    assert loss.negative_curve == Step(0.5)
