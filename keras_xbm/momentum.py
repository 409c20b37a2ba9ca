"""Momentum-updated memories: an EMA encoder that feeds the queue, or a per-sample EMA bank.

A cross-batch memory works because embeddings drift slowly: a row stored a
few hundred steps ago is still close to what the network would compute now.
A momentum update slows the drift of the stored references further. Two forms
are in use:

- Momentum encoder (He et al., "Momentum Contrast for Unsupervised Visual
  Representation Learning", CVPR 2020): an exponential moving average (EMA)
  copy of the embedding network, `theta_ema <- m * theta_ema + (1 - m) * theta`
  after each optimizer step. The batch is embedded by the EMA copy and those
  embeddings go into the ring buffer, while the queries come from the online
  network. `MomentumEncoder` is that copy.
- Per-sample momentum bank (Wu et al., "Unsupervised Feature Learning via
  Non-Parametric Instance Discrimination", CVPR 2018): one slot per training
  image, addressed by its sample id; each time the image comes again its slot
  becomes `l2_normalize(m * old + (1 - m) * new)`. `MomentumBank` holds it.

Both keep their state in non-trainable Keras variables, so `save_weights` /
`load_weights` and checkpoints restore them exactly, and both run inside an
XLA-compiled train step.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_xbm.memory import as_int32_vector

MEMORY_TYPES = ("fifo", "momentum-encoder", "momentum-bank")

# A bank slot is revisited only when its image comes again (every few hundred
# steps on Omniglot), so it needs far less inertia than an encoder updated
# every step.
DEFAULT_MOMENTUM = {"momentum-encoder": 0.99, "momentum-bank": 0.5}


def check_memory_type(memory_type):
    if memory_type not in MEMORY_TYPES:
        raise ValueError(f"Unknown memory_type={memory_type!r}: expected one of {', '.join(MEMORY_TYPES)}.")


def resolve_momentum(memory_type, momentum):
    """Return the momentum of a memory form, its default when `momentum` is `None`.

    Raises:
        ValueError: for an unknown memory type, a momentum given to the plain
            FIFO memory (which has none), or a momentum outside [0, 1).
    """
    check_memory_type(memory_type)
    if memory_type == "fifo":
        if momentum is not None:
            raise ValueError(
                f"momentum={momentum!r} was given for the plain FIFO memory, which has no momentum: "
                "use memory_type='momentum-encoder' or 'momentum-bank' (--memory on the command line), "
                "or leave momentum unset."
            )
        return None
    if momentum is None:
        return DEFAULT_MOMENTUM[memory_type]
    return check_momentum(momentum)


def check_momentum(momentum):
    """Return `momentum` as a float, or raise `ValueError` when it is not in [0, 1)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.integer, np.floating)):
        raise ValueError(f"Invalid momentum={momentum!r}: expected a number in [0, 1).")
    momentum = float(momentum)
    # 1 would freeze the average for ever; NaN fails both comparisons.
    if math.isnan(momentum) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum={momentum!r}: expected a number in [0, 1), such as 0.99.")
    return momentum


@keras.saving.register_keras_serializable(package="keras_xbm")
class MomentumEncoder(keras.layers.Layer):
    """Exponential moving average copy of an embedding network.

    After every optimizer step `update(online)` sets each weight to

        ema <- m * ema + (1 - m) * online

    except for the first update, which copies the online weights (so the
    average starts from the network as it is when training starts, also after
    pretrained weights were loaded into it). Every float weight is averaged,
    the batch normalisation statistics included; other weights are copied.
    The copy's variables are non-trainable, so the optimizer leaves them alone
    and `save_weights` stores them with the model.

    Calling the layer embeds a batch with the average weights and returns
    L2-normalised float32 rows.

    Args:
        network: the online embedding network, a functional or sequential
            Keras model (`keras.models.clone_model` must be able to clone it).
        momentum: `m` in [0, 1). Defaults to 0.99.

    Raises:
        ValueError: for a momentum outside [0, 1).
    """

    def __init__(self, network, momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        self.momentum = check_momentum(momentum)
        self.network = keras.models.clone_model(network)
        if getattr(network, "inputs", None):
            self.network.build(network.inputs[0].shape)
            self.build(network.inputs[0].shape)

    def build(self, input_shape):
        if self.built:
            return
        if not self.network.built:
            self.network.build(input_shape)
        # The layers stay trainable so that batch normalisation runs on batch
        # statistics in training mode, like the online network; the variables
        # themselves are frozen.
        for variable in self.network.weights:
            variable.trainable = False
        self.updates = self.add_weight(shape=(), initializer="zeros", dtype="int32", trainable=False, name="updates")
        self.built = True

    def call(self, inputs, training=False):
        embeddings = self.network(inputs, training=training)
        return tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)

    def update(self, online):
        """Move the average weights towards the weights of `online`, the network being trained."""
        average_weights = self.network.weights
        online_weights = online.weights
        if len(average_weights) != len(online_weights):
            raise ValueError(
                f"The momentum encoder has {len(average_weights)} weights but the online network "
                f"{len(online_weights)}: both must have the same architecture."
            )
        momentum = tf.where(self.updates > 0, self.momentum, 0.0)
        for average, current in zip(average_weights, online_weights):
            value = tf.convert_to_tensor(current)
            if value.dtype.is_floating:
                blend = tf.cast(momentum, value.dtype)
                average.assign(blend * average + (1.0 - blend) * value)
            else:
                average.assign(value)
        self.updates.assign_add(1)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum)
        return config


