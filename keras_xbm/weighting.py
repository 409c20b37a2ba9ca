"""Pair weight curves, and the pair weights that a pair loss induces.

A pair loss `L` over the similarities `S[i, j]` of queries against references
acts on the embeddings only through `dL/dS`. The weight of a pair is the size
of that derivative:

    w_pos[i, j] = -dL/dS[i, j]   for a positive pair (pulled together)
    w_neg[i, j] = +dL/dS[i, j]   for a negative pair (pushed apart)

Two losses that give every pair the same weight train the same way, so a loss
can be judged by its weight curves `w_pos(S)` and `w_neg(S)`, and a loss can be
built from the curves directly (`keras_xbm.losses.DirectWeightLoss`).

A curve is a callable `curve(similarity, mask=None)` that returns a float32
tensor of the similarity's shape. Most curves depend on `S[i, j]` alone and
ignore the mask. `Softmax` depends on the other pairs of the same anchor (row
`i`) inside `mask`: lifted structure induces this form, and multi-similarity
induces it with 1 added to the denominator. Curves compose: `Step(0.5) * Exponential(10.0, 0.5)` keeps the hard
negatives only and weighs them by hardness.

Every curve serializes with `get_config` / `from_config`. `serialize_curve`,
`deserialize_curve` and `parse_curve` go through the registry `CURVES`, so a
curve can be stored in a loss config or written on the command line as
`step(threshold=0.5)*exponential(scale=10)`.
"""

import ast
import math
import re

import tensorflow as tf

CURVES = {}

MAX_EXPONENT = 80.0


def register_curve(cls):
    """Add a curve class to `CURVES` under its class name."""
    CURVES[cls.__name__] = cls
    return cls


def check_scale(name, value):
    """Return `value` as a float, or raise when it is not a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}={value!r}: expected a positive finite number.")
    return float(value)


def check_threshold(name, value):
    """Return `value` as a float, or raise when it is not a cosine similarity in [-1, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}={value!r}: expected a cosine similarity in [-1, 1].")
    return float(value)


def check_increasing(value):
    if not isinstance(value, bool):
        raise ValueError(f"Invalid increasing={value!r}: expected True (negative pairs) or False (positive pairs).")
    return value


def default_threshold(threshold, increasing):
    """Return `threshold`, or the end of [-1, 1] at which an unset curve starts."""
    if threshold is None:
        return -1.0 if increasing else 1.0
    return check_threshold("threshold", threshold)


def as_similarity(similarity):
    return tf.cast(tf.convert_to_tensor(similarity), tf.float32)


class WeightCurve:
    """Base class of the weight curves: a non-negative weight for each pair.

    Subclasses implement `__call__(similarity, mask=None)` and `get_config`.
    `curve_a * curve_b` is their `Product`, `curve_a + curve_b` their `Sum`.
    """

    def __call__(self, similarity, mask=None):
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __mul__(self, other):
        return Product([self, other])

    def __add__(self, other):
        return Sum([self, other])

    def __eq__(self, other):
        return type(self) is type(other) and serialize_curve(self) == serialize_curve(other)

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


@register_curve
class Constant(WeightCurve):
    """The same weight for every pair: `w(S) = value`.

    Args:
        value: the weight, at least 0. Defaults to 1.0.
    """

    def __init__(self, value=1.0):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid value={value!r}: expected a non-negative finite number.")
        self.value = float(value)

    def __call__(self, similarity, mask=None):
        return tf.fill(tf.shape(as_similarity(similarity)), self.value)

    def get_config(self):
        return {"value": self.value}


@register_curve
class Step(WeightCurve):
    """Weight 1 on one side of a threshold and 0 on the other.

        increasing:      w(S) = 1 if S > threshold else 0   (hard negatives)
        not increasing:  w(S) = 1 if S < threshold else 0   (hard positives)

    With a constant positive curve, `Step(threshold)` as the negative curve is
    the contrastive loss that drops easy negatives (Wang et al., "Cross-Batch
    Memory for Embedding Learning", CVPR 2020).

    Args:
        threshold: cosine similarity in [-1, 1]. Defaults to 0.5.
        increasing: True for a curve that is 1 above the threshold. Defaults
            to True.
    """

    def __init__(self, threshold=0.5, increasing=True):
        self.threshold = check_threshold("threshold", threshold)
        self.increasing = check_increasing(increasing)

    def __call__(self, similarity, mask=None):
        similarity = as_similarity(similarity)
        kept = similarity > self.threshold if self.increasing else similarity < self.threshold
        return tf.cast(kept, tf.float32)

    def get_config(self):
        return {"threshold": self.threshold, "increasing": self.increasing}


