"""Training runs on 2 replicas and on one device, compared by tests/test_distributed.py.

TensorFlow fixes its devices when it first runs an operation, so these runs
need a fresh process:

- `python tests/distributed_runs.py mirrored RESULTS.pkl` splits the CPU into
  2 logical devices and trains under MirroredStrategy;
- `python tests/distributed_runs.py multi-worker RESULTS.pkl`, started once
  per worker with TF_CONFIG set, trains under MultiWorkerMirroredStrategy.

Both write a dictionary of numpy results to RESULTS.pkl. Every pair of runs
starts from the same weights and is fed the same global batches in the same
order: the distributed run splits each global batch of 8 (or 16) rows into
two replica slices, the single-device run takes it whole.
"""

import os
import pickle
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from keras_xbm import ContrastiveLoss, XBMModel, backbones, export_saved_model
from keras_xbm.distributed import configure_cpu_devices, make_strategy, synchronize_batch_norm
from keras_xbm.evaluation import embed_with_signature, load_serving_function
from keras_xbm.losses import PairLoss, contrastive_loss

DIM_IN, DIM_OUT = 6, 4
MEMORY_VARIABLES = ("embeddings", "labels", "sample_ids", "pointer", "fill_count")


class AnchorLossWithoutGlobalCount(PairLoss):
    """The contrastive loss with "anchor" normalization, behind a `pair_loss` that takes no `global_count`."""

    def pair_loss(self, similarity, pos_mask, neg_mask):
        return contrastive_loss(similarity, pos_mask, neg_mask, negative_threshold=0.0, normalization="anchor")


class StepRecorder(keras.callbacks.Callback):
    """Record the logs and the network's weights around every training step."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.logs = []
        self.weights_before = []
        self.weights_after = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights_before.append([w.copy() for w in self.network.get_weights()])

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({key: float(value) for key, value in logs.items()})
        self.weights_after.append([w.copy() for w in self.network.get_weights()])


def linear_network():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((DIM_IN,))
    return keras.Model(inputs, keras.layers.Dense(DIM_OUT)(inputs))


def cnn_network(synchronized=True):
    keras.utils.set_random_seed(0)
    network = backbones.small_cnn(input_shape=(16, 16, 1), embedding_dim=8, widths=(4, 8))
    if synchronized:
        synchronize_batch_norm(network)
    return network


def moving_means(model):
    """Return each BatchNormalization layer's moving mean, one array per replica."""
    return [
        replica_values(layer.moving_mean)
        for layer in model.embedding_model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def linear_data(steps, batch_size=8, with_ids=True):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(steps * batch_size, DIM_IN)).astype(np.float32)
    labels = rng.integers(0, 3, size=steps * batch_size).astype(np.int32)
    ids = np.arange(steps * batch_size, dtype=np.int32)
    targets = {"labels": labels, "sample_ids": ids} if with_ids else labels
    return tf.data.Dataset.from_tensor_slices((x, targets)).batch(batch_size, drop_remainder=True)


def cnn_data(steps, batch_size=16):
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(steps * batch_size, 16, 16, 1)).astype(np.float32)
    # P x K batches: 4 classes of 4 images, class-contiguous as PKSampler gives them.
    labels = np.concatenate([np.repeat(rng.choice(10, 4, replace=False), 4) for _ in range(steps)]).astype(np.int32)
    ids = np.arange(steps * batch_size, dtype=np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, {"labels": labels, "sample_ids": ids}))
    return dataset.batch(batch_size, drop_remainder=True)


def replica_values(variable):
    """Return each replica's copy of a variable (one entry without a strategy)."""
    value = variable.value
    components = getattr(value, "values", None) or (value,)
    return [component.numpy().copy() for component in components]


def train(strategy, make_network, dataset, learning_rate, jit_compile=False, **model_kwargs):
    with strategy.scope():
        network = make_network()
        model = XBMModel(network, **model_kwargs)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate), jit_compile=jit_compile)
    recorder = StepRecorder(network)
    model.fit(dataset, epochs=1, verbose=0, callbacks=[recorder])
    splits = strategy.run(lambda: tf.constant(model.splits_pair_loss()))
    result = {
        "splits_pair_loss": [bool(value) for value in strategy.experimental_local_results(splits)],
        "logs": recorder.logs,
        "gradients": [
            [(before - after) / learning_rate for before, after in zip(step_before, step_after)]
            for step_before, step_after in zip(recorder.weights_before, recorder.weights_after)
        ],
        "weights": network.get_weights(),
        "memory": {name: replica_values(getattr(model.memory, name)) for name in MEMORY_VARIABLES},
        "train_steps": replica_values(model.train_steps),
        "next_generated_id": replica_values(model.next_generated_id),
    }
    return model, result


LINEAR_CASES = {
    "sum": (lambda: ContrastiveLoss(negative_threshold=0.0, normalization="sum"), True),
    "batch": (lambda: ContrastiveLoss(negative_threshold=0.0, normalization="batch"), True),
    "pairs": (lambda: ContrastiveLoss(negative_threshold=0.0, normalization="pairs"), True),
    "anchor": (lambda: ContrastiveLoss(negative_threshold=0.0, normalization="anchor"), True),
    "generated_ids": (lambda: ContrastiveLoss(negative_threshold=0.0, normalization="pairs"), False),
    "no_global_count": (AnchorLossWithoutGlobalCount, True),
}


def linear_runs(mirrored, single):
    """Train the linear network for 5 steps of 8 rows into a memory of 12 slots, which wraps around."""
    results = {}
    for case, (make_loss, with_ids) in LINEAR_CASES.items():
        pair = {}
        for name, strategy in (("mirrored", mirrored), ("single", single)):
            kwargs = dict(memory_size=12, warmup_steps=1, loss=make_loss())
            _, pair[name] = train(strategy, linear_network, linear_data(5, with_ids=with_ids), 0.5, **kwargs)
        results[case] = pair
    return results