@keras.saving.register_keras_serializable(package="keras_xbm")
class MomentumBank(keras.layers.Layer):
    """One embedding slot per training sample, updated by an exponential moving average.

    Slot `i` stores the embedding of the sample whose id is `i`. Writing a row
    with id `i` sets

        slot_i <- l2_normalize(m * slot_i + (1 - m) * new)

    or stores `new` as it is when slot `i` was never written. Slots never
    written are invalid: `valid_mask()` is false there, so the loss skips them.

    The bank exposes the attributes `XBMModel` reads from a memory:
    `embeddings`, `labels`, `sample_ids` (slot `i` has id `i`) and
    `valid_mask()`, and `enqueue(embeddings, labels, sample_ids)` writes a batch.

    Args:
        memory_size: number of slots, the number of training samples (int, at
            least 1). Sample ids must lie in `[0, memory_size)`.
        momentum: `m` in [0, 1). Defaults to 0.5.
        embedding_dim: width of the stored embeddings. Defaults to `None`: the
            bank is built from the first `build` call or the first `enqueue`.

    Variables (all non-trainable, saved with the model's weights):
        embeddings: float32 `[memory_size, embedding_dim]`.
        labels: int32 `[memory_size]`.
        last_write: int32 `[memory_size]`, the write count at the last write of
            each slot, -1 for slots never written.
        write_count: int32 scalar, the number of `enqueue` calls so far (one
            per training step), from which `entry_ages` derives the ages.
        invalid_id_found, invalid_id: int32 scalars recording a sample id out
            of range seen by a compiled step (see `raise_on_invalid_id`).

    Raises:
        ValueError: for a size or momentum out of range; in `enqueue`, for a
            sample id outside `[0, memory_size)`.
    """

    requires_sample_ids = True

    def __init__(self, memory_size, momentum=0.5, embedding_dim=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(
                f"Invalid memory_size={memory_size!r}: expected a positive integer "
                "(the number of training samples, one slot each)."
            )
        self.memory_size = memory_size
        self.momentum = check_momentum(momentum)
        self.embedding_dim = embedding_dim
        if embedding_dim is not None:
            self.build((None, embedding_dim))

    def build(self, input_shape):
        if self.built:
            return
        dim = int(input_shape[-1])
        if self.embedding_dim is not None and dim != self.embedding_dim:
            raise ValueError(
                f"MomentumBank was created with embedding_dim={self.embedding_dim}, "
                f"but it is being built for embeddings of width {dim}."
            )
        self.embedding_dim = dim
        self.embeddings = self.add_weight(
            shape=(self.memory_size, dim),
            initializer="zeros",
            dtype="float32",
            trainable=False,
            autocast=False,
            name="embeddings",
        )
        self.labels = self.add_weight(
            shape=(self.memory_size,), initializer="zeros", dtype="int32", trainable=False, name="labels"
        )
        self.last_write = self.add_weight(
            shape=(self.memory_size,),
            initializer=keras.initializers.Constant(-1),
            dtype="int32",
            trainable=False,
            name="last_write",
        )
        self.write_count = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, name="write_count"
        )
        self.invalid_id_found = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, name="invalid_id_found"
        )
        self.invalid_id = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, name="invalid_id"
        )
        self.built = True

    def call(self, inputs):
        raise NotImplementedError(
            "MomentumBank is not called on inputs: read `embeddings`, `labels`, "
            "`sample_ids` and `valid_mask()`, and write with `enqueue`."
        )

    @property
    def sample_ids(self):
        """int32 `[memory_size]`: slot `i` stores the sample whose id is `i`."""
        return tf.range(self.memory_size, dtype=tf.int32)

    @property
    def fill_count(self):
        """int32 scalar, the number of slots written so far."""
        return tf.reduce_sum(tf.cast(self.valid_mask(), tf.int32))

    def valid_mask(self):
        """Return a bool `[memory_size]` tensor, true for the slots written so far."""
        return self.last_write >= 0

    def entry_ages(self):
        """Return int32 `[memory_size]`: writes (steps) since each slot was last written, 0 for the latest.

        Slots never written get an age of -1.
        """
        ages = self.write_count - 1 - self.last_write
        return tf.where(self.valid_mask(), ages, -1)

    def enqueue(self, embeddings, labels, sample_ids):
        """Blend a batch into the slots of its sample ids.

        Args:
            embeddings: float `[batch, embedding_dim]`, L2-normalised rows;
                stored as float32 and detached from any gradient tape.
            labels: integer `[batch]` (a `[batch, 1]` column is accepted).
            sample_ids: integer `[batch]`, each in `[0, memory_size)`.

        Raises:
            ValueError: in eager mode, for a sample id outside
                `[0, memory_size)`. In a compiled step the batch is not written
                and the id is recorded instead; `raise_on_invalid_id` raises
                the same error after the step.

        NOTE: a batch that contains the same sample id twice writes that slot
        once, from either row; both rows carry the same image, so they agree
        unless the network is stochastic (dropout).
        """
        embeddings = tf.stop_gradient(tf.cast(tf.convert_to_tensor(embeddings), tf.float32))
        if embeddings.shape.rank != 2:
            raise ValueError(
                f"Expected embeddings of shape [batch, embedding_dim], received shape {embeddings.shape}."
            )
        if not self.built:
            self.build(embeddings.shape)
        if embeddings.shape[-1] is not None and embeddings.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"Expected embeddings of width {self.embedding_dim}, received width {embeddings.shape[-1]}."
            )
        labels = as_int32_vector(labels, "labels")
        sample_ids = as_int32_vector(sample_ids, "sample_ids")

        in_range = tf.logical_and(sample_ids >= 0, sample_ids < self.memory_size)
        all_in_range = tf.reduce_all(in_range)
        if tf.executing_eagerly() and not bool(all_in_range):
            first = int(tf.boolean_mask(sample_ids, tf.logical_not(in_range))[0])
            raise ValueError(self.invalid_id_message(first))

        # Out-of-range ids are clipped so that the gathers and scatters below
        # stay valid, but such a batch then writes every slot's old content
        # back: nothing changes, and the id is kept for `raise_on_invalid_id`.
        slots = tf.clip_by_value(sample_ids, 0, self.memory_size - 1)
        old = tf.gather(self.embeddings, slots)
        written = tf.gather(self.last_write, slots) >= 0
        blended = tf.math.l2_normalize(self.momentum * old + (1.0 - self.momentum) * embeddings, axis=-1)
        # An old row opposite to the new one leaves nothing to normalise: keep the new row then.
        degenerate = tf.norm(self.momentum * old + (1.0 - self.momentum) * embeddings, axis=-1) < 1e-6
        new_rows = tf.where(tf.logical_and(written, tf.logical_not(degenerate))[:, None], blended, embeddings)

        old_labels = tf.gather(self.labels, slots)
        old_writes = tf.gather(self.last_write, slots)
        new_rows = tf.where(all_in_range, new_rows, old)
        new_labels = tf.where(all_in_range, labels, old_labels)
        new_writes = tf.where(all_in_range, tf.fill(tf.shape(slots), self.write_count), old_writes)

        indices = slots[:, None]
        self.embeddings.assign(tf.tensor_scatter_nd_update(self.embeddings, indices, new_rows))
        self.labels.assign(tf.tensor_scatter_nd_update(self.labels, indices, new_labels))
        self.last_write.assign(tf.tensor_scatter_nd_update(self.last_write, indices, new_writes))
        self.write_count.assign_add(tf.cast(all_in_range, tf.int32))

        # tf.gather, not indexing: XLA would compile a strided slice once per index value.
        invalid_position = tf.argmax(tf.cast(tf.logical_not(in_range), tf.int32), output_type=tf.int32)
        record = tf.logical_and(tf.logical_not(all_in_range), self.invalid_id_found == 0)
        self.invalid_id.assign(tf.where(record, tf.gather(sample_ids, invalid_position), self.invalid_id))
        self.invalid_id_found.assign(tf.where(record, 1, self.invalid_id_found))

    def invalid_id_message(self, sample_id):
        return (
            f"Sample id {sample_id} is outside the momentum bank of {self.memory_size} slots: "
            f"expected ids in [0, {self.memory_size}), one per training sample. "
            "Set the bank size (memory_size) to the number of training samples."
        )

    def raise_on_invalid_id(self):
        """Raise `ValueError` if a compiled step met a sample id out of range, then clear the record.

        A compiled train step cannot raise on a tensor value (XLA drops
        assertions), so `XBMModel` calls this on the host after each step.
        """
        if int(self.invalid_id_found.numpy()):
            sample_id = int(self.invalid_id.numpy())
            self.invalid_id_found.assign(0)
            raise ValueError(self.invalid_id_message(sample_id))

    def reset(self):
        """Empty the bank: every slot invalid, the write count at 0."""
        for variable in (self.embeddings, self.labels, self.write_count, self.invalid_id_found, self.invalid_id):
            variable.assign(tf.zeros_like(variable))
        self.last_write.assign(tf.fill(tf.shape(self.last_write), -1))

    def get_config(self):
        config = super().get_config()
        config.update(memory_size=self.memory_size, momentum=self.momentum, embedding_dim=self.embedding_dim)
        return config
