"""Pair losses as pure functions of (similarity, pos_mask, neg_mask), with thin Keras classes.

A pure function takes the similarity matrix of queries against any reference set
(the batch, the memory, or both) and the masks of `keras_xbm.pairs`, so one
function serves the batch term, the memory term and batch-only training. The
Keras classes store the hyper-parameters, serialize them, and compute the
in-batch pairs when used through `model.compile(loss=...)`.

Normalisation
-------------
A pair loss sums per-pair terms; how that sum is divided decides how the loss
scales with the number of references, which is what changes when the memory
switches on (a query of a batch of 16 has 15 references, and a memory adds
thousands). The
`normalization` argument takes:

- `"sum"`: no division. `dL/dS` of each pair is exactly its pair weight, which
  is what the weight analysis wants; training with it scales the step with the
  number of pairs.
- `"batch"`: the sum divided by the number of queries, as the official XBM code
  does. With a memory, the loss and its gradient grow with the number of hard
  negatives found: on Omniglot with a memory of 2,048 the memory term was 26
  times the batch term over a run.
- `"pairs"`: the mean of the positive terms plus the mean of the active negative
  terms (a pair is active when its weight is non-zero). The gradient mass stays
  the same whatever the number of references, so the memory term and the batch
  term have the same scale. This is the default.
- `"anchor"`: per query, the mean of its positive terms plus the mean of its
  active negative terms, then the mean over queries with at least one active
  pair.

`docs/normalization.md` has the measurements behind the default.

Anchor losses
-------------
Multi-similarity, lifted structure, circle and triplet losses score each query
(anchor) against its whole positive and negative sets, so they do not split
into per-pair terms and take no `normalization`. Each averages its per-anchor
terms over the valid anchors: the queries with at least one positive and one
negative reference. A query whose positive or negative set is empty (a class
alone in the batch, a memory that holds no other image of it yet) contributes
nothing, and a batch without a valid anchor gives a loss of 0 and a zero
gradient. Binomial deviance and `DirectWeightLoss` are sums of per-pair terms
and are normalised like the contrastive loss.
"""

import math

import keras
import tensorflow as tf

from keras_xbm import weighting
from keras_xbm.memory import as_int32_vector
from keras_xbm.pairs import cosine_similarity, in_batch_pairs, pair_masks

NORMALIZATIONS = ("sum", "batch", "pairs", "anchor")


def check_normalization(normalization):
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalization={normalization!r}: expected one of {', '.join(NORMALIZATIONS)}.")


def check_pair_inputs(similarity, pos_mask, neg_mask):
    """Convert the inputs of a pair loss and check that their shapes agree."""
    similarity = tf.cast(tf.convert_to_tensor(similarity), tf.float32)
    pos_mask = tf.convert_to_tensor(pos_mask, tf.bool)
    neg_mask = tf.convert_to_tensor(neg_mask, tf.bool)
    if similarity.shape.rank != 2:
        raise ValueError(
            f"Expected a similarity matrix of shape [num_queries, num_references], received shape {similarity.shape}."
        )
    for name, mask in (("pos_mask", pos_mask), ("neg_mask", neg_mask)):
        if not mask.shape.is_compatible_with(similarity.shape):
            raise ValueError(
                f"Expected {name} of the similarity's shape {similarity.shape}, received shape {mask.shape}."
            )
    return similarity, pos_mask, neg_mask