@register_curve
class Linear(WeightCurve):
    """A ramp that starts at a threshold.

        increasing:      w(S) = scale * max(0, S - threshold)
        not increasing:  w(S) = scale * max(0, threshold - S)

    `Linear(increasing=False)` on positives and `Linear(threshold=m)` on
    negatives are the weights of the squared contrastive loss
    `(1 - S)^2 / 2 + max(0, S - m)^2 / 2`.

    Args:
        scale: slope, positive. Defaults to 1.0.
        threshold: cosine similarity in [-1, 1] where the ramp starts, or
            `None` for the far end of the range (-1 when increasing, 1
            otherwise), so that the curve is positive on all of (-1, 1).
            Defaults to `None`.
        increasing: True for a ramp that grows with S. Defaults to True.
    """

    def __init__(self, scale=1.0, threshold=None, increasing=True):
        self.scale = check_scale("scale", scale)
        self.increasing = check_increasing(increasing)
        self.threshold = default_threshold(threshold, self.increasing)

    def __call__(self, similarity, mask=None):
        similarity = as_similarity(similarity)
        distance = similarity - self.threshold if self.increasing else self.threshold - similarity
        return self.scale * tf.nn.relu(distance)

    def get_config(self):
        return {"scale": self.scale, "threshold": self.threshold, "increasing": self.increasing}


@register_curve
class Power(WeightCurve):
    """A power of the distance past a threshold.

        increasing:      w(S) = max(0, S - threshold) ** exponent
        not increasing:  w(S) = max(0, threshold - S) ** exponent

    Args:
        exponent: positive; above 1 the curve favours the hardest pairs more
            than `Linear` does, below 1 less. Defaults to 2.0.
        threshold: cosine similarity in [-1, 1], or `None` for the far end of
            the range as in `Linear`. Defaults to `None`.
        increasing: True for a curve that grows with S. Defaults to True.
    """

    def __init__(self, exponent=2.0, threshold=None, increasing=True):
        self.exponent = check_scale("exponent", exponent)
        self.increasing = check_increasing(increasing)
        self.threshold = default_threshold(threshold, self.increasing)

    def __call__(self, similarity, mask=None):
        similarity = as_similarity(similarity)
        distance = similarity - self.threshold if self.increasing else self.threshold - similarity
        return tf.pow(tf.nn.relu(distance), self.exponent)

    def get_config(self):
        return {"exponent": self.exponent, "threshold": self.threshold, "increasing": self.increasing}


@register_curve
class Exponential(WeightCurve):
    """An exponential that equals 1 at a threshold.

        increasing:      w(S) = exp(scale * (S - threshold))
        not increasing:  w(S) = exp(-scale * (S - threshold))

    These are the numerators of the multi-similarity weights (Wang et al.,
    "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning", CVPR 2019).

    Args:
        scale: positive rate. Defaults to 10.0.
        threshold: cosine similarity in [-1, 1] where the weight is 1.
            Defaults to 0.5.
        increasing: True for a curve that grows with S. Defaults to True.
    """

    def __init__(self, scale=10.0, threshold=0.5, increasing=True):
        self.scale = check_scale("scale", scale)
        self.threshold = check_threshold("threshold", threshold)
        self.increasing = check_increasing(increasing)

    def __call__(self, similarity, mask=None):
        sign = 1.0 if self.increasing else -1.0
        exponent = sign * self.scale * (as_similarity(similarity) - self.threshold)
        # NOTE: the exponent is capped at 80 (weight about 5.5e34), below float32 overflow at 88.7.
        return tf.exp(tf.minimum(exponent, MAX_EXPONENT))

    def get_config(self):
        return {"scale": self.scale, "threshold": self.threshold, "increasing": self.increasing}


@register_curve
class Sigmoid(WeightCurve):
    """A logistic curve that equals 1/2 at a threshold: a smooth `Step`.

        increasing:      w(S) = sigmoid(scale * (S - threshold))
        not increasing:  w(S) = sigmoid(-scale * (S - threshold))

    Binomial deviance induces `scale * Sigmoid(scale, threshold)` (Yi et al.,
    "Deep Metric Learning for Person Re-identification", ICPR 2014).

    Args:
        scale: positive steepness. Defaults to 10.0.
        threshold: cosine similarity in [-1, 1] at the midpoint. Defaults to
            0.5.
        increasing: True for a curve that grows with S. Defaults to True.
    """

    def __init__(self, scale=10.0, threshold=0.5, increasing=True):
        self.scale = check_scale("scale", scale)
        self.threshold = check_threshold("threshold", threshold)
        self.increasing = check_increasing(increasing)

    def __call__(self, similarity, mask=None):
        sign = 1.0 if self.increasing else -1.0
        return tf.sigmoid(sign * self.scale * (as_similarity(similarity) - self.threshold))

    def get_config(self):
        return {"scale": self.scale, "threshold": self.threshold, "increasing": self.increasing}


