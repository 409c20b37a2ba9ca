"""Retrieval evaluation of an exported SavedModel, as `keras-xbm evaluate` runs it."""

import logging
import os

import numpy as np
import tensorflow as tf

from keras_xbm.data import load_omniglot
from keras_xbm.retrieval.protocols import evaluate_retrieval

logger = logging.getLogger(__name__)


def resolve_saved_model(path):
    """Return the SavedModel folder at `path`, or its newest numbered version folder."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if os.path.isdir(path):
        versions = sorted((int(name) for name in os.listdir(path) if name.isdigit()), reverse=True)
        for version in versions:
            candidate = os.path.join(path, str(version))
            if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
                return candidate
    raise FileNotFoundError(
        f"No SavedModel at {path!r}: expected a folder with saved_model.pb, "
        "or a folder of numbered version folders such as saved_models/omniglot/1."
    )


def load_serving_function(path):
    """Load a SavedModel's `serving_default` and return `(function, input_spec)`."""
    loaded = tf.saved_model.load(path)
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"The SavedModel at {path!r} has no serving_default signature.")
    function = loaded.signatures["serving_default"]
    _, input_specs = function.structured_input_signature
    if len(input_specs) != 1:
        raise ValueError(f"Expected one input in serving_default of {path!r}, found {sorted(input_specs)}.")
    (input_spec,) = input_specs.values()
    # The loaded object owns the variables: keep it alive as long as the function.
    function.loaded_object = loaded
    return function, input_spec


def embed_with_signature(function, images, batch_size=256):
    """Run a serving signature over `images` in batches; return float32 `[count, dim]`."""
    outputs = []
    for start in range(0, len(images), batch_size):
        result = function(tf.constant(images[start : start + batch_size], tf.float32))
        outputs.append(result["embeddings"].numpy())
    return np.concatenate(outputs).astype(np.float32)


def evaluate_saved_model(model_path, data_dir, ks=(1, 2, 4, 8), index="exact"):
    """Embed the Omniglot test split with a SavedModel and return its Recall@K, MAP@R and R-precision."""
    path = resolve_saved_model(model_path)
    function, input_spec = load_serving_function(path)
    height, width = input_spec.shape[1], input_spec.shape[2]
    if height is None or height != width:
        raise ValueError(f"Expected a square fixed-size image input in {path!r}, found shape {input_spec.shape}.")
    _, test = load_omniglot(data_dir, image_size=int(height))
    embeddings = embed_with_signature(function, test.images)
    results = {"model": path, "index": index, "test_images": len(test), "test_classes": test.num_classes}
    results.update(evaluate_retrieval(embeddings, test.labels, ks=ks, index=index))
    return results