def normalize_pair_terms(pos_terms, neg_terms, pos_active, neg_active, normalization="pairs", global_count=None):
    """Reduce masked per-pair loss terms to a scalar loss.

    Args:
        pos_terms: float `[num_queries, num_references]`, zero outside the
            active positive pairs.
        neg_terms: float, the same for negative pairs.
        pos_active: bool, the positive pairs with a non-zero weight.
        neg_active: bool, the negative pairs with a non-zero weight.
        normalization: one of `"sum"`, `"batch"`, `"pairs"`, `"anchor"` (see the
            module docstring). Defaults to `"pairs"`.
        global_count: function applied to every count that divides the sums
            (pairs, queries, queries with pairs), or `None` for the counts of
            the rows given. When the rows are one replica's share of the
            queries, `XBMModel` passes a sum over the replicas: the replicas'
            results then add up to the loss of all rows. Defaults to `None`.

    Returns:
        A float32 scalar; 0 when no pair is active (never NaN).
    """
    check_normalization(normalization)
    if global_count is None:
        global_count = tf.identity
    pos_count = global_count(tf.reduce_sum(tf.cast(pos_active, tf.float32)))
    neg_count = global_count(tf.reduce_sum(tf.cast(neg_active, tf.float32)))

    if normalization == "sum":
        return tf.reduce_sum(pos_terms) + tf.reduce_sum(neg_terms)

    if normalization == "batch":
        num_queries = global_count(tf.cast(tf.shape(pos_terms)[0], tf.float32))
        return tf.math.divide_no_nan(tf.reduce_sum(pos_terms) + tf.reduce_sum(neg_terms), num_queries)

    if normalization == "pairs":
        return tf.math.divide_no_nan(tf.reduce_sum(pos_terms), pos_count) + tf.math.divide_no_nan(
            tf.reduce_sum(neg_terms), neg_count
        )

    # "anchor": each query's own means, then the mean over queries that have any active pair.
    pos_per_query = tf.reduce_sum(tf.cast(pos_active, tf.float32), axis=1)
    neg_per_query = tf.reduce_sum(tf.cast(neg_active, tf.float32), axis=1)
    per_query = tf.math.divide_no_nan(tf.reduce_sum(pos_terms, axis=1), pos_per_query) + tf.math.divide_no_nan(
        tf.reduce_sum(neg_terms, axis=1), neg_per_query
    )
    has_pairs = tf.cast(pos_per_query + neg_per_query > 0, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(per_query * has_pairs), global_count(tf.reduce_sum(has_pairs)))


def contrastive_loss(similarity, pos_mask, neg_mask, negative_threshold=0.5, normalization="pairs", global_count=None):
    """Contrastive loss with hard-negative selection, on cosine similarities.

    Per pair (i, j) with similarity `S`:

        positive:  1 - S
        negative:  S  if S > negative_threshold, else 0 (easy negatives dropped)

    so `dL/dS` is -1 for every positive and +1 for every hard negative before
    normalisation: the positive weight curve is constant and the negative one a
    step at `negative_threshold`.

    Args:
        similarity: float `[num_queries, num_references]`.
        pos_mask: bool, the positive pairs.
        neg_mask: bool, the negative pairs.
        negative_threshold: similarity above which a negative counts. Defaults
            to 0.5.
        normalization: see the module docstring. Defaults to `"pairs"`.
        global_count: see `normalize_pair_terms`. Defaults to `None`.

    Returns:
        A float32 scalar. A query set with no positive or no negative pair
        contributes 0 for that part; the loss is never NaN.

    Reference: Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020.
    """
    similarity, pos_mask, neg_mask = check_pair_inputs(similarity, pos_mask, neg_mask)
    neg_active = tf.logical_and(neg_mask, similarity > negative_threshold)
    zeros = tf.zeros_like(similarity)
    pos_terms = tf.where(pos_mask, 1.0 - similarity, zeros)
    neg_terms = tf.where(neg_active, similarity, zeros)
    return normalize_pair_terms(pos_terms, neg_terms, pos_mask, neg_active, normalization, global_count)


class PairLoss(keras.losses.Loss):
    """Base class of the Keras pair losses.

    Subclasses implement `pair_loss(similarity, pos_mask, neg_mask,
    global_count=None)`. Called as a Keras loss, `loss(labels, embeddings)`
    scores the batch against itself, so `model.compile(loss=ContrastiveLoss())`
    trains without a memory; `XBMModel` calls `pair_loss` against the batch and
    against the memory. Under `tf.distribute`, `XBMModel` passes each
    replica's query rows with `global_count`, a sum over the replicas that
    `pair_loss` must apply to every count it divides by (as
    `normalize_pair_terms` does), so that the replicas' losses add up to the
    loss of the global batch.

    Labels must be integer class ids of shape `[batch]` or `[batch, 1]`.
    """

    def __init__(self, name=None, **kwargs):
        super().__init__(name=name, reduction="sum", **kwargs)

    def pair_loss(self, similarity, pos_mask, neg_mask, global_count=None):
        raise NotImplementedError

    def reference_loss(
        self, queries, query_labels, references, ref_labels, query_ids=None, ref_ids=None, ref_valid=None
    ):
        """Score L2-normalised queries against any reference set (the batch, a memory, a gallery).

        Args:
            queries: float `[num_queries, dim]`, L2-normalised rows.
            query_labels: integer `[num_queries]`.
            references: float `[num_references, dim]`, L2-normalised rows.
            ref_labels: integer `[num_references]`.
            query_ids, ref_ids, ref_valid: see `keras_xbm.pairs.pair_masks`.

        Returns:
            The float32 scalar loss.

        Raises:
            ValueError: when the queries and references differ in width (the
                message gives both), or for labels that are not integer vectors.
        """
        similarity = cosine_similarity(queries, references)
        pos_mask, neg_mask = pair_masks(query_labels, ref_labels, query_ids, ref_ids, ref_valid)
        return self.pair_loss(similarity, pos_mask, neg_mask)

    def call(self, y_true, y_pred):
        labels = as_int32_vector(y_true, "labels")
        similarity, pos_mask, neg_mask = in_batch_pairs(y_pred, labels)
        return self.pair_loss(similarity, pos_mask, neg_mask)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} does not take sample weights: a pair loss weights pairs, not samples."
            )
        with tf.name_scope(self.name):
            return self.call(y_true, tf.cast(y_pred, tf.float32))


