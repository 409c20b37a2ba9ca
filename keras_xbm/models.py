"""`XBMModel`: a Keras model that trains an embedding network with a cross-batch memory."""

import inspect
import logging

import keras
import tensorflow as tf

from keras_xbm.diagnostics import pair_statistics
from keras_xbm.distributed import (
    add_replica_local_weight,
    all_gather,
    check_global_batch,
    num_replicas,
    replica_row_offset,
    scale_loss_for_distribution,
    static_batch_size,
    sum_over_replicas,
)
from keras_xbm.losses import ContrastiveLoss, PairLoss
from keras_xbm.memory import CrossBatchMemory, as_int32_vector
from keras_xbm.momentum import MomentumBank, MomentumEncoder, resolve_momentum
from keras_xbm.pairs import cosine_similarity, pair_masks

logger = logging.getLogger(__name__)

# Generated sample ids count down from -1 and wrap here, far beyond any memory size.
GENERATED_ID_PERIOD = 2**30


@keras.saving.register_keras_serializable(package="keras_xbm")
class XBMModel(keras.Model):
    """Train an embedding network with a pair loss over the batch and a cross-batch memory.

    Each training step:

    1. embeds the batch and L2-normalises it (the queries);
    2. computes the batch term: the pair loss of the queries against the batch
       itself, each pair of distinct samples counted in both directions
       (`(i, j)` and `(j, i)` are two rows of the similarity matrix);
    3. after `warmup_steps` steps, computes the memory term: the same pair loss
       of the queries against the valid memory slots. The memory contains earlier
       batches only, because the current batch is written after the loss, so
       each in-batch pair is counted once, in the batch term;
    4. applies the gradient of `batch_loss + memory_weight * memory_loss`
       (plus any regularisation losses of the network);
    5. writes the detached queries, their labels and sample ids into the
       memory. Writing starts at step 0, so the memory is already full of
       recent embeddings when the memory term switches on.

    Only `train_step` writes the memory: `evaluate` scores the batch term alone
    and `predict` returns embeddings, and neither touches the memory.

    Under a `tf.distribute` strategy (create the model in `strategy.scope()`),
    each replica embeds its slice of the global batch, gathers the queries,
    labels and sample ids of all replicas in replica order, scores its own
    queries against the whole global batch and the memory, and writes the
    whole global batch into its copy of the memory. The loss is normalised
    with counts summed over the replicas and scaled as Keras scales a
    replica's loss, so the losses, gradients and memory equal those of one
    device fed the same global batches. A pair loss whose `pair_loss` takes
    no `global_count` is computed on the whole global batch by every replica
    instead (see `splits_pair_loss`). `docs/distributed.md` has the details.

    Data: `fit` takes elements `(images, labels)` or
    `(images, {"labels": labels, "sample_ids": sample_ids})`, with integer
    `labels` and `sample_ids` of shape `[batch]`. The sample id is the index of
    the image in the dataset: a query is never paired with a stored row of the
    same id, so neither with itself nor with a stale copy of itself from an
    earlier epoch. Without sample ids every row gets a fresh id, so only the
    in-batch self pair is removed and stale copies in the memory count as
    positives.

    Args:
        embedding_model: a Keras model mapping a batch of inputs to
            `[batch, dim]` embeddings. Its output is L2-normalised by `call`.
        memory_size: number of memory slots. 0 turns the memory off (the batch
            term alone). Defaults to 2048.
        loss: a `keras_xbm.losses.PairLoss`. Defaults to `ContrastiveLoss()`.
        warmup_steps: steps trained on the batch term alone before the memory
            term switches on. Defaults to 0.
        memory_weight: weight of the memory term. Defaults to 1.0.
        memory_type: what the memory stores (see `keras_xbm.momentum`).
            `"fifo"` (the default) enqueues the detached queries in a ring
            buffer. `"momentum-encoder"` enqueues the batch as embedded by an
            exponential moving average copy of the network, updated after each
            optimizer step. `"momentum-bank"` keeps one slot per training
            sample, blended by momentum each time the sample comes again; then
            `memory_size` is the number of training samples, and the data must
            give sample ids in `[0, memory_size)`.
        momentum: the momentum `m` in [0, 1) of the momentum forms. Defaults to
            `None`: 0.99 for the encoder, 0.5 for the bank. Rejected for
            `"fifo"`.

    Metrics reported by `fit`: `loss`, `batch_loss`, `memory_loss` (0 during
    warm-up) and `hard_negatives`, the mean number of negative pairs per query
    that receive a gradient, from the batch and the memory together.

    Examples:

    >>> network = keras_xbm.backbones.small_cnn(input_shape=(32, 32, 1), embedding_dim=64)
    >>> model = XBMModel(network, memory_size=1024, warmup_steps=100)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> model.fit(dataset, epochs=1, steps_per_epoch=500)
    """

    def __init__(
        self,
        embedding_model,
        memory_size=2048,
        loss=None,
        warmup_steps=0,
        memory_weight=1.0,
        memory_type="fifo",
        momentum=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
            raise ValueError(
                f"Invalid memory_size={memory_size!r}: expected a non-negative integer (0 turns the memory off)."
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps={warmup_steps!r}: expected a non-negative integer.")
        if float(memory_weight) < 0:
            raise ValueError(f"Invalid memory_weight={memory_weight!r}: expected a non-negative number.")
        momentum = resolve_momentum(memory_type, momentum)
        if memory_type != "fifo" and memory_size == 0:
            raise ValueError(f"memory_type={memory_type!r} needs a memory: expected memory_size > 0, received 0.")
        loss = ContrastiveLoss() if loss is None else loss
        if not isinstance(loss, PairLoss):
            raise ValueError(
                f"Expected a keras_xbm.losses.PairLoss as loss, received {loss!r}. "
                "Keras losses of (y_true, y_pred) cannot score pairs against the memory."
            )

        self.embedding_model = embedding_model
        self.memory_size = memory_size
        self.pair_loss = loss
        self.warmup_steps = warmup_steps
        self.memory_weight = float(memory_weight)
        self.memory_type = memory_type
        self.momentum = momentum
        if memory_type == "momentum-bank":
            self.memory = MomentumBank(memory_size, momentum=momentum, name="memory")
        else:
            self.memory = CrossBatchMemory(memory_size, name="memory") if memory_size > 0 else None
        if memory_type == "momentum-encoder":
            self.momentum_encoder = MomentumEncoder(embedding_model, momentum=momentum, name="momentum_encoder")
        else:
            self.momentum_encoder = None
        # Set by `keras_xbm.diagnostics.PairStatistics`: adds per-step pair statistics to the logs.
        self.report_pair_statistics = False

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.batch_loss_tracker = keras.metrics.Mean(name="batch_loss")
        self.memory_loss_tracker = keras.metrics.Mean(name="memory_loss")
        self.hard_negatives_tracker = keras.metrics.Mean(name="hard_negatives")

        # Built now when the network's input shape is known, so that
        # `load_weights` works on a fresh model before any call.
        if getattr(embedding_model, "built", False) and getattr(embedding_model, "inputs", None):
            self.build(embedding_model.inputs[0].shape)

    def build(self, input_shape):
        if self.built:
            return
        if not self.embedding_model.built:
            self.embedding_model.build(input_shape)
        output_shape = self.embedding_model.compute_output_shape(input_shape)
        if len(output_shape) != 2:
            raise ValueError(
                f"The embedding model must output [batch, dim] embeddings; its output shape is {output_shape}."
            )
        if self.memory is not None:
            self.memory.build(output_shape)
        if self.momentum_encoder is not None:
            self.momentum_encoder.build(input_shape)
        # Every replica advances its own copies by the same amounts.
        add_replica_local_weight(self, "train_steps", (), "int32")
        add_replica_local_weight(self, "next_generated_id", (), "int32")
        self.built = True

    def call(self, inputs, training=False):
        embeddings = self.embedding_model(inputs, training=training)
        return tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        if loss is not None:
            raise ValueError(
                "XBMModel takes its pair loss in the constructor, XBMModel(network, loss=...), "
                f"not in compile(); received loss={loss!r}."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        # Keras skips compiling a loaded model whose compile() is overridden; this one only rejects `loss`.
        config = keras.saving.deserialize_keras_object(config)
        config.pop("loss", None)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
        # Checked here because Keras' own input handling fails first, with an
        # unrelated shape error, on a batch that does not split evenly.
        check_global_batch(static_batch_size(x, batch_size), self.distribute_strategy.num_replicas_in_sync)
        # Keras ignores `shuffle` for a tf.data.Dataset, whose pipeline sets the order, but
        # warns when it keeps its default of True. `shuffle` is the sixth argument after `batch_size`.
        if isinstance(x, tf.data.Dataset) and len(args) < 6:
            kwargs.setdefault("shuffle", False)
        return super().fit(x, y, batch_size, *args, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # NOTE: Keras 3.15 reduces the first distributed batch with
        # `strategy.reduce`, which raises under MultiWorkerMirroredStrategy
        # (with TensorFlow 2.20) for any model. The build needs shapes only, and
        # the first local replica's slice has them.
        strategy = self._distribute_strategy
        if iterator is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):

            def first_replica(value):
                if isinstance(value, tf.distribute.DistributedValues):
                    return strategy.experimental_local_results(value)[0]
                return value

            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(first_replica, next(batches))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.batch_loss_tracker,
            self.memory_loss_tracker,
            self.hard_negatives_tracker,
        ]

    def unpack_targets(self, data):
        """Split a dataset element into `(inputs, labels, sample_ids)`; ids may be `None`."""
        inputs, targets, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(
                "XBMModel does not take sample weights: a pair loss weights pairs, not samples. "
                "Pass elements (images, labels) or (images, {'labels': ..., 'sample_ids': ...})."
            )
        if targets is None:
            raise ValueError(
                "XBMModel needs labels to train: pass elements (images, labels) or "
                "(images, {'labels': ..., 'sample_ids': ...})."
            )
        if isinstance(targets, dict):
            unknown = set(targets) - {"labels", "sample_ids"}
            if "labels" not in targets or unknown:
                raise ValueError(
                    "Expected targets {'labels': ..., 'sample_ids': ...}; "
                    f"received keys {sorted(targets)}."
                )
            labels = as_int32_vector(targets["labels"], "labels")
            sample_ids = targets.get("sample_ids")
            if sample_ids is not None:
                sample_ids = as_int32_vector(sample_ids, "sample_ids")
            return inputs, labels, sample_ids
        return inputs, as_int32_vector(targets, "labels"), None

    def generate_sample_ids(self, batch_size):
        """Give each row a negative id not used by any row still in the memory."""
        offsets = (self.next_generated_id + tf.range(batch_size)) % GENERATED_ID_PERIOD
        self.next_generated_id.assign((self.next_generated_id + batch_size) % GENERATED_ID_PERIOD)
        return -1 - offsets

    def gather_batch(self, queries, labels, sample_ids, training=True):
        """Gather the global batch in replica order and return it with this replica's sample ids.

        Returns `(all_queries, all_labels, all_sample_ids, sample_ids)`. On one
        replica the global batch is the replica's own. Without sample ids each
        row of the global batch gets a fresh id (from the generated-id counter
        when training, so that memory rows keep distinct ids), and the replica
        takes its own rows' ids from those.
        """
        all_queries = all_gather(queries)
        all_labels = all_gather(labels)
        if sample_ids is not None:
            return all_queries, all_labels, all_gather(sample_ids), sample_ids

        global_size = tf.shape(all_labels)[0]
        if training:
            all_ids = self.generate_sample_ids(global_size)
        else:
            all_ids = -1 - tf.range(global_size)
        local_size = tf.shape(labels)[0]
        offset = replica_row_offset(local_size)
        return all_queries, all_labels, all_ids, tf.slice(all_ids, [offset], [local_size])

    def splits_pair_loss(self):
        """Return whether each replica scores its own queries only (always true on one replica).

        That needs a pair loss whose `pair_loss` takes `global_count` (see
        `replica_pair_loss`). For any other pair loss every replica scores the
        whole gathered batch. The result is as exact, but every replica then
        computes the whole pair loss.
        """
        if num_replicas() == 1:
            return True
        return "global_count" in inspect.signature(self.pair_loss.pair_loss).parameters

    def anchor_rows(self, local_rows, global_rows):
        """Return the `(queries, labels, sample_ids)` this replica scores against the references."""
        return local_rows if self.splits_pair_loss() else global_rows

    def replica_pair_loss(self, similarity, pos_mask, neg_mask):
        """Return this replica's pair loss: its mean over the replicas is the loss of the global batch.

        On one replica, or when every replica scores the whole global batch,
        this is `pair_loss`. When each of the R replicas scores its own query
        rows, the pair loss divides by counts summed over the replicas
        (`global_count`), so the R shares add up to the loss of the global
        batch. The method returns R times the share, because Keras' trainer
        expects a replica's loss at that scale and divides it by R.
        """
        replicas = num_replicas()
        if replicas == 1 or not self.splits_pair_loss():
            return self.pair_loss.pair_loss(similarity, pos_mask, neg_mask)
        share = self.pair_loss.pair_loss(similarity, pos_mask, neg_mask, global_count=sum_over_replicas)
        return replicas * share

    def memory_pairs(self, queries, labels, sample_ids):
        """Return `(similarity, pos_mask, neg_mask)` of the queries against the memory."""
        similarity = cosine_similarity(queries, self.memory.embeddings)
        pos_mask, neg_mask = pair_masks(
            labels,
            self.memory.labels,
            sample_ids,
            self.memory.sample_ids,
            ref_valid=self.memory.valid_mask(),
        )
        return similarity, pos_mask, neg_mask

    def write_memory(self, inputs, queries, labels, sample_ids):
        """Store the step's batch in the memory, after the optimizer step.

        The plain memory and the momentum bank store the detached queries.
        With a momentum encoder, the encoder first moves towards the updated
        network, then embeds `inputs`, and its embeddings are stored instead.

        Under `tf.distribute` every replica calls this with its own rows. A
        memory must then gather the rows of all replicas in replica order with
        `keras_xbm.distributed.all_gather` and write them all, so that every
        replica's copy receives the same rows. `CrossBatchMemory.enqueue`
        gathers them itself.
        """
        if self.memory_type != "fifo" and num_replicas() > 1:
            # NOTE: the momentum forms do not gather rows across replicas yet.
            raise ValueError(
                f"memory_type={self.memory_type!r} trains on one replica only, but the strategy has "
                f"{num_replicas()} replicas: use memory_type='fifo' or a single device."
            )
        if self.momentum_encoder is not None:
            self.momentum_encoder.update(self.embedding_model)
            queries = self.momentum_encoder(inputs, training=True)
        self.memory.enqueue(queries, labels, sample_ids)

    def make_train_function(self, force=False):
        # A compiled step cannot raise on a sample id out of the bank's range
        # (XLA drops assertions), so the bank records it and the host raises.
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=True)
        if isinstance(self.memory, MomentumBank):
            step_function = self.train_function

            def checked_step_function(iterator):
                logs = step_function(iterator)
                self.memory.raise_on_invalid_id()
                return logs

            self.train_function = checked_step_function
        return self.train_function

    def metric_results(self, metrics):
        """Return `{name: result}` of `metrics`, the logs of a step."""
        results = {metric.name: metric.result() for metric in metrics}
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # NOTE: Keras 3.15 averages step outputs over workers with
            # `strategy.reduce("MEAN", value, axis=0)`, which needs rank 1.
            results = {name: tf.reshape(value, [1]) for name, value in results.items()}
        return results

    def train_step(self, data):
        inputs, labels, sample_ids = self.unpack_targets(data)

        with tf.GradientTape() as tape:
            # The first call builds the model, and with it the step counters read below.
            queries = self(inputs, training=True)
            if sample_ids is None and getattr(self.memory, "requires_sample_ids", False):
                raise ValueError(
                    f"memory_type={self.memory_type!r} stores one slot per training sample and needs "
                    "sample ids: pass elements (images, {'labels': ..., 'sample_ids': ...}) with the "
                    "index of each image in the dataset (keras_xbm.data.pk_dataset yields them)."
                )
            all_queries, all_labels, all_ids, sample_ids = self.gather_batch(queries, labels, sample_ids)
            anchors, anchor_labels, anchor_ids = self.anchor_rows(
                (queries, labels, sample_ids), (all_queries, all_labels, all_ids)
            )
            memory_on = tf.cast(self.train_steps >= self.warmup_steps, tf.float32)
            batch_similarity = cosine_similarity(anchors, all_queries)
            batch_pos, batch_neg = pair_masks(anchor_labels, all_labels, anchor_ids, all_ids)
            batch_loss = self.replica_pair_loss(batch_similarity, batch_pos, batch_neg)
            similarities = [batch_similarity]
            negative_masks = [batch_neg]
            positive_masks = [batch_pos]

            memory_loss = tf.zeros((), tf.float32)
            if self.memory is not None:
                memory_similarity, memory_pos, memory_neg = self.memory_pairs(anchors, anchor_labels, anchor_ids)
                memory_loss = memory_on * self.replica_pair_loss(memory_similarity, memory_pos, memory_neg)
                similarities.append(memory_similarity)
                negative_masks.append(memory_neg)
                positive_masks.append(memory_pos)

            loss = batch_loss + self.memory_weight * memory_loss
            if self.losses:
                loss = loss + tf.add_n([tf.cast(extra, tf.float32) for extra in self.losses])
            scaled_loss = self.optimizer.scale_loss(scale_loss_for_distribution(loss))

        trainable_weights = self.trainable_weights
        gradients = tape.gradient(scaled_loss, trainable_weights + similarities)
        self.optimizer.apply_gradients(zip(gradients[: len(trainable_weights)], trainable_weights))

        # A negative pair is "hard" when the loss sends a gradient through it.
        hard_negatives = tf.add_n(
            [
                tf.reduce_sum(tf.cast(tf.logical_and(mask, tf.not_equal(grad, 0.0)), tf.float32))
                for mask, grad in zip(negative_masks, gradients[len(trainable_weights) :])
            ]
        )
        # Replicas hold equal slices (see `fit`), so the mean over replicas is the global mean.
        num_queries = tf.cast(tf.shape(anchors)[0], tf.float32)

        if self.memory is not None:
            self.write_memory(inputs, queries, labels, sample_ids)
        self.train_steps.assign_add(1)

        self.loss_tracker.update_state(loss)
        self.batch_loss_tracker.update_state(batch_loss)
        self.memory_loss_tracker.update_state(memory_loss)
        self.hard_negatives_tracker.update_state(hard_negatives / num_queries)
        logs = self.metric_results(self.metrics)
        if self.report_pair_statistics:
            statistics = pair_statistics(similarities, positive_masks, negative_masks, gradients[len(trainable_weights) :])
            logs.update({name: tf.reshape(value, tf.shape(logs["loss"])) for name, value in statistics.items()})
        return logs

    def test_step(self, data):
        inputs, labels, sample_ids = self.unpack_targets(data)
        queries = self(inputs, training=False)
        all_queries, all_labels, all_ids, sample_ids = self.gather_batch(queries, labels, sample_ids, training=False)
        anchors, anchor_labels, anchor_ids = self.anchor_rows(
            (queries, labels, sample_ids), (all_queries, all_labels, all_ids)
        )
        similarity = cosine_similarity(anchors, all_queries)
        pos_mask, neg_mask = pair_masks(anchor_labels, all_labels, anchor_ids, all_ids)
        batch_loss = self.replica_pair_loss(similarity, pos_mask, neg_mask)
        self.loss_tracker.update_state(batch_loss)
        self.batch_loss_tracker.update_state(batch_loss)
        return self.metric_results([self.loss_tracker, self.batch_loss_tracker])

    def get_config(self):
        config = super().get_config()
        config.update(
            embedding_model=keras.saving.serialize_keras_object(self.embedding_model),
            memory_size=self.memory_size,
            loss=keras.saving.serialize_keras_object(self.pair_loss),
            warmup_steps=self.warmup_steps,
            memory_weight=self.memory_weight,
            memory_type=self.memory_type,
            momentum=self.momentum,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embedding_model"] = keras.saving.deserialize_keras_object(config["embedding_model"])
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)