def cnn_runs(mirrored, single):
    """Train the CNN with synchronized batch normalization, then embed and export it."""
    kwargs = dict(memory_size=40, warmup_steps=1, loss=ContrastiveLoss(negative_threshold=0.2))
    mirrored_model, mirrored_result = train(mirrored, cnn_network, cnn_data(4), 0.1, **kwargs)
    _, single_result = train(single, cnn_network, cnn_data(4), 0.1, **kwargs)
    mirrored_result["moving_mean"] = moving_means(mirrored_model)
    unsynchronized_model, _ = train(mirrored, lambda: cnn_network(synchronized=False), cnn_data(1), 0.1, **kwargs)

    # A single-device model given the mirrored model's trained weights.
    with single.scope():
        reference = XBMModel(cnn_network(), **kwargs)
        reference.compile(optimizer=keras.optimizers.SGD(0.1))
    reference.embedding_model.set_weights(mirrored_model.embedding_model.get_weights())

    rng = np.random.default_rng(3)
    test_images = rng.uniform(size=(20, 16, 16, 1)).astype(np.float32)
    test_labels = np.repeat(np.arange(5), 4).astype(np.int32)
    evaluation = {
        "mirrored_predict": mirrored_model.predict(test_images, batch_size=10, verbose=0),
        "single_predict": reference.predict(test_images, batch_size=10, verbose=0),
        "mirrored_evaluate": mirrored_model.evaluate(test_images, test_labels, batch_size=10, verbose=0, return_dict=True),
        "single_evaluate": reference.evaluate(test_images, test_labels, batch_size=10, verbose=0, return_dict=True),
    }
    with tempfile.TemporaryDirectory() as export_dir:
        path = export_saved_model(mirrored_model.embedding_model, export_dir)
        function, _ = load_serving_function(path)
        evaluation["export"] = embed_with_signature(function, test_images)
    return {
        "mirrored": mirrored_result,
        "single": single_result,
        "evaluation": evaluation,
        "unsynchronized_moving_mean": moving_means(unsynchronized_model),
    }


def error_message(function):
    try:
        function()
    except ValueError as error:
        return str(error)
    return None


def bad_input_runs(mirrored):
    def fit_odd_batch():
        with mirrored.scope():
            model = XBMModel(linear_network(), memory_size=32)
            model.compile(optimizer="sgd")
        model.fit(linear_data(2, batch_size=9), epochs=1, verbose=0)

    def fit_small_memory():
        with mirrored.scope():
            model = XBMModel(linear_network(), memory_size=6)
            model.compile(optimizer="sgd")
        model.fit(linear_data(2, batch_size=8), epochs=1, verbose=0)

    return {"odd_batch": error_message(fit_odd_batch), "small_memory": error_message(fit_small_memory)}


def jit_runs(single):
    """XLA on a one-device MirroredStrategy, and on two devices (where Keras 3.15 + TF 2.20 fail)."""
    one_device = tf.distribute.MirroredStrategy(["/cpu:0"])
    kwargs = dict(memory_size=12, warmup_steps=1, loss=ContrastiveLoss(negative_threshold=0.0))
    _, jit_result = train(one_device, linear_network, linear_data(5), 0.5, jit_compile=True, **kwargs)
    _, reference = train(single, linear_network, linear_data(5), 0.5, **kwargs)
    try:
        train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), linear_network, linear_data(2), 0.5, jit_compile=True, **kwargs)
        two_devices = "trained"
    except Exception as error:  # noqa: BLE001 - the failure is recorded, whatever its type.
        lines = [line for line in str(error).splitlines() if "Trying to access" in line] or str(error).splitlines()
        two_devices = f"{type(error).__name__}: {lines[0].strip()[:300]}"
    return {"one_device": jit_result, "reference": reference, "two_devices": two_devices}


def multi_worker_runs(strategy, single):
    """Train the linear network across workers and on one device, then embed with both."""
    kwargs = dict(memory_size=12, warmup_steps=1, loss=ContrastiveLoss(negative_threshold=0.0))
    worker_model, worker_result = train(strategy, linear_network, linear_data(5), 0.5, **kwargs)
    _, single_result = train(single, linear_network, linear_data(5), 0.5, **kwargs)
    with single.scope():
        reference = XBMModel(linear_network(), **kwargs)
    reference.embedding_model.set_weights(worker_model.embedding_model.get_weights())
    inputs = np.random.default_rng(3).normal(size=(20, DIM_IN)).astype(np.float32)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "worker": worker_result,
        "single": single_result,
        "worker_predict": worker_model.predict(inputs, batch_size=10, verbose=0),
        "single_predict": reference.predict(inputs, batch_size=10, verbose=0),
    }


def main(mode, path):
    if mode == "mirrored":
        configure_cpu_devices(2)
        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        single = tf.distribute.get_strategy()
        results = {
            "replicas": mirrored.num_replicas_in_sync,
            "linear": linear_runs(mirrored, single),
            "cnn": cnn_runs(mirrored, single),
            "bad_input": bad_input_runs(mirrored),
            "jit": jit_runs(single),
        }
    elif mode == "multi-worker":
        strategy = make_strategy("multi-worker")
        results = multi_worker_runs(strategy, tf.distribute.get_strategy())
    else:
        raise ValueError(f"Unknown mode {mode!r}: expected mirrored or multi-worker.")
    with open(path, "wb") as handle:
        pickle.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
