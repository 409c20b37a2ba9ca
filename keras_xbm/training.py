"""The training job behind `keras-xbm train`: data, model, fit, evaluation and export in one call."""

import dataclasses
import json
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_xbm import backbones
from keras_xbm.data import load_omniglot, pk_dataset
from keras_xbm.data.images import default_resize_size
from keras_xbm.distributed import STRATEGIES, check_global_batch, is_chief, make_strategy, synchronize_batch_norm
from keras_xbm.export import export_saved_model
from keras_xbm.losses import NORMALIZATIONS, build_loss
from keras_xbm.models import XBMModel
from keras_xbm.momentum import MEMORY_TYPES, resolve_momentum
from keras_xbm.retrieval.protocols import SEARCHES, evaluate_retrieval

logger = logging.getLogger(__name__)

DATASETS = ("omniglot", "sop", "inshop", "vehicleid", "cub", "cars", "folder")
WEIGHT_DECAY_MODES = ("l2", "decoupled")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run: one field per CLI flag and per key of a `--config` file.

    The defaults are the Omniglot recipe: 3,000 steps of batch 16 (4 classes x
    4 images), a memory of 2,048 slots switched on after 500 steps, Adam at
    3e-4 and the "pairs" normalisation, finishing in a few minutes on 2 CPU
    cores. docs/normalization.md has the measurements behind these values.
    `configs/*.yaml` hold the XBM recipe of the image benchmarks.

    Fields left at `None` depend on the dataset: `output_dir` is
    `runs/<dataset>`, `export_dir` `saved_models/<dataset>`, `image_size` 32
    for Omniglot and 224 otherwise, `resize_size` 256/224 of `image_size`,
    `backbone` `small_cnn` for Omniglot and `resnet50` otherwise, and
    `recall_ks` the benchmark's usual K values.

    Weight decay: with `weight_decay_mode="l2"` the term
    `weight_decay / 2 * sum(w ** 2)` over every trainable weight joins the
    loss, so Adam receives the gradient `g + weight_decay * w`, which is what
    PyTorch's `Adam(weight_decay=...)` of the published recipe does.
    `"decoupled"` passes `weight_decay` to Keras' `Adam`, which shrinks the
    weights by `learning_rate * weight_decay * w` after each step (AdamW).
    """

    dataset: str = "omniglot"
    data_dir: str = ""
    output_dir: str = None
    export_dir: str = None
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
    # A name of keras_xbm.losses.NAMED_LOSSES or "POSITIVE/NEGATIVE" weight curves.
    loss: str = "contrastive"
    negative_threshold: float = 0.5
    normalization: str = "pairs"
    embedding_dim: int = 128
    image_size: int = None
    seed: int = 0
    recall_ks: tuple = None
    index: str = "exact"
    jit_compile: bool = True
    export: bool = True
    verbose: int = 1
    # Image-file benchmarks (every dataset but Omniglot).
    backbone: str = None
    pooling: str = "max"
    freeze_batch_norm: bool = False
    weights: str = None
    resize_size: int = None
    test_list: int = 800
    from_tfds: bool = False
    weight_decay: float = 0.0
    weight_decay_mode: str = "l2"
    allow_repeats: bool = False
    validation_fraction: float = 0.0
    validation_every: int = 1000
    lr_patience: int = 3
    lr_factor: float = 0.1
    verify_images: bool = True
    eval_batch_size: int = 64

    def __post_init__(self):
        omniglot = self.dataset == "omniglot"
        if self.output_dir is None:
            self.output_dir = f"runs/{self.dataset}"
        if self.export_dir is None:
            self.export_dir = f"saved_models/{self.dataset}"
        if self.image_size is None:
            self.image_size = 32 if omniglot else 224
        if self.backbone is None:
            self.backbone = "small_cnn" if omniglot else "resnet50"
        if self.recall_ks is None and omniglot:
            self.recall_ks = (1, 2, 4, 8)
        if self.recall_ks is not None:
            self.recall_ks = tuple(self.recall_ks)
        if self.resize_size is None and isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            self.resize_size = default_resize_size(self.image_size)
    strategy: str = "default"
    devices: int = 0

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
        # Building the loss checks its name, curves and parameters before any training.
        build_loss(self.loss, self.negative_threshold, self.normalization)
        if self.index not in SEARCHES:
            raise ValueError(f"Unknown index={self.index!r}: expected one of {', '.join(SEARCHES)}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy={self.strategy!r}: expected one of {', '.join(STRATEGIES)}.")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 0:
            raise ValueError(f"Invalid devices={self.devices!r}: expected a non-negative integer (0 for the default).")
        self.validate_image_settings()
        self.validate_memory()

    def validate_memory(self):
        if self.memory not in MEMORY_TYPES:
            raise ValueError(f"Unknown memory={self.memory!r}: expected one of {', '.join(MEMORY_TYPES)}.")
        resolve_momentum(self.memory, self.momentum)
        if self.memory != "fifo" and self.memory_size == 0:
            raise ValueError(
                f"memory={self.memory!r} needs a memory, but memory_size is 0 (--no-memory): drop one of the two."
            )

    def validate_image_settings(self):
        """Raise `ValueError` naming the first setting of the backbone, the schedule or the image benchmarks that cannot work."""
        if self.backbone not in backbones.BACKBONES:
            raise ValueError(f"Unknown backbone={self.backbone!r}: expected one of {', '.join(backbones.BACKBONES)}.")
        if self.dataset == "omniglot" and self.backbone != "small_cnn":
            raise ValueError(
                f"backbone={self.backbone!r} needs RGB images, but Omniglot is grayscale: use backbone small_cnn."
            )
        if self.pooling not in backbones.POOLINGS:
            raise ValueError(f"Unknown pooling={self.pooling!r}: expected one of {', '.join(backbones.POOLINGS)}.")
        if self.weights not in (None, "imagenet"):
            raise ValueError(f"Invalid weights={self.weights!r}: expected none or imagenet.")
        if self.test_list not in (800, 1600, 2400):
            raise ValueError(f"Invalid test_list={self.test_list!r}: expected 800, 1600 or 2400.")
        if self.from_tfds and self.dataset not in ("sop", "cub", "cars"):
            raise ValueError(f"dataset={self.dataset!r} cannot be read from TFDS: expected sop, cub or cars.")
        if self.recall_ks is not None and (not self.recall_ks or min(self.recall_ks) < 1):
            raise ValueError(f"Invalid recall_ks={self.recall_ks!r}: expected positive integers.")
        for name in ("resize_size", "validation_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: expected a positive integer.")
        if self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size={self.resize_size} is smaller than image_size={self.image_size}: "
                "expected the shorter side before cropping to be at least the crop."
            )
        if self.dataset != "omniglot" and self.backbone == "resnet50" and self.image_size < 32:
            raise ValueError(f"Invalid image_size={self.image_size}: ResNet-50 expects at least 32 pixels.")
        if isinstance(self.lr_patience, bool) or not isinstance(self.lr_patience, int) or self.lr_patience < 0:
            raise ValueError(f"Invalid lr_patience={self.lr_patience!r}: expected a non-negative integer.")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"Invalid lr_factor={self.lr_factor!r}: expected a number between 0 and 1.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"Invalid validation_fraction={self.validation_fraction!r}: expected a number in [0, 1).")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay={self.weight_decay!r}: expected a non-negative number.")
        if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"Unknown weight_decay_mode={self.weight_decay_mode!r}: expected one of {', '.join(WEIGHT_DECAY_MODES)}."
            )

    @property
    def classes_per_batch(self):
        return self.batch_size // self.samples_per_class


def build_network(config, input_shape):
    """Build the embedding network of a run: `small_cnn` on Omniglot's arrays, `backbones.image_network` on RGB files."""
    if config.dataset == "omniglot":
        return backbones.small_cnn(input_shape=input_shape, embedding_dim=config.embedding_dim)
    return backbones.image_network(
        config.backbone,
        config.image_size,
        embedding_dim=config.embedding_dim,
        pooling=config.pooling,
        freeze_batch_norm=config.freeze_batch_norm,
        weights=config.weights,
    )


