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


def evaluate_saved_model_on_benchmark(model_path, dataset, data_dir, ks=None, index="exact", test_list=800, from_tfds=False, resize_size=None, batch_size=64):
    """Embed an image benchmark's evaluation split with a SavedModel and return its Recall@K results.

    The images go through the eval transform of `keras_xbm.data.images`
    (shorter side `resize_size`, central crop of the model's input side),
    as RGB in [0, 255], the input the exported image networks take. The
    protocol is the one the benchmark's reader hands over: leave-one-out, or
    query against gallery for In-Shop. K values larger than the references
    of each query are dropped and listed under `dropped_ks`.

    Args:
        model_path: a SavedModel folder or a folder of numbered versions.
        dataset: `"sop"`, `"inshop"`, `"vehicleid"`, `"cub"`, `"cars"` or `"folder"`.
        data_dir: the dataset's folder (see `keras_xbm.data.load_benchmark`).
        ks: the K values. Defaults to the benchmark's usual list.
        index: `"exact"` or `"scann"`. Defaults to `"exact"`.
        test_list: VehicleID's test set. Defaults to 800.
        from_tfds: read through TFDS. Defaults to False.
        resize_size: shorter side before the crop. Defaults to the input side x 256/224.
        batch_size: images per forward pass. Defaults to 64.
    """
    from keras_xbm.benchmark_training import describe_evaluation, usable_ks
    from keras_xbm.data.benchmarks import load_benchmark
    from keras_xbm.data.images import eval_dataset
    from keras_xbm.retrieval.protocols import evaluate_retrieval

    path = resolve_saved_model(model_path)
    function, input_spec = load_serving_function(path)
    height, width, channels = input_spec.shape[1], input_spec.shape[2], input_spec.shape[3]
    if height is None or height != width or channels != 3:
        raise ValueError(
            f"Expected a square fixed-size RGB image input in {path!r}, found shape {input_spec.shape}: "
            "the image benchmarks need a model trained on them."
        )
    benchmark = load_benchmark(dataset, data_dir, test_list=test_list, from_tfds=from_tfds)
    available = len(benchmark.query) - 1 if benchmark.gallery is None else len(benchmark.gallery)
    kept_ks, dropped_ks = usable_ks(tuple(ks or benchmark.ks), available)

    def embed(paths):
        batches = eval_dataset(paths, int(height), resize_size, batch_size)
        return np.concatenate([function(batch)["embeddings"].numpy() for batch in batches]).astype(np.float32)

    gallery = None if benchmark.gallery is None else embed(benchmark.gallery.paths)
    gallery_labels = None if benchmark.gallery is None else benchmark.gallery.labels
    results = {
        "model": path,
        "index": index,
        "protocol": benchmark.protocol,
        "evaluation": describe_evaluation(benchmark),
        "test_images": len(benchmark.evaluation_paths()),
        "test_classes": benchmark.query.num_classes,
        "dropped_ks": list(dropped_ks),
    }
    results.update(evaluate_retrieval(embed(benchmark.query.paths), benchmark.query.labels, gallery, gallery_labels, ks=kept_ks, index=index))
    return results
