"""Keras callbacks that measure retrieval while a model trains."""

import logging

import keras
import numpy as np

from keras_xbm.retrieval.protocols import evaluate_retrieval

logger = logging.getLogger(__name__)

# Result keys that go into the training logs; the counts of queries stay out.
LOGGED_KEYS = ("recall@", "map@r", "r_precision")


class RetrievalEvaluation(keras.callbacks.Callback):
    """Evaluate retrieval on a validation set every N epochs or every N steps and add it to the logs.

    The values go into the logs as `val_recall@K`, `val_map@r` and
    `val_r_precision`, so callbacks placed after this one in the list
    (`ReduceLROnPlateau`, `EarlyStopping`, `ModelCheckpoint`) can monitor
    them, with `mode="max"`.

    With `every_n_steps`, the evaluation runs after every N-th optimizer step
    and its values go into that batch's logs. The epoch logs then carry the
    values of the latest evaluation, because the Keras callbacks that monitor
    a metric read the epoch logs; an epoch that ends before the first
    evaluation gets no values. `results_by_step` keeps every evaluation.

    Args:
        queries: images (array or `tf.data.Dataset` of image batches) to embed
            with `model.predict`.
        query_labels: `[num_queries]` labels.
        gallery: optional gallery images; without one, every query searches
            all the other queries (leave-one-out).
        gallery_labels: `[num_gallery]` labels, with `gallery`.
        ks: the K values. Defaults to `(1, 2, 4, 8)`.
        every_n_epochs: evaluation period in epochs. Defaults to 1. Ignored
            when `every_n_steps` is set.
        index: `"exact"` or `"scann"`. Defaults to `"exact"`.
        prefix: prefix of the log keys. Defaults to `"val_"`.
        batch_size: batch size of `predict` for array inputs. Defaults to 256.
        every_n_steps: evaluation period in optimizer steps, or `None` to
            evaluate by epochs. Defaults to `None`.
        normalize: L2-normalise the embeddings before searching, for models
            whose output is not unit length. Defaults to False.
    """

    def __init__(self, queries, query_labels, gallery=None, gallery_labels=None, ks=(1, 2, 4, 8), every_n_epochs=1, index="exact", prefix="val_", batch_size=256, every_n_steps=None, normalize=False):
        super().__init__()
        if (gallery is None) != (gallery_labels is None):
            raise ValueError("Pass gallery and gallery_labels together, or neither.")
        if every_n_epochs < 1:
            raise ValueError(f"Invalid every_n_epochs={every_n_epochs!r}: expected a positive integer.")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"Invalid every_n_steps={every_n_steps!r}: expected a positive integer or None.")
        self.queries = queries
        self.query_labels = np.asarray(query_labels)
        self.gallery = gallery
        self.gallery_labels = None if gallery_labels is None else np.asarray(gallery_labels)
        self.ks = tuple(ks)
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.index = index
        self.prefix = prefix
        self.batch_size = batch_size
        self.normalize = normalize
        self.latest_logs = {}
        self.results_by_step = {}
        self.evaluated_step = 0

    def embed(self, images):
        return np.asarray(self.model.predict(images, batch_size=self.batch_size, verbose=0), np.float32)

    def evaluate(self):
        """Embed the validation images, evaluate retrieval and return the log entries."""
        gallery = None if self.gallery is None else self.embed(self.gallery)
        results = evaluate_retrieval(
            self.embed(self.queries), self.query_labels, gallery, self.gallery_labels,
            ks=self.ks, index=self.index, normalize=self.normalize,
        )
        return {self.prefix + key: value for key, value in results.items() if key.startswith(LOGGED_KEYS)}

    def on_train_begin(self, logs=None):
        # A resumed run counts its period from the step it resumes at.
        if self.every_n_steps is not None:
            self.evaluated_step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_steps is None:
            return
        # The optimizer's step counter stays right with steps_per_execution > 1.
        step = int(self.model.optimizer.iterations.numpy())
        if step // self.every_n_steps <= self.evaluated_step // self.every_n_steps:
            return
        self.evaluated_step = step
        self.latest_logs = self.evaluate()
        self.results_by_step[step] = dict(self.latest_logs)
        logger.info("Step %d retrieval: %s", step, ", ".join(f"{key} {value:.4f}" for key, value in self.latest_logs.items()))
        if logs is not None:
            logs.update(self.latest_logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_steps is None:
            if (epoch + 1) % self.every_n_epochs:
                return
            self.latest_logs = self.evaluate()
            logger.info("Epoch %d retrieval: %s", epoch + 1, ", ".join(f"{key} {value:.4f}" for key, value in self.latest_logs.items()))
        if logs is not None:
            logs.update(self.latest_logs)
