"""The cross-batch memory: a ring buffer of recent embeddings, labels and sample ids.

The buffer has a fixed shape so that the train step compiles once (also with XLA).
All of its state, the write pointer and the fill count included, lives in
non-trainable Keras variables, so `model.save_weights` / `load_weights` and
checkpoints restore it exactly.

Slots are written in first-in, first-out order: a batch of `B` rows goes to slots
`pointer, pointer + 1, ..., pointer + B - 1` (modulo `memory_size`), so the oldest
entries are overwritten first, for any `B <= memory_size`, also when
`memory_size` is not a multiple of `B`. Because the pointer starts at slot 0 and
advances by the batch size, the written slots are always `[0, fill_count)`:
validity follows from the fill count, never from a label value.
"""

import keras
import tensorflow as tf

from keras_xbm.distributed import add_replica_local_weight, all_gather, num_replicas


@keras.saving.register_keras_serializable(package="keras_xbm")
class CrossBatchMemory(keras.layers.Layer):
    """Ring buffer of the embeddings, labels and sample ids of recent batches.

    Args:
        memory_size: number of slots (int, at least 1). A batch written by
            `enqueue` may hold at most this many rows.
        embedding_dim: width of the stored embeddings. Defaults to `None`: the
            buffer is then built from the first `build` call or the first
            `enqueue`.

    Variables (all non-trainable, saved with the model's weights):
        embeddings: float32 `[memory_size, embedding_dim]`.
        labels: int32 `[memory_size]`.
        sample_ids: int32 `[memory_size]`, the dataset index of each stored row.
        pointer: int32 scalar, the slot the next write starts at.
        fill_count: int32 scalar, the number of written slots (at most
            `memory_size`).

    Examples:

    >>> memory = CrossBatchMemory(memory_size=5, embedding_dim=2)
    >>> memory.enqueue(tf.eye(2), labels=[7, 8], sample_ids=[0, 1])
    >>> int(memory.fill_count.numpy())
    2
    """

    def __init__(self, memory_size, embedding_dim=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(
                f"Invalid memory_size={memory_size!r}: expected a positive integer "
                "(the number of embeddings the memory stores)."
            )
        if embedding_dim is not None and (
            isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1
        ):
            raise ValueError(
                f"Invalid embedding_dim={embedding_dim!r}: expected a positive integer or None."
            )
        self.memory_size = memory_size
        self.embedding_dim = embedding_dim
        if embedding_dim is not None:
            self.build((None, embedding_dim))

    def build(self, input_shape):
        if self.built:
            return
        dim = int(input_shape[-1])
        if self.embedding_dim is not None and dim != self.embedding_dim:
            raise ValueError(
                f"CrossBatchMemory was created with embedding_dim={self.embedding_dim}, "
                f"but it is being built for embeddings of width {dim}."
            )
        self.embedding_dim = dim

        # Each replica keeps its own copy and writes it inside `strategy.run`
        # (see `add_replica_local_weight`); every replica writes the same
        # gathered rows, so the copies stay identical. autocast=False keeps the
        # stored embeddings float32 under a mixed precision policy:
        # similarities to the memory are computed in float32.
        add_replica_local_weight(self, "embeddings", (self.memory_size, dim), "float32", autocast=False)
        add_replica_local_weight(self, "labels", (self.memory_size,), "int32")
        add_replica_local_weight(self, "sample_ids", (self.memory_size,), "int32")
        add_replica_local_weight(self, "pointer", (), "int32")
        add_replica_local_weight(self, "fill_count", (), "int32")
        self.built = True

    def call(self, inputs):
        raise NotImplementedError(
            "CrossBatchMemory is not called on inputs: read `embeddings`, `labels`, "
            "`sample_ids` and `valid_mask()`, and write with `enqueue`."
        )

    def valid_mask(self):
        """Return a bool `[memory_size]` tensor, true for the slots written so far."""
        return tf.range(self.memory_size) < self.fill_count

    def enqueue(self, embeddings, labels, sample_ids):
        """Write a batch into the oldest slots, wrapping around the end of the buffer.

        Inside `strategy.run` with several replicas, each replica passes its
        own rows. The rows of all replicas are gathered in replica order and
        every replica writes that global batch, so all copies of the memory
        receive the same rows in the same slots.

        Args:
            embeddings: float `[batch, embedding_dim]`; stored as float32 and
                detached from any gradient tape.
            labels: integer `[batch]` (a `[batch, 1]` column is accepted).
            sample_ids: integer `[batch]`, the dataset index of each row.

        Raises:
            ValueError: when the shapes, dtypes or the (global) batch size do
                not fit the memory (checked when the shapes are known, that is
                always in eager mode and for fixed-size batches in a traced
                step).
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

        batch_size = embeddings.shape[0]
        for name, tensor in (("labels", labels), ("sample_ids", sample_ids)):
            if batch_size is not None and tensor.shape[0] is not None and tensor.shape[0] != batch_size:
                raise ValueError(
                    f"Expected {name} with {batch_size} entries, one per embedding; "
                    f"received shape {tensor.shape}."
                )
        replicas = num_replicas()
        if batch_size is not None and replicas * batch_size > self.memory_size:
            if replicas == 1:
                received = f"A batch of {batch_size} rows"
            else:
                received = f"A global batch of {replicas * batch_size} rows ({replicas} replicas x {batch_size})"
            raise ValueError(
                f"{received} does not fit a memory of {self.memory_size} slots: "
                "expected memory_size >= global batch size."
            )

        embeddings = all_gather(embeddings)
        labels = all_gather(labels)
        sample_ids = all_gather(sample_ids)
        batch_size = tf.shape(embeddings)[0]
        slots = (self.pointer + tf.range(batch_size)) % self.memory_size
        slots = slots[:, None]
        self.embeddings.assign(tf.tensor_scatter_nd_update(self.embeddings, slots, embeddings))
        self.labels.assign(tf.tensor_scatter_nd_update(self.labels, slots, labels))
        self.sample_ids.assign(tf.tensor_scatter_nd_update(self.sample_ids, slots, sample_ids))
        self.pointer.assign((self.pointer + batch_size) % self.memory_size)
        self.fill_count.assign(tf.minimum(self.fill_count + batch_size, self.memory_size))

    def reset(self):
        """Empty the memory: zero every slot, the pointer and the fill count."""
        for variable in (self.embeddings, self.labels, self.sample_ids, self.pointer, self.fill_count):
            variable.assign(tf.zeros_like(variable))

    def get_config(self):
        config = super().get_config()
        config.update(memory_size=self.memory_size, embedding_dim=self.embedding_dim)
        return config


def as_int32_vector(values, name):
    """Convert integer labels or ids to an int32 vector, rejecting floats and wrong ranks."""
    values = tf.convert_to_tensor(values)
    if not (values.dtype.is_integer):
        raise ValueError(
            f"Expected integer {name}, received dtype {values.dtype.name}. "
            f"Cast {name} to int32 or int64 in the dataset."
        )
    if values.shape.rank == 2 and values.shape[1] == 1:
        values = tf.squeeze(values, axis=1)
    if values.shape.rank != 1:
        raise ValueError(f"Expected {name} of shape [batch] or [batch, 1], received shape {values.shape}.")
    return tf.cast(values, tf.int32)