SOFTMAX_NORMALIZATIONS = ("mean", "sum")


@register_curve
class Softmax(WeightCurve):
    """A softmax of the similarities over each anchor's pairs in the mask.

        w[i, j] = c_i * exp(sign * scale * S[i, j]) / sum_{k in mask[i]} exp(sign * scale * S[i, k])

    with `sign` +1 when increasing (over negatives: the hardest negative gets
    the most weight) and -1 otherwise (over positives). With
    `normalize="sum"`, `c_i = 1` and each anchor's weights sum to 1, as the
    generalised lifted structure loss induces. With `normalize="mean"`, `c_i`
    is the anchor's number of pairs in the mask, so the weights average to 1
    over each anchor as `Constant(1)` does, and the curve only moves weight
    between the pairs of an anchor.

    Pairs outside the mask get weight 0. A row with no pair in the mask gets
    weight 0 everywhere.

    Args:
        scale: positive inverse temperature. Defaults to 10.0.
        increasing: True to favour high similarities (negatives). Defaults to
            True.
        normalize: `"mean"` or `"sum"`. Defaults to `"mean"`.
    """

    def __init__(self, scale=10.0, increasing=True, normalize="mean"):
        self.scale = check_scale("scale", scale)
        self.increasing = check_increasing(increasing)
        if normalize not in SOFTMAX_NORMALIZATIONS:
            raise ValueError(f"Invalid normalize={normalize!r}: expected one of {', '.join(SOFTMAX_NORMALIZATIONS)}.")
        self.normalize = normalize

    def __call__(self, similarity, mask=None):
        similarity = as_similarity(similarity)
        mask = tf.ones_like(similarity, tf.bool) if mask is None else tf.convert_to_tensor(mask, tf.bool)
        sign = 1.0 if self.increasing else -1.0
        logits = tf.where(mask, sign * self.scale * similarity, tf.fill(tf.shape(similarity), -math.inf))
        # Shift by each row's maximum; a row with an empty mask shifts by 0 and stays at exp(-inf) = 0.
        row_max = tf.reduce_max(logits, axis=1, keepdims=True)
        row_max = tf.where(tf.math.is_finite(row_max), row_max, tf.zeros_like(row_max))
        numerators = tf.exp(logits - row_max)
        weights = tf.math.divide_no_nan(numerators, tf.reduce_sum(numerators, axis=1, keepdims=True))
        if self.normalize == "mean":
            weights = weights * tf.reduce_sum(tf.cast(mask, tf.float32), axis=1, keepdims=True)
        return weights

    def get_config(self):
        return {"scale": self.scale, "increasing": self.increasing, "normalize": self.normalize}


class Composite(WeightCurve):
    """Base of the curves made of other curves; each part gets the same mask."""

    def __init__(self, curves):
        curves = [deserialize_curve(curve) for curve in curves]
        if len(curves) < 2:
            raise ValueError(f"Expected at least two curves in a {type(self).__name__}, received {len(curves)}.")
        # Flatten nested products (or sums), so a * b * c has one config level.
        self.curves = []
        for curve in curves:
            self.curves.extend(curve.curves if type(curve) is type(self) else [curve])

    def get_config(self):
        return {"curves": [serialize_curve(curve) for curve in self.curves]}

    def __repr__(self):
        return f"{type(self).__name__}({self.curves!r})"


@register_curve
class Product(Composite):
    """The product of curves: `Step(0.5) * Exponential(10.0, 0.5)` is zero below 0.5, exponential above."""

    def __call__(self, similarity, mask=None):
        weights = self.curves[0](similarity, mask)
        for curve in self.curves[1:]:
            weights = weights * curve(similarity, mask)
        return weights


@register_curve
class Sum(Composite):
    """The sum of curves."""

    def __call__(self, similarity, mask=None):
        return tf.add_n([curve(similarity, mask) for curve in self.curves])