def build_optimizer(config):
    """Return the run's Adam, with decoupled weight decay when `weight_decay_mode="decoupled"`."""
    if config.weight_decay and config.weight_decay_mode == "decoupled":
        return keras.optimizers.Adam(config.learning_rate, weight_decay=config.weight_decay)
    return keras.optimizers.Adam(config.learning_rate)


def add_l2_weight_decay(network, weight_decay):
    """Attach `L2(weight_decay / 2)` to every trainable weight of `network` (biases and normalisation included).

    The regulariser's gradient is `weight_decay * w`, the L2 form of weight
    decay that PyTorch's `Adam(weight_decay=...)` adds to the gradient.
    `XBMModel.train_step` adds these terms to the loss.
    """
    regularizer = keras.regularizers.L2(weight_decay / 2.0)
    for variable in network.trainable_weights:
        variable.regularizer = regularizer


def build_model(config, input_shape, loss=None, num_train_samples=None):
    """Build and compile the `XBMModel` of a run.

    `loss` is a `keras_xbm.losses.PairLoss`; `None` builds `config.loss`
    with `config.negative_threshold` and `config.normalization`.
    With `config.memory == "momentum-bank"` the bank gets one slot per
    training sample, `num_train_samples`, and `config.memory_size` is unused.
    """
    memory_size = config.memory_size
    if config.memory == "momentum-bank":
        if num_train_samples is None:
            raise ValueError("memory='momentum-bank' needs num_train_samples, the size of the training set.")
        memory_size = int(num_train_samples)
    network = build_network(config, input_shape)
    if config.weight_decay and config.weight_decay_mode == "l2":
        add_l2_weight_decay(network, config.weight_decay)
    if loss is None:
        loss = build_loss(config.loss, config.negative_threshold, config.normalization)
    model = XBMModel(
        network,
        memory_size=memory_size,
        loss=loss,
        warmup_steps=config.warmup_steps,
        memory_weight=config.memory_weight,
        memory_type=config.memory,
        momentum=config.momentum,
    )
    model.compile(optimizer=build_optimizer(config), jit_compile=config.jit_compile)
    return model


