"""Data-parallel training with `tf.distribute`: replica-side helpers and strategy set-up.

Under a strategy each replica embeds its shard of the global batch. `XBMModel`
gathers the queries, labels and sample ids of all replicas in replica order, so
every replica has the same global batch. Each replica scores its own queries
against that whole batch and against the memory, and writes the whole batch
into its own copy of the memory. The copies therefore stay identical without
any broadcast of the memory itself.

The helpers below are no-ops on one replica (no strategy, a one-device
strategy, or code running outside `strategy.run`), so the single-device path
computes exactly what it computed before.
"""

import json
import logging
import os

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multi-worker")


def replica_context():
    """Return the current `tf.distribute.ReplicaContext` when it has more than one replica, else `None`."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas():
    """Return the number of replicas that run the current step in sync (1 outside `strategy.run`)."""
    context = replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def all_gather(tensor):
    """Concatenate `tensor` of every replica along axis 0, in replica order.

    The result is the same tensor on every replica. The gradient of the
    gathered rows is summed over the replicas and handed back to the replica
    that contributed them, so a loss that uses the gathered rows trains the
    network of the replica that embedded them. Replicas may hold different
    numbers of rows (not on TPUs).
    """
    context = replica_context()
    if context is None:
        return tensor
    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return context.all_gather(tensor, axis=0)

    # NOTE: `ReplicaContext.all_gather` inside a tf.function fails under
    # MultiWorkerMirroredStrategy with one device per worker (TensorFlow 2.20:
    # "destinations can not be empty"). A sum of zero-padded slices gives the
    # same rows bit for bit, because every entry has one non-zero term.
    local_size = tf.shape(tensor)[0]
    sizes = replica_sizes(local_size)
    offset = tf.reduce_sum(sizes[: context.replica_id_in_sync_group])
    after = tf.reduce_sum(sizes) - offset - local_size
    padding = tf.concat([[[offset, after]], tf.zeros([tensor.shape.rank - 1, 2], tf.int32)], axis=0)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.pad(tensor, padding))


def replica_sizes(local_size):
    """Return int32 `[num_replicas]`, the number of rows of every replica, in replica order."""
    context = replica_context()
    if context is None:
        return tf.reshape(tf.cast(local_size, tf.int32), [1])
    one_hot = tf.one_hot(context.replica_id_in_sync_group, context.num_replicas_in_sync, dtype=tf.int32)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, one_hot * tf.cast(local_size, tf.int32))


def replica_row_offset(local_size):
    """Return the index of this replica's first row in the gathered batch (0 on one replica)."""
    context = replica_context()
    if context is None:
        return tf.zeros((), tf.int32)
    return tf.reduce_sum(replica_sizes(local_size)[: context.replica_id_in_sync_group])


def sum_over_replicas(value):
    """Return the sum of `value` over all replicas (the value itself on one replica)."""
    context = replica_context()
    if context is None:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def scale_loss_for_distribution(loss):
    """Divide a replica's loss by the number of replicas, as Keras' TensorFlow trainer does.

    Each replica returns a loss whose mean over the replicas is the loss of
    the global batch. The optimizer sums the replicas' gradients, so dividing
    by the replica count gives the gradient of the global batch's loss (Keras
    3 does the same in `keras.src.losses.loss.scale_loss_for_distribution`).
    """
    replicas = num_replicas()
    if replicas == 1:
        return loss
    return loss * tf.cast(1.0 / replicas, loss.dtype)


def add_replica_local_weight(layer, name, shape, dtype, autocast=True):
    """Create a non-trainable, zero-initialised variable of `layer` that each replica updates on its own.

    The variable is `synchronization="on_read"` with
    `aggregation="only_first_replica"`: every replica keeps a copy and assigns
    it locally inside `strategy.run`, which Keras' default (a mirrored
    variable without aggregation) does not allow. Reads outside `strategy.run`,
    `save_weights` and checkpoints take the first replica's copy, and
    `load_weights` writes every copy. The copies agree only when every replica
    writes the same values, which is what the memory does: every replica
    writes the gathered global batch.

    Without a strategy this is a plain variable.
    """
    with keras.name_scope(layer.name, caller=layer):
        variable = keras.Variable(
            initializer=keras.initializers.Zeros(),
            shape=shape,
            dtype=dtype,
            trainable=False,
            autocast=autocast,
            aggregation="only_first_replica",
            synchronization="on_read",
            name=name,
        )
    setattr(layer, name, variable)
    return variable


def check_global_batch(global_batch_size, replicas):
    """Raise `ValueError` unless a global batch splits evenly over the replicas.

    Keras splits each global batch into one slice per replica. A remainder
    would give the replicas slices of different sizes, which Keras' input
    handling and TPUs reject.
    """
    if global_batch_size is None or replicas <= 1:
        return
    if global_batch_size % replicas:
        lower = global_batch_size - global_batch_size % replicas
        suggestion = f"{lower} or {lower + replicas}" if lower else f"{replicas}"
        raise ValueError(
            f"The global batch of {global_batch_size} rows does not split evenly over {replicas} replicas: "
            f"expected a batch size divisible by {replicas}, for example {suggestion}."
        )


