"""Keras callbacks that measure retrieval while a model trains."""

import logging

import keras
import numpy as np

from keras_xbm.retrieval.protocols import evaluate_retrieval

logger = logging.getLogger(__name__)


class RetrievalEvaluation(keras.callbacks.Callback):
    """Evaluate Recall@K on a validation set every `every_n_epochs` epochs and add it to the logs.

    The values go into the epoch logs as `val_recall@K`, so callbacks placed
    after this one in the list (`ReduceLROnPlateau`, `EarlyStopping`,
    `ModelCheckpoint`) can monitor them, with `mode="max"`.

    Args:
        queries: images (array or `tf.data.Dataset` of image batches) to embed
            with `model.predict`.
        query_labels: `[num_queries]` labels.
        gallery: optional gallery images; without one, every query searches
            all the other queries (leave-one-out).
        gallery_labels: `[num_gallery]` labels, with `gallery`.
        ks: the K values. Defaults to `(1, 2, 4, 8)`.
        every_n_epochs: evaluation period in epochs. Defaults to 1.
        index: `"exact"` or `"scann"`. Defaults to `"exact"`.
        prefix: prefix of the log keys. Defaults to `"val_"`.
        batch_size: batch size of `predict` for array inputs. Defaults to 256.
    """

    def __init__(self, queries, query_labels, gallery=None, gallery_labels=None, ks=(1, 2, 4, 8), every_n_epochs=1, index="exact", prefix="val_", batch_size=256):
        super().__init__()
        if (gallery is None) != (gallery_labels is None):
            raise ValueError("Pass gallery and gallery_labels together, or neither.")
        if every_n_epochs < 1:
            raise ValueError(f"Invalid every_n_epochs={every_n_epochs!r}: expected a positive integer.")
        self.queries = queries
        self.query_labels = np.asarray(query_labels)
        self.gallery = gallery
        self.gallery_labels = None if gallery_labels is None else np.asarray(gallery_labels)
        self.ks = tuple(ks)
        self.every_n_epochs = every_n_epochs
        self.index = index
        self.prefix = prefix
        self.batch_size = batch_size

    def embed(self, images):
        return np.asarray(self.model.predict(images, batch_size=self.batch_size, verbose=0), np.float32)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        gallery = None if self.gallery is None else self.embed(self.gallery)
        results = evaluate_retrieval(
            self.embed(self.queries), self.query_labels, gallery, self.gallery_labels, ks=self.ks, index=self.index
        )
        summary = ", ".join(f"{key} {value:.4f}" for key, value in results.items())
        logger.info("Epoch %d retrieval: %s", epoch + 1, summary)
        if logs is not None:
            logs.update({self.prefix + key: value for key, value in results.items()})
