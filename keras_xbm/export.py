"""Export the embedding network as a SavedModel for TF Serving.

Only the embedding network is exported: the memory, the loss and the
optimizer state stay out. The SavedModel has one signature, `serving_default`:

- input `images`: float32 `[batch, height, width, channels]`, preprocessed as
  in training (for the Omniglot recipe: 32x32 grayscale ink in [0, 1], 1.0
  on the strokes);
- output `embeddings`: float32 `[batch, dim]`, L2-normalised.

Exports go to `<export_dir>/<version>/`, TF Serving's layout: each export takes
the next free version number, so earlier versions are never overwritten.
"""

import logging
import os

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)


def next_version(export_dir):
    """Return 1 plus the largest numbered version folder in `export_dir` (1 when there is none)."""
    if not os.path.isdir(export_dir):
        return 1
    versions = [int(name) for name in os.listdir(export_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def export_saved_model(embedding_model, export_dir, version=None):
    """Write `embedding_model` as a SavedModel to `<export_dir>/<version>/` and return that path.

    Args:
        embedding_model: a Keras model from images to embeddings (for an
            `XBMModel`, pass `model.embedding_model`; passing the `XBMModel`
            itself works too, and exports the same network).
        export_dir: the model's folder; versions are created inside it.
        version: a positive integer. Defaults to the next free version.

    Raises:
        FileExistsError: when `<export_dir>/<version>` already exists.
    """
    network = getattr(embedding_model, "embedding_model", embedding_model)
    if version is None:
        version = next_version(export_dir)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"Invalid version={version!r}: expected a positive integer.")
    path = os.path.join(export_dir, str(version))
    if os.path.exists(path):
        raise FileExistsError(f"Export path {path!r} already exists: choose another version or export_dir.")

    input_shape = network.inputs[0].shape
    archive = keras.export.ExportArchive()
    archive.track(network)

    def serve(images):
        embeddings = network(images, training=False)
        return {"embeddings": tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)}

    signature = tf.TensorSpec([None, *input_shape[1:]], tf.float32, name="images")
    archive.add_endpoint("serving_default", serve, input_signature=[signature])
    archive.write_out(path, verbose=False)
    logger.info("Exported the embedding network to %s", path)
    return path