@keras.saving.register_keras_serializable(package="keras_xbm")
class ContrastiveLoss(PairLoss):
    """Contrastive loss that keeps hard negatives and drops easy ones.

    See `contrastive_loss` for the formula.

    Args:
        negative_threshold: similarity above which a negative pair counts.
            Defaults to 0.5.
        normalization: `"sum"`, `"batch"`, `"pairs"` or `"anchor"`. Defaults to
            `"pairs"`.
        name: optional name.

    Examples:

    >>> loss = ContrastiveLoss(negative_threshold=0.5)
    >>> model.compile(optimizer="adam", loss=loss)   # batch-only training
    >>> XBMModel(network, memory_size=2048, loss=loss)  # with a memory
    """

    def __init__(self, negative_threshold=0.5, normalization="pairs", name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if not -1.0 <= float(negative_threshold) <= 1.0:
            raise ValueError(
                f"Invalid negative_threshold={negative_threshold!r}: expected a cosine similarity in [-1, 1]."
            )
        check_normalization(normalization)
        self.negative_threshold = float(negative_threshold)
        self.normalization = normalization

    def pair_loss(self, similarity, pos_mask, neg_mask, global_count=None):
        return contrastive_loss(
            similarity, pos_mask, neg_mask, self.negative_threshold, self.normalization, global_count
        )

    def get_config(self):
        return {
            "name": self.name,
            "negative_threshold": self.negative_threshold,
            "normalization": self.normalization,
        }


def check_positive(name, value):
    return weighting.check_scale(name, value)


def check_margin(name, value, upper=2.0):
    """Return `value` as a float, or raise when it is outside [0, upper]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= upper:
        raise ValueError(f"Invalid {name}={value!r}: expected a number in [0, {upper:g}].")
    return float(value)


def valid_anchors(pos_mask, neg_mask):
    """Return bool `[num_queries]`: true for the queries with a positive and a negative reference."""
    return tf.logical_and(tf.reduce_any(pos_mask, axis=1), tf.reduce_any(neg_mask, axis=1))


def mean_over_anchors(per_anchor, valid):
    """Average `per_anchor` over the valid anchors; 0 when there is none."""
    per_anchor = tf.where(valid, per_anchor, tf.zeros_like(per_anchor))
    return tf.math.divide_no_nan(tf.reduce_sum(per_anchor), tf.reduce_sum(tf.cast(valid, tf.float32)))


def masked_logsumexp(logits, mask):
    """Return the row-wise `log(sum(exp(logits)))` over `mask`, and whether each row has any entry.

    A row with an empty mask gives 0 with a zero gradient rather than -inf.
    """
    nonempty = tf.reduce_any(mask, axis=1)
    row_max = tf.reduce_max(tf.where(mask, logits, tf.fill(tf.shape(logits), -math.inf)), axis=1, keepdims=True)
    row_max = tf.stop_gradient(tf.where(tf.math.is_finite(row_max), row_max, tf.zeros_like(row_max)))
    # Entries outside the mask are replaced before exp, so that neither their value nor their gradient overflows.
    shifted = tf.where(mask, logits - row_max, tf.zeros_like(logits))
    total = tf.reduce_sum(tf.where(mask, tf.exp(shifted), tf.zeros_like(logits)), axis=1)
    lse = tf.math.log(tf.where(nonempty, total, tf.ones_like(total))) + row_max[:, 0]
    return tf.where(nonempty, lse, tf.zeros_like(lse)), nonempty


def direct_weight_loss(similarity, pos_mask, neg_mask, positive_curve=None, negative_curve=None, normalization="pairs"):
    """Loss whose gradient gives each pair exactly the weight of a curve.

    With `w_pos = positive_curve(S)` and `w_neg = negative_curve(S)` computed
    under stop-gradient, the per-pair terms are

        positive:  w_pos * (1 - S)
        negative:  w_neg * S

    so that before normalisation `dL/dS = -w_pos` on positives and `+w_neg`
    on negatives. The terms are reduced by `normalize_pair_terms`, where a
    pair is active when its weight is non-zero. With `Constant(1)` and
    `Step(t)` this is `contrastive_loss(negative_threshold=t)`, in value and
    gradient. For other curves only the gradient has a meaning: the value is a
    surrogate that may be negative.

    Args:
        similarity: float `[num_queries, num_references]`.
        pos_mask: bool, the positive pairs.
        neg_mask: bool, the negative pairs.
        positive_curve: a `keras_xbm.weighting` curve, its config or its text
            form. `Softmax` curves see the anchor's positives. Defaults to
            `Constant(1.0)`.
        negative_curve: the same for negatives, over the anchor's negatives.
            Defaults to `Step(0.5)`.
        normalization: see the module docstring. Defaults to `"pairs"`.

    Returns:
        A float32 scalar; 0 when no pair has a non-zero weight.
    """
    positive_curve = weighting.Constant(1.0) if positive_curve is None else weighting.deserialize_curve(positive_curve)
    negative_curve = weighting.Step(0.5) if negative_curve is None else weighting.deserialize_curve(negative_curve)
    similarity, pos_mask, neg_mask = check_pair_inputs(similarity, pos_mask, neg_mask)

    zeros = tf.zeros_like(similarity)
    w_pos = tf.where(pos_mask, tf.stop_gradient(positive_curve(similarity, pos_mask)), zeros)
    w_neg = tf.where(neg_mask, tf.stop_gradient(negative_curve(similarity, neg_mask)), zeros)
    pos_active = tf.logical_and(pos_mask, tf.not_equal(w_pos, 0.0))
    neg_active = tf.logical_and(neg_mask, tf.not_equal(w_neg, 0.0))
    pos_terms = tf.where(pos_active, w_pos * (1.0 - similarity), zeros)
    neg_terms = tf.where(neg_active, w_neg * similarity, zeros)
    return normalize_pair_terms(pos_terms, neg_terms, pos_active, neg_active, normalization)


def multi_similarity_mining(similarity, pos_mask, neg_mask, mining_margin=0.1):
    """Select the informative pairs of the multi-similarity loss.

    A negative is kept when `S + mining_margin` exceeds the anchor's least
    similar positive, a positive when `S - mining_margin` is below the
    anchor's most similar negative. An anchor without positives keeps no
    negative, and one without negatives keeps no positive.

    Returns:
        `(kept_pos, kept_neg)`, bool masks of the similarity's shape.
    """
    inf = tf.fill(tf.shape(similarity), math.inf)
    least_similar_pos = tf.reduce_min(tf.where(pos_mask, similarity, inf), axis=1, keepdims=True)
    most_similar_neg = tf.reduce_max(tf.where(neg_mask, similarity, -inf), axis=1, keepdims=True)
    kept_neg = tf.logical_and(neg_mask, similarity + mining_margin > least_similar_pos)
    kept_pos = tf.logical_and(pos_mask, similarity - mining_margin < most_similar_neg)
    return kept_pos, kept_neg


def multi_similarity_loss(
    similarity, pos_mask, neg_mask, positive_scale=2.0, negative_scale=40.0, threshold=0.5, mining_margin=0.1
):
    """Multi-similarity loss with its pair mining, averaged over valid anchors.

    For anchor i with mined positives P_i and negatives N_i
    (`multi_similarity_mining`):

        L_i = 1/alpha * log(1 + sum_{k in P_i} exp(-alpha * (S_ik - lambda)))
            + 1/beta  * log(1 + sum_{k in N_i} exp(beta * (S_ik - lambda)))

    with `alpha = positive_scale`, `beta = negative_scale`,
    `lambda = threshold`. Its pair weights are

        w_pos = exp(-alpha (S_ij - lambda)) / (1 + sum_{k in P_i} exp(-alpha (S_ik - lambda)))
        w_neg = exp(beta (S_ij - lambda)) / (1 + sum_{k in N_i} exp(beta (S_ik - lambda)))

    divided by the number of valid anchors (see the module docstring).

    Returns:
        A float32 scalar.

    Reference: Wang et al., "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", CVPR 2019.
    """
    similarity, pos_mask, neg_mask = check_pair_inputs(similarity, pos_mask, neg_mask)
    kept_pos, kept_neg = multi_similarity_mining(similarity, pos_mask, neg_mask, mining_margin)
    pos_lse, has_pos = masked_logsumexp(-positive_scale * (similarity - threshold), kept_pos)
    neg_lse, has_neg = masked_logsumexp(negative_scale * (similarity - threshold), kept_neg)
    zeros = tf.zeros_like(pos_lse)
    pos_part = tf.where(has_pos, tf.nn.softplus(pos_lse), zeros) / positive_scale
    neg_part = tf.where(has_neg, tf.nn.softplus(neg_lse), zeros) / negative_scale
    return mean_over_anchors(pos_part + neg_part, valid_anchors(pos_mask, neg_mask))


def binomial_deviance_loss(
    similarity, pos_mask, neg_mask, positive_scale=2.0, negative_scale=10.0, threshold=0.5, normalization="pairs"
):
    """Binomial deviance loss: a logistic loss on each pair's similarity.

        positive:  log(1 + exp(-alpha * (S - lambda)))
        negative:  log(1 + exp(beta * (S - lambda)))

    with `alpha = positive_scale`, `beta = negative_scale`,
    `lambda = threshold`, reduced by `normalize_pair_terms` with every pair
    active. Before normalisation the pair weights are
    `w_pos = alpha * sigmoid(-alpha (S - lambda))` and
    `w_neg = beta * sigmoid(beta (S - lambda))`.

    Returns:
        A float32 scalar.

    Reference: Yi et al., "Deep Metric Learning for Person
    Re-identification", ICPR 2014.
    """
    similarity, pos_mask, neg_mask = check_pair_inputs(similarity, pos_mask, neg_mask)
    zeros = tf.zeros_like(similarity)
    pos_terms = tf.where(pos_mask, tf.nn.softplus(-positive_scale * (similarity - threshold)), zeros)
    neg_terms = tf.where(neg_mask, tf.nn.softplus(negative_scale * (similarity - threshold)), zeros)
    return normalize_pair_terms(pos_terms, neg_terms, pos_mask, neg_mask, normalization)


def lifted_structure_loss(similarity, pos_mask, neg_mask, scale=10.0, margin=0.1):
    """Generalised lifted structure loss: a triplet loss on log-sum-exp soft maxima.

    For anchor i with positives P_i and negatives N_i:

        L_i = max(0, 1/a * log sum_{k in N_i} exp(a S_ik)
                   + 1/a * log sum_{k in P_i} exp(-a S_ik) + margin)

    with `a = scale`: the first term is a soft maximum of the negative
    similarities, the second minus a soft minimum of the positive ones, so
    large `scale` tends to the batch-hard triplet loss. Where `L_i > 0`, the
    pair weights are the softmax of `a S` over N_i and of `-a S` over P_i
    (`keras_xbm.weighting.Softmax(normalize="sum")`), divided by the number
    of valid anchors.

    Returns:
        A float32 scalar.

    References: Oh Song et al., "Deep Metric Learning via Lifted Structured
    Feature Embedding", CVPR 2016; Hermans et al., "In Defense of the Triplet
    Loss for Person Re-Identification", 2017.
    """
    similarity, pos_mask, neg_mask = check_pair_inputs(similarity, pos_mask, neg_mask)
    neg_lse, _ = masked_logsumexp(scale * similarity, neg_mask)
    pos_lse, _ = masked_logsumexp(-scale * similarity, pos_mask)
    per_anchor = tf.nn.relu((neg_lse + pos_lse) / scale + margin)
    return mean_over_anchors(per_anchor, valid_anchors(pos_mask, neg_mask))


def circle_loss(similarity, pos_mask, neg_mask, margin=0.4, scale=80.0):
    """Circle loss: each similarity weighted by its distance from its optimum.

    For anchor i, with `m = margin`, `g = scale` and the factors
    `a_p = max(0, 1 + m - S)` and `a_n = max(0, S + m)` under stop-gradient:

        L_i = log(1 + sum_{n in N_i} exp(g a_n (S_in - m))
                    * sum_{p in P_i} exp(-g a_p (S_ip - 1 + m)))

    Returns:
        A float32 scalar, the mean of `L_i` over valid anchors.

    Reference: Sun et al., "Circle Loss: A Unified Perspective of Pair
    Similarity Optimization", CVPR 2020.
    """
    similarity, pos_mask, neg_mask = check_pair_inputs(similarity, pos_mask, neg_mask)
    alpha_pos = tf.stop_gradient(tf.nn.relu(1.0 + margin - similarity))
    alpha_neg = tf.stop_gradient(tf.nn.relu(similarity + margin))
    pos_lse, _ = masked_logsumexp(-scale * alpha_pos * (similarity - (1.0 - margin)), pos_mask)
    neg_lse, _ = masked_logsumexp(scale * alpha_neg * (similarity - margin), neg_mask)
    per_anchor = tf.nn.softplus(pos_lse + neg_lse)
    return mean_over_anchors(per_anchor, valid_anchors(pos_mask, neg_mask))


TRIPLET_MININGS = ("batch_hard", "semi_hard")


def triplet_loss(similarity, pos_mask, neg_mask, margin=0.1, mining="batch_hard"):
    """Triplet loss on cosine similarities with batch-hard or semi-hard mining.

    `"batch_hard"`: per valid anchor, the least similar positive against the
    most similar negative among all references,

        L_i = max(0, max_{n in N_i} S_in - min_{p in P_i} S_ip + margin),

    averaged over valid anchors. `"semi_hard"`: per positive pair (i, p) of a
    valid anchor, the most similar negative that is still less similar than
    p; when every negative is more similar than p, the least similar
    negative. Then `max(0, S_in - S_ip + margin)` is averaged over those
    positive pairs. On ties, `tf.reduce_max` and `tf.reduce_min` share the
    gradient equally between the tied entries.

    Returns:
        A float32 scalar.

    References: Hermans et al., "In Defense of the Triplet Loss for Person
    Re-Identification", 2017 (batch hard); Schroff et al., "FaceNet", CVPR
    2015 (semi-hard).
    """
    if mining not in TRIPLET_MININGS:
        raise ValueError(f"Unknown mining={mining!r}: expected one of {', '.join(TRIPLET_MININGS)}.")
    similarity, pos_mask, neg_mask = check_pair_inputs(similarity, pos_mask, neg_mask)
    valid = valid_anchors(pos_mask, neg_mask)
    inf = tf.fill(tf.shape(similarity), math.inf)

    if mining == "batch_hard":
        least_similar_pos = tf.reduce_min(tf.where(pos_mask, similarity, inf), axis=1)
        most_similar_neg = tf.reduce_max(tf.where(neg_mask, similarity, -inf), axis=1)
        gap = tf.where(valid, most_similar_neg - least_similar_pos, tf.zeros_like(least_similar_pos))
        return mean_over_anchors(tf.nn.relu(gap + margin), valid)

    # Each row's negatives in ascending order, the other references after them as +inf.
    sorted_neg = tf.sort(tf.where(neg_mask, similarity, inf), axis=1)
    # Number of negatives strictly less similar than each reference: the semi-hard one sits just before.
    below = tf.searchsorted(sorted_neg, tf.stop_gradient(similarity), side="left")
    chosen_neg = tf.gather(sorted_neg, tf.maximum(below - 1, 0), batch_dims=1)
    triplets = tf.logical_and(pos_mask, valid[:, None])
    zeros = tf.zeros_like(similarity)
    per_pair = tf.nn.relu(tf.where(triplets, chosen_neg - similarity, zeros) + margin)
    per_pair = tf.where(triplets, per_pair, zeros)
    return tf.math.divide_no_nan(tf.reduce_sum(per_pair), tf.reduce_sum(tf.cast(triplets, tf.float32)))


@keras.saving.register_keras_serializable(package="keras_xbm")
class DirectWeightLoss(PairLoss):
    """Loss built from a positive and a negative weight curve.

    See `direct_weight_loss`. `DirectWeightLoss(Constant(1), Step(t))` equals
    `ContrastiveLoss(negative_threshold=t)` for the same `normalization`.

    Args:
        positive_curve: a `keras_xbm.weighting` curve, its config, or its text
            form such as `"constant"`. Defaults to `Constant(1.0)`.
        negative_curve: the same for negatives, such as
            `"step(threshold=0.5)"`. Defaults to `Step(0.5)`.
        normalization: `"sum"`, `"batch"`, `"pairs"` or `"anchor"`. Defaults to
            `"pairs"`.
        name: optional name.

    Examples:

    >>> from keras_xbm.weighting import Constant, Exponential, Step
    >>> loss = DirectWeightLoss(Constant(1.0), Step(0.5) * Exponential(10.0, 0.5))
    >>> XBMModel(network, memory_size=2048, loss=loss)
    """

    def __init__(self, positive_curve=None, negative_curve=None, normalization="pairs", name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        check_normalization(normalization)
        self.positive_curve = (
            weighting.Constant(1.0) if positive_curve is None else weighting.deserialize_curve(positive_curve)
        )
        self.negative_curve = (
            weighting.Step(0.5) if negative_curve is None else weighting.deserialize_curve(negative_curve)
        )
        self.normalization = normalization

    def pair_loss(self, similarity, pos_mask, neg_mask):
        return direct_weight_loss(
            similarity, pos_mask, neg_mask, self.positive_curve, self.negative_curve, self.normalization
        )

    def get_config(self):
        return {
            "name": self.name,
            "positive_curve": weighting.serialize_curve(self.positive_curve),
            "negative_curve": weighting.serialize_curve(self.negative_curve),
            "normalization": self.normalization,
        }


@keras.saving.register_keras_serializable(package="keras_xbm")
class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss with its pair mining; see `multi_similarity_loss`.

    Args:
        positive_scale: alpha, positive. Defaults to 2.0.
        negative_scale: beta, positive. Defaults to 40.0.
        threshold: lambda, a cosine similarity in [-1, 1]. Defaults to 0.5.
        mining_margin: epsilon of the mining, in [0, 2]. Defaults to 0.1.
        name: optional name.
    """

    def __init__(
        self, positive_scale=2.0, negative_scale=40.0, threshold=0.5, mining_margin=0.1, name=None, **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.positive_scale = check_positive("positive_scale", positive_scale)
        self.negative_scale = check_positive("negative_scale", negative_scale)
        self.threshold = weighting.check_threshold("threshold", threshold)
        self.mining_margin = check_margin("mining_margin", mining_margin)

    def pair_loss(self, similarity, pos_mask, neg_mask):
        return multi_similarity_loss(
            similarity,
            pos_mask,
            neg_mask,
            self.positive_scale,
            self.negative_scale,
            self.threshold,
            self.mining_margin,
        )

    def get_config(self):
        return {
            "name": self.name,
            "positive_scale": self.positive_scale,
            "negative_scale": self.negative_scale,
            "threshold": self.threshold,
            "mining_margin": self.mining_margin,
        }


@keras.saving.register_keras_serializable(package="keras_xbm")
class BinomialDevianceLoss(PairLoss):
    """Binomial deviance loss; see `binomial_deviance_loss`.

    Args:
        positive_scale: alpha, positive. Defaults to 2.0.
        negative_scale: beta, positive. Defaults to 10.0.
        threshold: lambda, a cosine similarity in [-1, 1]. Defaults to 0.5.
        normalization: `"sum"`, `"batch"`, `"pairs"` or `"anchor"`. Defaults to
            `"pairs"`.
        name: optional name.
    """

    def __init__(
        self, positive_scale=2.0, negative_scale=10.0, threshold=0.5, normalization="pairs", name=None, **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.positive_scale = check_positive("positive_scale", positive_scale)
        self.negative_scale = check_positive("negative_scale", negative_scale)
        self.threshold = weighting.check_threshold("threshold", threshold)
        check_normalization(normalization)
        self.normalization = normalization

    def pair_loss(self, similarity, pos_mask, neg_mask):
        return binomial_deviance_loss(
            similarity,
            pos_mask,
            neg_mask,
            self.positive_scale,
            self.negative_scale,
            self.threshold,
            self.normalization,
        )

    def get_config(self):
        return {
            "name": self.name,
            "positive_scale": self.positive_scale,
            "negative_scale": self.negative_scale,
            "threshold": self.threshold,
            "normalization": self.normalization,
        }


@keras.saving.register_keras_serializable(package="keras_xbm")
class LiftedStructureLoss(PairLoss):
    """Generalised lifted structure loss; see `lifted_structure_loss`.

    Args:
        scale: positive inverse temperature of the soft maxima. Defaults to
            10.0.
        margin: in [0, 2]. Defaults to 0.1.
        name: optional name.
    """

    def __init__(self, scale=10.0, margin=0.1, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = check_positive("scale", scale)
        self.margin = check_margin("margin", margin)

    def pair_loss(self, similarity, pos_mask, neg_mask):
        return lifted_structure_loss(similarity, pos_mask, neg_mask, self.scale, self.margin)

    def get_config(self):
        return {"name": self.name, "scale": self.scale, "margin": self.margin}


@keras.saving.register_keras_serializable(package="keras_xbm")
class CircleLoss(PairLoss):
    """Circle loss; see `circle_loss`.

    Args:
        margin: relaxation m, in [0, 1]. Defaults to 0.4.
        scale: gamma, positive. Defaults to 80.0.
        name: optional name.
    """

    def __init__(self, margin=0.4, scale=80.0, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.margin = check_margin("margin", margin, upper=1.0)
        self.scale = check_positive("scale", scale)

    def pair_loss(self, similarity, pos_mask, neg_mask):
        return circle_loss(similarity, pos_mask, neg_mask, self.margin, self.scale)

    def get_config(self):
        return {"name": self.name, "margin": self.margin, "scale": self.scale}


@keras.saving.register_keras_serializable(package="keras_xbm")
class TripletLoss(PairLoss):
    """Triplet loss with batch-hard or semi-hard mining; see `triplet_loss`.

    Against a memory, "batch" means every reference: the hardest negative is
    searched among the batch or the memory slots passed in.

    Args:
        margin: in [0, 2]. Defaults to 0.1.
        mining: `"batch_hard"` or `"semi_hard"`. Defaults to `"batch_hard"`.
        name: optional name.
    """

    def __init__(self, margin=0.1, mining="batch_hard", name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.margin = check_margin("margin", margin)
        if mining not in TRIPLET_MININGS:
            raise ValueError(f"Unknown mining={mining!r}: expected one of {', '.join(TRIPLET_MININGS)}.")
        self.mining = mining

    def pair_loss(self, similarity, pos_mask, neg_mask):
        return triplet_loss(similarity, pos_mask, neg_mask, self.margin, self.mining)

    def get_config(self):
        return {"name": self.name, "margin": self.margin, "mining": self.mining}


# Each pair loss at its defaults. The losses made of per-pair terms take the
# normalization; the contrastive loss also takes the negative threshold.
NAMED_LOSSES = {
    "contrastive": lambda threshold, normalization: ContrastiveLoss(threshold, normalization),
    "multi_similarity": lambda threshold, normalization: MultiSimilarityLoss(),
    "binomial_deviance": lambda threshold, normalization: BinomialDevianceLoss(normalization=normalization),
    "lifted_structure": lambda threshold, normalization: LiftedStructureLoss(),
    "circle": lambda threshold, normalization: CircleLoss(),
    "triplet_batch_hard": lambda threshold, normalization: TripletLoss(mining="batch_hard"),
    "triplet_semi_hard": lambda threshold, normalization: TripletLoss(mining="semi_hard"),
}


def build_loss(spec, negative_threshold=0.5, normalization="pairs"):
    """Build a pair loss from its name or from a pair of weight curves.

    Args:
        spec: a name of `NAMED_LOSSES` such as `"multi_similarity"`, or
            `"POSITIVE/NEGATIVE"` weight curves in the syntax of
            `keras_xbm.weighting.parse_curve`, such as
            `"constant/step(threshold=0.5)"`, which builds a `DirectWeightLoss`.
        negative_threshold: threshold of the contrastive loss. Defaults to 0.5.
        normalization: normalisation of the losses made of per-pair terms
            (contrastive, binomial deviance, direct weights). Defaults to `"pairs"`.

    Returns:
        A `PairLoss`.

    Raises:
        ValueError: for an unknown loss or curve name, or a curve that does
            not parse.
    """
    text = str(spec).strip()
    if "/" in text:
        positive_text, negative_text = text.split("/", 1)
        return DirectWeightLoss(
            weighting.parse_curve(positive_text), weighting.parse_curve(negative_text), normalization=normalization
        )
    if text not in NAMED_LOSSES:
        raise ValueError(
            f"Unknown loss {spec!r}: expected one of {', '.join(NAMED_LOSSES)}, "
            "or POSITIVE_CURVE/NEGATIVE_CURVE such as 'constant/step(threshold=0.5)'."
        )
    return NAMED_LOSSES[text](negative_threshold, normalization)
