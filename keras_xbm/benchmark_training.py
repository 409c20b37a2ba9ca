"""The training job of the image-file benchmarks: `keras-xbm train --dataset sop|inshop|vehicleid|cub|cars|folder`.

One call reads the benchmark, checks that every image decodes and trains
with P x K batches from the image pipeline. It lowers the learning rate when
the validation Recall@1 stops improving, then evaluates the test protocol the
reader hands over (leave-one-out, or query against gallery for In-Shop) and
writes the same files as the Omniglot job.
"""

import logging
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_xbm.callbacks import RetrievalEvaluation
from keras_xbm.data.benchmarks import load_benchmark
from keras_xbm.data.images import check_images, eval_dataset, train_dataset
from keras_xbm.retrieval.protocols import evaluate_retrieval
from keras_xbm.training import build_distributed_model, save_run, shard_by_data

logger = logging.getLogger(__name__)


class StopAfterSteps(keras.callbacks.Callback):
    """Stop `fit` after `steps` training steps, even in the middle of an epoch (the epoch still ends normally)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.steps:
            self.model.stop_training = True


def usable_ks(ks, available):
    """Split `ks` into the K values that `available` references per query allow and those that are dropped.

    Raises:
        ValueError: when no K is left (no reference, or every K too large).
    """
    kept = tuple(k for k in ks if k <= available)
    dropped = tuple(k for k in ks if k > available)
    if not kept:
        raise ValueError(
            f"Each query has {available} reference(s) to search, fewer than every K of {list(ks)}: "
            "expected a larger evaluation split or smaller K values (--recall-k)."
        )
    return kept, dropped


def hold_out_classes(split, fraction, min_train_classes, seed):
    """Move a random `fraction` of the classes of `split` (at least two) into a validation split.

    Returns:
        `(train, validation)`; `validation` is `None` when `fraction` is 0.

    Raises:
        ValueError: when fewer than `min_train_classes` classes would be left
            to train.
    """
    if not fraction:
        return split, None
    count = max(2, int(round(fraction * split.num_classes)))
    if split.num_classes - count < min_train_classes:
        raise ValueError(
            f"validation_fraction={fraction} holds out {count} of the {split.num_classes} train classes, "
            f"leaving fewer than the {min_train_classes} classes a batch needs: lower validation_fraction or the batch size."
        )
    held_out = np.random.default_rng(seed).choice(split.num_classes, count, replace=False)
    is_validation = np.isin(split.labels, held_out)
    return split.subset(np.flatnonzero(~is_validation)), split.subset(np.flatnonzero(is_validation))


def embed_files(model, paths, config):
    """Return the L2-normalised embeddings of the image files `paths` under the eval transform."""
    dataset = eval_dataset(paths, config.image_size, config.resize_size, config.eval_batch_size)
    return np.asarray(model.predict(dataset, verbose=0), np.float32)


def describe_evaluation(benchmark):
    """Return a one-line description of the test protocol, e.g. "106 unseen classes, 2120 images, leave-one-out"."""
    if benchmark.gallery is None:
        return f"{benchmark.query.num_classes} unseen classes, {len(benchmark.query)} images, leave-one-out"
    items = len(set(benchmark.query.labels.tolist()) | set(benchmark.gallery.labels.tolist()))
    return f"{len(benchmark.query)} queries against {len(benchmark.gallery)} gallery images of {items} unseen items"


def build_callbacks(config, validation, ks):
    """Return the callbacks of `fit`: validation Recall@K and the plateau schedule when there is a validation split."""
    callbacks = []
    if validation is not None:
        validation_ks, _ = usable_ks(tuple(sorted(set(ks) | {1})), len(validation) - 1)
        queries = eval_dataset(validation.paths, config.image_size, config.resize_size, config.eval_batch_size)
        callbacks.append(
            RetrievalEvaluation(queries, validation.labels, ks=validation_ks, index=config.index, batch_size=config.eval_batch_size)
        )
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_recall@1", mode="max", factor=config.lr_factor, patience=config.lr_patience, verbose=config.verbose
            )
        )
    callbacks.append(StopAfterSteps(config.steps))
    return callbacks


def run_benchmark_training(config, strategy=None):
    """Train on an image-file benchmark, evaluate its test protocol and export; return the results dictionary.

    Validation: with `config.validation_fraction > 0`, that share of the
    train classes is held out, Recall@K on it goes into the logs every
    `config.validation_every` steps as `val_recall@K`, and the learning rate
    is multiplied by `config.lr_factor` after `config.lr_patience`
    validations without a better `val_recall@1`. With 0, the learning rate
    stays constant.

    Writes `metrics.json`, `history.json` and `xbm.weights.h5` to
    `config.output_dir` and the SavedModel to the next version folder of
    `config.export_dir`; under a multi-worker `strategy` only the chief
    writes them. K values larger than the references each query has
    are dropped from the test metrics and listed under `dropped_ks`.

    Raises:
        FileNotFoundError: for a missing list file, folder or image.
        ValueError: for a malformed list, an unreadable image (all named
            before the first step) or settings the data cannot satisfy.
    """
    keras.utils.set_random_seed(config.seed)
    benchmark = load_benchmark(config.dataset, config.data_dir, test_list=config.test_list, from_tfds=config.from_tfds)
    ks = tuple(config.recall_ks or benchmark.ks)
    available = len(benchmark.query) - 1 if benchmark.gallery is None else len(benchmark.gallery)
    test_ks, dropped_ks = usable_ks(ks, available)
    train, validation = hold_out_classes(benchmark.train, config.validation_fraction, config.classes_per_batch, config.seed)
    if config.verify_images:
        check_images(benchmark.train.paths + benchmark.evaluation_paths())
    os.makedirs(config.output_dir, exist_ok=True)

    dataset = train_dataset(
        train, config.classes_per_batch, config.samples_per_class, crop_size=config.image_size,
        seed=config.seed, allow_repeats=config.allow_repeats,
    )
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1:
        dataset = shard_by_data(dataset)
    model = build_distributed_model(
        config, (config.image_size, config.image_size, 3), strategy, num_train_samples=len(train)
    )
    every = min(config.validation_every, config.steps)
    callbacks = build_callbacks(config, validation, ks)

    start = time.perf_counter()
    history = model.fit(
        dataset, steps_per_epoch=every, epochs=math.ceil(config.steps / every), callbacks=callbacks,
        shuffle=False, verbose=config.verbose,
    )
    train_seconds = time.perf_counter() - start

    query_embeddings = embed_files(model, benchmark.query.paths, config)
    gallery_embeddings = None if benchmark.gallery is None else embed_files(model, benchmark.gallery.paths, config)
    gallery_labels = None if benchmark.gallery is None else benchmark.gallery.labels
    if dropped_ks:
        logger.warning(
            "Recall@K for K = %s dropped: each query has only %d reference(s)",
            ", ".join(str(k) for k in dropped_ks), available,
        )
    recalls = evaluate_retrieval(
        query_embeddings, benchmark.query.labels, gallery_embeddings, gallery_labels, ks=test_ks, index=config.index
    )

    results = dict(recalls)
    results.update(
        dropped_ks=list(dropped_ks),
        protocol=benchmark.protocol,
        evaluation=describe_evaluation(benchmark),
        evaluation_split=benchmark.description,
        train_seconds=train_seconds,
        step_ms=1000.0 * train_seconds / config.steps,
        train_images=len(train),
        train_classes=train.num_classes,
        validation_images=0 if validation is None else len(validation),
        test_images=len(benchmark.evaluation_paths()),
        test_classes=benchmark.query.num_classes,
        replicas=strategy.num_replicas_in_sync,
    )
    return save_run(model, history, results, config, strategy)
