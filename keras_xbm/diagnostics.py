"""Diagnostics of what the memory holds: memory drift and pair statistics, as Keras callbacks.

- `MemoryDrift` re-embeds, every N steps, a sample of the images whose
  embeddings sit in the memory and measures the cosine similarity between the
  stored and the fresh embeddings, by age of the entry. A cross-batch memory
  is sound while that similarity stays close to 1 for the oldest entries (the
  "slow drift" of Wang et al., "Cross-Batch Memory for Embedding Learning",
  CVPR 2020).
- `PairStatistics` reports, per step, the number of positive pairs and of
  active hard negatives per query and the mean similarity of each, from the
  batch and from the memory, into the history and TensorBoard.
"""

import logging

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

PAIR_STATISTICS = ("positives", "positive_similarity", "hard_negatives", "hard_negative_similarity")


def pair_statistics(similarities, positive_masks, negative_masks, similarity_gradients):
    """Summarise the pairs of one train step, per reference set.

    A negative pair is an active hard negative when the loss sends a gradient
    through it (`dL/dS != 0`), whatever the loss. During warm-up the memory
    term has no gradient, so the memory reports no hard negatives then.

    Args:
        similarities: list of float32 `[num_queries, num_references]`
            matrices: the batch against itself, then optionally the memory.
        positive_masks: list of bool masks, one per matrix.
        negative_masks: list of bool masks, one per matrix.
        similarity_gradients: list of `dL/dS`, one per matrix.

    Returns:
        A dict of float32 scalars with keys `"{source}_{statistic}"`, source
        `batch` then `memory`, statistic one of `positives` and
        `hard_negatives` (pairs per query) and `positive_similarity` and
        `hard_negative_similarity` (mean over those pairs, NaN when there is
        none).
    """
    statistics = {}
    for source, similarity, pos_mask, neg_mask, gradient in zip(
        ("batch", "memory"), similarities, positive_masks, negative_masks, similarity_gradients
    ):
        num_queries = tf.cast(tf.shape(similarity)[0], tf.float32)
        hard_mask = tf.logical_and(neg_mask, tf.not_equal(gradient, 0.0))
        for name, mask in (("positive", pos_mask), ("hard_negative", hard_mask)):
            count = tf.reduce_sum(tf.cast(mask, tf.float32))
            total = tf.reduce_sum(tf.where(mask, similarity, tf.zeros_like(similarity)))
            statistics[f"{source}_{name}s"] = count / num_queries
            statistics[f"{source}_{name}_similarity"] = tf.where(
                count > 0, total / tf.maximum(count, 1.0), tf.constant(np.nan, tf.float32)
            )
    return statistics


class PairStatistics(keras.callbacks.Callback):
    """Record per-step pair statistics of an `XBMModel` into the history and TensorBoard.

    The callback switches on `XBMModel.report_pair_statistics` (the train step
    is traced again) and collects, at every step, the values of
    `pair_statistics`: `batch_positives`, `batch_positive_similarity`,
    `batch_hard_negatives`, `batch_hard_negative_similarity` and the same four
    with the `memory_` prefix (when the model has a memory).

    - `self.history` maps each key to its list of per-step values.
    - At the end of each epoch, the epoch logs (and so `fit`'s `History`) get
      each key's mean over the epoch's steps, NaN values skipped.
    - With `log_dir`, each value is written per step as a TensorBoard scalar
      `pair_statistics/<key>`, at the step index counted from the start of
      training.

    Args:
        log_dir: TensorBoard folder, or `None` to skip TensorBoard. Defaults to
            `None`.
    """

    def __init__(self, log_dir=None):
        super().__init__()
        self.log_dir = log_dir
        self.history = {}
        self.step = 0
        self.writer = None
        self.epoch_values = {}

    def set_model(self, model):
        super().set_model(model)
        if not hasattr(model, "report_pair_statistics"):
            raise ValueError(f"PairStatistics needs a keras_xbm.XBMModel, received {type(model).__name__}.")
        if not model.report_pair_statistics:
            model.report_pair_statistics = True
            # The step is traced again with the statistics in its outputs.
            model.train_function = None

    def on_train_begin(self, logs=None):
        if self.log_dir is not None:
            self.writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_values = {}

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        values = {key: float(value) for key, value in logs.items() if key.startswith(("batch_", "memory_"))}
        values = {key: value for key, value in values.items() if key.split("_", 1)[1] in PAIR_STATISTICS}
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
            self.epoch_values.setdefault(key, []).append(value)
        if self.writer is not None:
            with self.writer.as_default(step=self.step):
                for key, value in values.items():
                    tf.summary.scalar(f"pair_statistics/{key}", value)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for key, values in self.epoch_values.items():
            finite = [value for value in values if not np.isnan(value)]
            logs[key] = float(np.mean(finite)) if finite else float("nan")

    def on_train_end(self, logs=None):
        self.model.report_pair_statistics = False
        self.model.train_function = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def memory_entries(model, rows_per_step=None):
    """Return the stored rows of an `XBMModel`'s memory with their sample ids and ages.

    Args:
        model: an `XBMModel` with a memory.
        rows_per_step: rows the ring buffer receives per step (the global batch
            size); needed to turn a ring buffer's write order into ages in
            steps. Ignored for the momentum bank, which records its writes.

    Returns:
        `(embeddings, sample_ids, ages)` as numpy arrays over the valid
        entries: float32 `[n, dim]`, int `[n]`, int `[n]` (steps since the
        entry was written, 0 for the last step's batch).
    """
    memory = model.memory
    if memory is None:
        raise ValueError("The model has no memory (memory_size=0): there is no drift to measure.")
    embeddings = memory.embeddings.numpy()
    sample_ids = np.asarray(memory.sample_ids)
    valid = np.asarray(memory.valid_mask())

    if hasattr(memory, "entry_ages"):
        ages = np.asarray(memory.entry_ages())
    else:
        if rows_per_step is None:
            raise ValueError("rows_per_step is needed to date the entries of a ring-buffer memory.")
        # The ring buffer writes slots in order: the slot before the pointer is the newest row.
        pointer = int(memory.pointer.numpy())
        rows_ago = (pointer - 1 - np.arange(memory.memory_size)) % memory.memory_size
        ages = rows_ago // rows_per_step
    return embeddings[valid], sample_ids[valid], ages[valid]