def build_distributed_model(config, input_shape, strategy, loss=None, num_train_samples=None):
    """Build the run's model in `strategy.scope()`, with the settings that several replicas need.

    With more than one replica, every `BatchNormalization` layer computes its
    statistics over the global batch, so training matches one device fed that
    batch. XLA is turned off, because Keras 3.15 with TensorFlow 2.20 fails to
    compile a step that spans several devices or workers.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas > 1 and config.jit_compile:
        logger.warning("Training without XLA: jit_compile is not supported on %d replicas.", replicas)
        config = dataclasses.replace(config, jit_compile=False)
    with strategy.scope():
        model = build_model(config, input_shape, loss=loss, num_train_samples=num_train_samples)
        if replicas > 1:
            synchronize_batch_norm(model.embedding_model)
    return model


def shard_by_data(dataset):
    """Let every worker keep its own slice of each global batch (`tf.data` DATA sharding).

    Every worker runs the same seeded P x K sampler, so all workers produce the
    same global batches, and the slices of one step come from one global batch.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def embed(model, images, batch_size=256):
    """Return the L2-normalised embeddings of `images` as a float32 array."""
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), np.float32)


def run_training(config, loss=None, callbacks=None):
    """Train, evaluate on the test split and export; return the results dictionary.

    `loss`, a `PairLoss`, replaces `config.loss` on Omniglot (see `build_model`).

    Writes to `config.output_dir`: `metrics.json` (recall@K on the test split,
    with the run's settings and timings), `history.json` (the training
    metrics) and `xbm.weights.h5` (network and memory, for `load_weights`).
    The SavedModel goes to the next version folder of `config.export_dir`.
    `callbacks` (a list of Keras callbacks) are passed to `fit`.
    In a multi-worker run every worker trains and evaluates, and only the
    chief writes these files.
    """
    config.validate()
    if config.memory_size and config.steps <= config.warmup_steps:
        logger.warning(
            "steps=%d is not more than warmup_steps=%d: the memory term never switches on, so this run trains "
            "on the batch term alone. Pass more steps or fewer warm-up steps to train with the memory.",
            config.steps, config.warmup_steps,
        )
    # First: logical CPU devices and the multi-worker runtime must exist before any other TensorFlow call.
    strategy = make_strategy(config.strategy, config.devices)
    check_global_batch(config.batch_size, strategy.num_replicas_in_sync)
    if config.dataset != "omniglot":
        from keras_xbm.benchmark_training import run_benchmark_training

        return run_benchmark_training(config, strategy)
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
    if strategy.num_replicas_in_sync > 1:
        dataset = shard_by_data(dataset)
    model = build_distributed_model(config, train.images.shape[1:], strategy, loss=loss, num_train_samples=len(train))

    start = time.perf_counter()
    history = model.fit(dataset, steps_per_epoch=config.steps, epochs=1, verbose=config.verbose, callbacks=callbacks)
    train_seconds = time.perf_counter() - start

    embeddings = embed(model, test.images)
    recalls = evaluate_retrieval(embeddings, test.labels, ks=config.recall_ks, index=config.index)

    results = dict(recalls)
    results.update(
        train_seconds=train_seconds,
        step_ms=1000.0 * train_seconds / config.steps,
        replicas=strategy.num_replicas_in_sync,
        test_images=len(test),
        test_classes=test.num_classes,
    )
    return save_run(model, history, results, config, strategy)


def save_run(model, history, results, config, strategy):
    """Record the run's settings in `results`, write its files on the chief, and return `results`.

    Writes `xbm.weights.h5`, `history.json` and `metrics.json` to
    `config.output_dir` and, with `config.export`, the SavedModel to the next
    version folder of `config.export_dir`. In a multi-worker run the other
    workers write nothing and get `results["chief"] = False`.
    """
    results["config"] = {
        key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()
    }
    # The momentum default and the bank size are resolved in build_model; record what ran.
    results.update(memory=config.memory, momentum=model.momentum, memory_slots=model.memory_size)
    if not is_chief(strategy):
        # Training and `predict` need every worker; the files are written by the chief alone.
        results["chief"] = False
        return results
    model.save_weights(os.path.join(config.output_dir, "xbm.weights.h5"))
    with open(os.path.join(config.output_dir, "history.json"), "w") as handle:
        json.dump({key: [float(v) for v in values] for key, values in history.history.items()}, handle, indent=2)
    if config.export:
        results["export_path"] = export_saved_model(model.embedding_model, config.export_dir)
    with open(os.path.join(config.output_dir, "metrics.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return results
