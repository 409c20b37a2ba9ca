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
switches on (a batch of 16 sees 15 references, a memory thousands). The
`normalization` argument takes:

- `"sum"`: no division. `dL/dS` of each pair is exactly its pair weight, which
  is what the weight analysis wants; training with it scales the step with the
  number of pairs.
- `"batch"`: the sum divided by the number of queries, as the official XBM code
  does. With a memory, the loss and its gradient grow with the number of hard
  negatives found, by orders of magnitude over the batch-only loss.
- `"pairs"`: the mean of the positive terms plus the mean of the active negative
  terms (a pair is active when its weight is non-zero). The gradient mass stays
  the same whatever the number of references, so the memory term and the batch
  term have the same scale. This is the default.
- `"anchor"`: per query, the mean of its positive terms plus the mean of its
  active negative terms, then the mean over queries with at least one active
  pair.

`docs/normalization.md` has the measurements behind the default.
"""

import keras
import tensorflow as tf

from keras_xbm.memory import as_int32_vector
from keras_xbm.pairs import in_batch_pairs

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