class MemoryDrift(keras.callbacks.Callback):
    """Measure how far the memory's stored embeddings are from the network's current ones.

    Every `every_n_steps` steps the callback draws up to `sample_size` valid
    memory entries whose sample id indexes `images`. It embeds those images
    with the model being trained (the online network, which computes the
    queries) and computes the cosine similarity between each stored row and
    its fresh embedding. Entries are grouped by age in bins of
    `age_bin_steps` steps. Each measurement is appended to `self.records` as a
    dict with keys `step`, `ages` (first age of each bin), `similarity` (the
    mean of each bin), `counts` (entries per bin) and `mean_similarity` (over
    all sampled entries), and logged. With `plot_path`, the curves are drawn
    as a PNG at the end of training.

    Stored rows of the plain memory are the queries of earlier steps, so their
    similarity to fresh embeddings measures the drift of the network; with a
    momentum encoder the stored rows come from the averaged network, so the
    similarity also shows its lag behind the online one.

    Stored rows were embedded in training mode, with the batch statistics of
    their batch. With `training=True` (the default) the sampled entries are
    re-embedded in training mode, one batch per age, so a ring buffer's
    entries of one age, all sampled, are re-embedded with exactly the batch
    they were written with. The network's batch normalisation statistics are
    restored afterwards. With `training=False` fresh embeddings use the
    moving statistics, and the gap between the two modes adds to the drift.

    NOTE: a momentum bank's entries of one age are the part of their batch
    not rewritten since, so their fresh batch statistics are approximate.

    Args:
        images: array `[num_samples, ...]`, the training images indexed by
            sample id (the row order `keras_xbm.data.pk_dataset` was given).
        every_n_steps: measurement period in steps. Defaults to 100.
        sample_size: entries re-embedded per measurement. Defaults to 256.
        age_bin_steps: width of the age bins, in steps. Defaults to 1.
        rows_per_step: rows written to a ring-buffer memory per step. Defaults
            to `None`: read from the memory's write pointer over the first
            step.
        training: the mode of the fresh embeddings (see above). Defaults to
            `True`.
        plot_path: PNG file for the drift curves, or `None`. Defaults to
            `None`.
        batch_size: images embedded per call. Defaults to 256.
        seed: seed of the entry sampling. Defaults to 0.
    """

    def __init__(
        self,
        images,
        every_n_steps=100,
        sample_size=256,
        age_bin_steps=1,
        rows_per_step=None,
        training=True,
        plot_path=None,
        batch_size=256,
        seed=0,
    ):
        super().__init__()
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("sample_size", sample_size),
            ("age_bin_steps", age_bin_steps),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: expected a positive integer.")
        if rows_per_step is not None and (not isinstance(rows_per_step, int) or rows_per_step < 1):
            raise ValueError(f"Invalid rows_per_step={rows_per_step!r}: expected a positive integer or None.")
        self.images = images
        self.every_n_steps = every_n_steps
        self.sample_size = sample_size
        self.age_bin_steps = age_bin_steps
        self.rows_per_step = rows_per_step
        self.training = training
        self.plot_path = plot_path
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.records = []
        self.step = 0
        self.start_pointer = None

    def on_train_begin(self, logs=None):
        if self.model.memory is None:
            raise ValueError("MemoryDrift needs a model with a memory; this one has memory_size=0.")
        if self.rows_per_step is None and hasattr(self.model.memory, "pointer"):
            self.start_pointer = int(self.model.memory.pointer.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.rows_per_step is None and self.start_pointer is not None:
            memory_size = self.model.memory.memory_size
            rows = (int(self.model.memory.pointer.numpy()) - self.start_pointer) % memory_size
            self.rows_per_step = rows or memory_size
        if self.step % self.every_n_steps == 0:
            record = self.measure()
            if record is not None and logs is not None:
                logs["memory_drift"] = record["mean_similarity"]

    def on_train_end(self, logs=None):
        if self.plot_path and self.records:
            plot_memory_drift(drift_curves(self.records), self.plot_path)
            logger.info("Memory drift plot written to %s", self.plot_path)

    def embed(self, images, ages):
        """Embed `images` with the online network; in training mode one batch per age."""
        if not self.training:
            parts = [
                np.asarray(self.model(images[start : start + self.batch_size], training=False), np.float32)
                for start in range(0, len(images), self.batch_size)
            ]
            return np.concatenate(parts)

        network = self.model.embedding_model
        saved_state = [variable.numpy() for variable in network.non_trainable_variables]
        fresh = None
        for age in np.unique(ages):
            rows = np.flatnonzero(ages == age)
            embeddings = np.asarray(self.model(images[rows], training=True), np.float32)
            if fresh is None:
                fresh = np.zeros((len(images), embeddings.shape[1]), np.float32)
            fresh[rows] = embeddings
        for variable, value in zip(network.non_trainable_variables, saved_state):
            variable.assign(value)
        return fresh

    def measure(self):
        """Measure the drift now, append the record to `self.records` and return it (`None` if nothing to measure)."""
        stored, sample_ids, ages = memory_entries(self.model, self.rows_per_step)
        # Generated ids (negative) and ids beyond `images` have no image to re-embed.
        usable = np.flatnonzero((sample_ids >= 0) & (sample_ids < len(self.images)))
        if usable.size == 0:
            logger.warning("Memory drift at step %d: no stored entry has an image to re-embed.", self.step)
            return None
        if usable.size > self.sample_size:
            usable = np.sort(self.rng.choice(usable, self.sample_size, replace=False))

        fresh = self.embed(np.asarray(self.images)[sample_ids[usable]], ages[usable])
        stored = stored[usable]
        similarity = np.sum(stored * fresh, axis=1) / (
            np.linalg.norm(stored, axis=1) * np.linalg.norm(fresh, axis=1)
        )
        bins = ages[usable] // self.age_bin_steps
        bin_ids = np.unique(bins)
        record = {
            "step": self.step,
            "ages": [int(b * self.age_bin_steps) for b in bin_ids],
            "similarity": [float(similarity[bins == b].mean()) for b in bin_ids],
            "counts": [int(np.sum(bins == b)) for b in bin_ids],
            "mean_similarity": float(similarity.mean()),
        }
        self.records.append(record)
        logger.info(
            "Memory drift at step %d: mean cosine similarity %.4f over %d entries aged %d to %d steps",
            self.step, record["mean_similarity"], usable.size, ages[usable].min(), ages[usable].max(),
        )
        return record


def drift_curves(records, max_curves=8):
    """Return `{"step N": (ages, similarity)}` for up to `max_curves` evenly spaced drift records."""
    if len(records) > max_curves:
        positions = np.unique(np.linspace(0, len(records) - 1, max_curves).round().astype(int))
        records = [records[i] for i in positions]
    return {f"step {record['step']}": (record["ages"], record["similarity"]) for record in records}


def plot_memory_drift(curves, path, title="Memory drift: stored vs fresh embeddings"):
    """Draw mean cosine similarity against entry age, one line per curve, as a PNG.

    Args:
        curves: dict from a label to `(ages, similarity)` sequences.
        path: output PNG file.
        title: figure title.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(curves), 1)))
    for color, (label, (ages, similarity)) in zip(colors, curves.items()):
        axes.plot(ages, similarity, marker="o", markersize=3, color=color, label=label)
    axes.set_xlabel("age of the memory entry (training steps since it was written)")
    axes.set_ylabel("mean cosine similarity, stored vs fresh")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