def serialize_curve(curve):
    """Return `{"class_name": ..., "config": ...}` for a curve of `CURVES`."""
    if not isinstance(curve, WeightCurve):
        raise ValueError(f"Expected a keras_xbm.weighting curve, received {curve!r}.")
    return {"class_name": type(curve).__name__, "config": curve.get_config()}


def deserialize_curve(config):
    """Build a curve from `serialize_curve`'s output; curves pass through, strings go to `parse_curve`.

    Raises:
        ValueError: for a class name that is not in `CURVES`, or a config that
            is not a dict with `class_name` and `config`.
    """
    if isinstance(config, WeightCurve):
        return config
    if isinstance(config, str):
        return parse_curve(config)
    if not isinstance(config, dict) or set(config) != {"class_name", "config"}:
        raise ValueError(f"Expected a curve config {{'class_name': ..., 'config': {{...}}}}, received {config!r}.")
    class_name = config["class_name"]
    if class_name not in CURVES:
        raise ValueError(f"Unknown weight curve {class_name!r}: expected one of {', '.join(sorted(CURVES))}.")
    return CURVES[class_name].from_config(dict(config["config"]))


TERM_PATTERN = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$")


def curve_name_to_class(name):
    """Map `step`, `Step` or `STEP` to the registered class."""
    by_lower_name = {class_name.lower(): cls for class_name, cls in CURVES.items()}
    if name.lower() not in by_lower_name:
        raise ValueError(f"Unknown weight curve {name!r}: expected one of {', '.join(sorted(by_lower_name))}.")
    return by_lower_name[name.lower()]


def parse_argument_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered == "none":
            return None
        return text


def parse_curve(text):
    """Build a curve from text such as `step(threshold=0.5)*exponential(scale=10, threshold=0.5)`.

    A term is a curve name (any case), optionally followed by keyword
    arguments in brackets; terms joined by `*` form a `Product`. Values are
    Python literals, and `true`, `false` and `none` are accepted in lower case.

    Raises:
        ValueError: for an unknown curve name, a term that does not parse, or
            an invalid argument of a curve.
    """
    terms = [term for term in text.split("*")]
    curves = []
    for term in terms:
        match = TERM_PATTERN.match(term)
        if not match:
            raise ValueError(f"Invalid weight curve {term.strip()!r} in {text!r}: expected name(key=value, ...).")
        cls = curve_name_to_class(match.group(1))
        kwargs = {}
        for argument in filter(None, (part.strip() for part in (match.group(2) or "").split(","))):
            key, separator, value = argument.partition("=")
            if not separator:
                raise ValueError(f"Invalid argument {argument!r} of {match.group(1)} in {text!r}: expected key=value.")
            kwargs[key.strip()] = parse_argument_value(value.strip())
        try:
            curves.append(cls(**kwargs))
        except TypeError as error:
            raise ValueError(f"Invalid arguments of {match.group(1)} in {text!r}: {error}.") from None
    return curves[0] if len(curves) == 1 else Product(curves)


def induced_weights(loss, similarity, pos_mask, neg_mask):
    """Compute the weight that a pair loss gives each positive and each negative pair.

        w_pos = -dL/dS on positive pairs, 0 elsewhere
        w_neg = +dL/dS on negative pairs, 0 elsewhere

    For every loss of `keras_xbm.losses` both are non-negative, so they equal
    `|dL/dS|`. A negative value would mean the loss pushes a positive pair
    apart or pulls a negative pair together.

    Args:
        loss: a `keras_xbm.losses.PairLoss`, or any callable
            `(similarity, pos_mask, neg_mask) -> scalar`.
        similarity: float `[num_queries, num_references]`.
        pos_mask: bool, the positive pairs.
        neg_mask: bool, the negative pairs.

    Returns:
        `(w_pos, w_neg)`, float32 tensors of the similarity's shape.
    """
    similarity = as_similarity(similarity)
    pos_mask = tf.convert_to_tensor(pos_mask, tf.bool)
    neg_mask = tf.convert_to_tensor(neg_mask, tf.bool)
    score = loss.pair_loss if hasattr(loss, "pair_loss") else loss
    with tf.GradientTape() as tape:
        tape.watch(similarity)
        value = score(similarity, pos_mask, neg_mask)
    gradient = tape.gradient(value, similarity)
    if gradient is None:
        gradient = tf.zeros_like(similarity)
    zeros = tf.zeros_like(similarity)
    return tf.where(pos_mask, -gradient, zeros), tf.where(neg_mask, gradient, zeros)