def static_batch_size(inputs, batch_size=None):
    """Return the global batch size that `fit(inputs, batch_size=...)` will use, or `None` when unknown."""
    if isinstance(inputs, tf.data.Dataset):
        first = tf.nest.flatten(inputs.element_spec)[0]
        if first.shape.rank:
            return first.shape[0]
        return None
    if hasattr(inputs, "shape") or isinstance(inputs, (list, tuple, dict)):
        # Keras batches in-memory arrays by 32 when fit() gets no batch_size.
        return 32 if batch_size is None else batch_size
    return None


def synchronize_batch_norm(model):
    """Make every `BatchNormalization` layer of `model` compute its statistics over the global batch.

    Keras 3 reads the `synchronized` attribute at call time. Unsynchronized
    layers under `tf.distribute` normalise each replica's slice with that
    slice's statistics and keep a separate moving mean and variance on every
    replica (measured with Keras 3.15 and TensorFlow 2.20), so the replicas'
    inference statistics drift apart. Synchronized layers see the statistics of
    the global batch, as one device fed that batch would.

    Returns:
        The number of layers changed.
    """
    changed = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
            layer.synchronized = True
            changed += 1
    return changed


def configure_cpu_devices(count):
    """Split the host CPU into `count` logical devices, to run several replicas without accelerators.

    TensorFlow fixes its devices when it first runs an operation, so this must
    run before that; calling it again with the same count is harmless.

    Raises:
        ValueError: for a count below 1.
        RuntimeError: when TensorFlow has already set up a different number of
            CPU devices.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"Invalid device count {count!r}: expected a positive integer.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot split the CPU into {count} logical devices because TensorFlow has already set up its "
            f"devices ({error}). Create the strategy before any other TensorFlow call."
        ) from error


def make_strategy(name="default", devices=0):
    """Create the `tf.distribute` strategy of a training run.

    Args:
        name: `"default"` (one device, no distribution), `"mirrored"`
            (`MirroredStrategy` over the devices of this machine) or
            `"multi-worker"` (`MultiWorkerMirroredStrategy`, the cluster read
            from the `TF_CONFIG` environment variable). Defaults to
            `"default"`.
        devices: for `"mirrored"`, the number of devices: the first `devices`
            GPUs, or, on a machine without a GPU, that many logical devices
            carved from the CPU. 0 means every GPU, or the CPU alone. Defaults
            to 0. The other strategies take 0 only: a multi-worker job uses
            every GPU of each machine, or its CPU.

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: for an unknown name, a device count the machine does not
            have, `devices` with a strategy that does not take it, or a
            multi-worker run without a valid `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy={name!r}: expected one of {', '.join(STRATEGIES)}.")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 0:
        raise ValueError(f"Invalid devices={devices!r}: expected a non-negative integer (0 for the default).")
    if name != "mirrored" and devices:
        raise ValueError(
            f"devices={devices} applies to the mirrored strategy only; strategy {name!r} "
            "expects devices=0 (a multi-worker job uses every GPU of each machine, or its CPU)."
        )

    if name == "default":
        return tf.distribute.get_strategy()

    if name == "multi-worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        logger.info(
            "MultiWorkerMirroredStrategy: %d replicas in sync, this task is %s %s",
            strategy.num_replicas_in_sync,
            strategy.cluster_resolver.task_type,
            strategy.cluster_resolver.task_id,
        )
        return strategy

    gpus = tf.config.list_physical_devices("GPU")
    # NOTE: only the CPU branch has run (tests on logical CPU devices); the GPU branch is untested.
    if gpus:
        count = devices or len(gpus)
        if count > len(gpus):
            raise ValueError(f"devices={count} but this machine has {len(gpus)} GPUs: expected at most {len(gpus)}.")
        names = [f"/gpu:{index}" for index in range(count)]
    else:
        count = devices or 1
        configure_cpu_devices(count)
        names = [f"/cpu:{index}" for index in range(count)]
    strategy = tf.distribute.MirroredStrategy(names)
    logger.info("MirroredStrategy over %s", ", ".join(names))
    return strategy


def check_tf_config(text):
    """Raise `ValueError` unless `text` is a `TF_CONFIG` with a cluster and this task's type and index."""
    if not text:
        raise ValueError(
            "TF_CONFIG is not set: a multi-worker run reads the cluster from it, for example "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}.'
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): received {text!r}.") from error
    if not isinstance(config, dict) or not config.get("cluster") or not isinstance(config.get("task"), dict):
        raise ValueError(f"TF_CONFIG must hold 'cluster' and 'task' entries; received {text!r}.")


def is_chief(strategy):
    """Return whether this task writes the run's files: always on one machine; the chief, or worker 0, in a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
