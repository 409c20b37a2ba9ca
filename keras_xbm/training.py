"""The training job behind `keras-xbm train`: data, model, fit, evaluation and export in one call."""

import dataclasses
import json
import logging
import os
import time

import keras
import numpy as np

from keras_xbm import backbones
from keras_xbm.data import load_omniglot, pk_dataset
from keras_xbm.export import export_saved_model
from keras_xbm.losses import NORMALIZATIONS, ContrastiveLoss
from keras_xbm.models import XBMModel
from keras_xbm.momentum import MEMORY_TYPES, resolve_momentum
from keras_xbm.retrieval.protocols import SEARCHES, leave_one_out_recall

logger = logging.getLogger(__name__)

DATASETS = ("omniglot",)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; the CLI flags map one to one onto these fields.

    The defaults are the Omniglot recipe: 3,000 steps of batch 16 (4 classes x
    4 images), a memory of 2,048 slots switched on after 500 steps, Adam at
    3e-4 and the "pairs" normalisation, finishing in a few minutes on 2 CPU
    cores. docs/normalization.md has the measurements behind these values.
    """

    dataset: str = "omniglot"
    data_dir: str = ""
    output_dir: str = "runs/omniglot"
    export_dir: str = "saved_models/omniglot"
    steps: int = 3000
    batch_size: int = 16
    samples_per_class: int = 4
    memory_size: int = 2048
    warmup_steps: int = 500
    memory_weight: float = 1.0
    # "fifo", "momentum-encoder" or "momentum-bank"; momentum None takes the form's default.
    memory: str = "fifo"
    momentum: float = None
    learning_rate: float = 3e-4
    negative_threshold: float = 0.5
    normalization: str = "pairs"
    embedding_dim: int = 128
    image_size: int = 32
    seed: int = 0
    recall_ks: tuple = (1, 2, 4, 8)
    index: str = "exact"
    jit_compile: bool = True
    export: bool = True
    verbose: int = 1

    def validate(self):
        """Raise `ValueError` naming the first setting that cannot work."""
        if self.dataset not in DATASETS:
            raise ValueError(f"Unknown dataset={self.dataset!r}: expected one of {', '.join(DATASETS)}.")
        if not self.data_dir:
            raise ValueError("Missing data_dir: pass the directory that holds the dataset (--data-dir).")
        positive = ("steps", "batch_size", "samples_per_class", "embedding_dim", "image_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: expected a positive integer.")
        for name in ("memory_size", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {name}={value!r}: expected a non-negative integer.")
        if self.batch_size % self.samples_per_class:
            raise ValueError(
                f"batch_size={self.batch_size} is not a multiple of samples_per_class={self.samples_per_class}: "
                "a batch holds P classes of K images each."
            )
        if 0 < self.memory_size < self.batch_size:
            raise ValueError(
                f"memory_size={self.memory_size} is smaller than batch_size={self.batch_size}: "
                "expected a memory of at least one batch, or 0 to train without a memory."
            )
        if not self.learning_rate > 0:
            raise ValueError(f"Invalid learning_rate={self.learning_rate!r}: expected a positive number.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Unknown normalization={self.normalization!r}: expected one of {', '.join(NORMALIZATIONS)}."
            )
        if self.index not in SEARCHES:
            raise ValueError(f"Unknown index={self.index!r}: expected one of {', '.join(SEARCHES)}.")
        self.validate_memory()

    def validate_memory(self):
        if self.memory not in MEMORY_TYPES:
            raise ValueError(f"Unknown memory={self.memory!r}: expected one of {', '.join(MEMORY_TYPES)}.")
        resolve_momentum(self.memory, self.momentum)
        if self.memory != "fifo" and self.memory_size == 0:
            raise ValueError(
                f"memory={self.memory!r} needs a memory, but memory_size is 0 (--no-memory): drop one of the two."
            )

    @property
    def classes_per_batch(self):
        return self.batch_size // self.samples_per_class


def build_model(config, input_shape, num_train_samples=None):
    """Build and compile the `XBMModel` of a run.

    With `config.memory == "momentum-bank"` the bank gets one slot per
    training sample, `num_train_samples`, and `config.memory_size` is unused.
    """
    memory_size = config.memory_size
    if config.memory == "momentum-bank":
        if num_train_samples is None:
            raise ValueError("memory='momentum-bank' needs num_train_samples, the size of the training set.")
        memory_size = int(num_train_samples)
    network = backbones.small_cnn(input_shape=input_shape, embedding_dim=config.embedding_dim)
    loss = ContrastiveLoss(negative_threshold=config.negative_threshold, normalization=config.normalization)
    model = XBMModel(
        network,
        memory_size=memory_size,
        loss=loss,
        warmup_steps=config.warmup_steps,
        memory_weight=config.memory_weight,
        memory_type=config.memory,
        momentum=config.momentum,
    )
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=config.jit_compile)
    return model


def embed(model, images, batch_size=256):
    """Return the L2-normalised embeddings of `images` as a float32 array."""
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), np.float32)


def run_training(config, callbacks=None):
    """Train, evaluate on the test split and export; return the results dictionary.

    Writes to `config.output_dir`: `metrics.json` (recall@K on the test split,
    with the run's settings and timings), `history.json` (the training
    metrics) and `xbm.weights.h5` (network and memory, for `load_weights`).
    The SavedModel goes to the next version folder of `config.export_dir`.
    `callbacks` (a list of Keras callbacks) are passed to `fit`.
    """
    config.validate()
    keras.utils.set_random_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)

    train, test = load_omniglot(config.data_dir, image_size=config.image_size)
    logger.info(
        "Omniglot: %d train images of %d classes, %d test images of %d classes",
        len(train), train.num_classes, len(test), test.num_classes,
    )
    dataset = pk_dataset(
        train.images, train.labels, config.classes_per_batch, config.samples_per_class, seed=config.seed
    )
    model = build_model(config, train.images.shape[1:], num_train_samples=len(train))

    start = time.perf_counter()
    history = model.fit(dataset, steps_per_epoch=config.steps, epochs=1, verbose=config.verbose, callbacks=callbacks)
    train_seconds = time.perf_counter() - start

    embeddings = embed(model, test.images)
    recalls = leave_one_out_recall(embeddings, test.labels, ks=config.recall_ks, index=config.index)

    results = dict(recalls)
    results.update(
        train_seconds=train_seconds,
        step_ms=1000.0 * train_seconds / config.steps,
        test_images=len(test),
        test_classes=test.num_classes,
        config={key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()},
    )
    # The momentum default and the bank size are resolved in build_model; record what ran.
    results.update(memory=config.memory, momentum=model.momentum, memory_slots=model.memory_size)
    model.save_weights(os.path.join(config.output_dir, "xbm.weights.h5"))
    with open(os.path.join(config.output_dir, "history.json"), "w") as handle:
        json.dump({key: [float(v) for v in values] for key, values in history.history.items()}, handle, indent=2)
    if config.export:
        results["export_path"] = export_saved_model(model.embedding_model, config.export_dir)
    with open(os.path.join(config.output_dir, "metrics.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return results
