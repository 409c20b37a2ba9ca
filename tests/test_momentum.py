import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_xbm import ContrastiveLoss, XBMModel
from keras_xbm.losses import PairLoss
from keras_xbm.momentum import MomentumBank, MomentumEncoder, check_momentum, resolve_momentum
from tests.test_losses import contrastive_oracle
from tests.test_models import DIM_IN, linear_network, make_batches, train, unit


def make_model(memory_type, memory_size=8, momentum=None, learning_rate=0.1, warmup_steps=0, threshold=0.0,
               jit_compile=False, loss=None):
    model = XBMModel(
        linear_network(),
        memory_size=memory_size,
        warmup_steps=warmup_steps,
        loss=loss or ContrastiveLoss(negative_threshold=threshold, normalization="sum"),
        memory_type=memory_type,
        momentum=momentum,
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), jit_compile=jit_compile)
    return model


def dense_weights(network):
    kernel, bias = (variable.numpy().copy() for variable in network.weights)
    return kernel, bias


def embed(weights, x):
    kernel, bias = weights
    return unit(x @ kernel + bias)


def train_recording_weights(model, batches):
    """Train batch by batch; return the logs and the online weights before and after each step."""
    logs, before, after = [], [], []
    for x, labels, ids in batches:
        before.append(dense_weights(model.embedding_model))
        logs.append(model.train_on_batch(x, {"labels": labels, "sample_ids": ids}, return_dict=True))
        after.append(dense_weights(model.embedding_model))
    return logs, before, after


# Momentum encoder


def test_encoder_update_is_exact_moving_average():
    online = linear_network(seed=0)
    encoder = MomentumEncoder(online, momentum=0.9)
    start = dense_weights(online)
    encoder.update(online)
    # The first update copies the online weights.
    for average, value in zip(dense_weights(encoder.network), start):
        np.testing.assert_allclose(average, value, atol=1e-7)

    online.set_weights([w + 1.0 for w in start])
    encoder.update(online)
    for average, value in zip(dense_weights(encoder.network), start):
        np.testing.assert_allclose(average, 0.9 * value + 0.1 * (value + 1.0), atol=1e-6)
    assert int(encoder.updates.numpy()) == 2
    assert all(not variable.trainable for variable in encoder.network.weights)


def test_encoder_feeds_memory_with_average_weights():
    model = make_model("momentum-encoder", memory_size=12, momentum=0.8)
    batches = make_batches(3)
    _, _, after = train_recording_weights(model, batches)

    # EMA of the online weights after each optimizer step; the first update copies.
    averages = [after[0]]
    for weights in after[1:]:
        averages.append(tuple(0.8 * a + 0.2 * w for a, w in zip(averages[-1], weights)))
    for average, value in zip(dense_weights(model.momentum_encoder.network), averages[-1]):
        np.testing.assert_allclose(average, value, atol=1e-6)

    expected = np.concatenate([embed(average, x) for average, (x, _, _) in zip(averages, batches)])
    np.testing.assert_allclose(model.memory.embeddings.numpy(), expected, atol=1e-5)
    assert model.trainable_weights == model.embedding_model.trainable_weights


def test_encoder_queries_come_from_online_network():
    model = make_model("momentum-encoder", memory_size=12, momentum=0.5)
    batches = make_batches(3)
    logs, before, after = train_recording_weights(model, batches)

    keys = [embed(after[0], batches[0][0])]
    average = after[0]
    average = tuple(0.5 * a + 0.5 * w for a, w in zip(average, after[1]))
    keys.append(embed(average, batches[1][0]))

    x3, labels3, _ = batches[2]
    queries = embed(before[2], x3)
    references = np.concatenate(keys)
    ref_labels = np.concatenate([batches[0][1], batches[1][1]])
    pos = labels3[:, None] == ref_labels[None, :]
    expected = contrastive_oracle(queries @ references.T, pos, ~pos, 0.0, "sum")[0]
    assert logs[2]["memory_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


# Per-sample bank


def test_bank_first_write_stores_then_blends():
    bank = MomentumBank(5, momentum=0.75, embedding_dim=2)
    bank.enqueue(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), labels=[3, 4], sample_ids=[1, 3])
    np.testing.assert_array_equal(bank.valid_mask().numpy(), [False, True, False, True, False])
    np.testing.assert_allclose(bank.embeddings.numpy()[[1, 3]], [[1.0, 0.0], [0.0, 1.0]])

    bank.enqueue(np.array([[0.0, 1.0]], np.float32), labels=[3], sample_ids=[1])
    # 0.75 * (1, 0) + 0.25 * (0, 1), normalised: (3, 1) / sqrt(10).
    np.testing.assert_allclose(bank.embeddings.numpy()[1], np.array([3.0, 1.0]) / math.sqrt(10.0), atol=1e-6)
    np.testing.assert_allclose(bank.embeddings.numpy()[3], [0.0, 1.0])
    np.testing.assert_array_equal(bank.labels.numpy(), [0, 3, 0, 4, 0])
    np.testing.assert_array_equal(bank.entry_ages().numpy(), [-1, 0, -1, 1, -1])
    assert int(bank.fill_count.numpy()) == 2


def bank_oracle(num_slots, momentum, writes):
    """Loop-by-loop numpy bank: writes is a list of (embeddings, ids)."""
    slots = np.zeros((num_slots, writes[0][0].shape[1]))
    written = np.zeros(num_slots, bool)
    for embeddings, ids in writes:
        for row, sample_id in zip(embeddings, ids):
            if written[sample_id]:
                mixed = momentum * slots[sample_id] + (1.0 - momentum) * row
                slots[sample_id] = mixed / np.linalg.norm(mixed)
            else:
                slots[sample_id] = row
            written[sample_id] = True
    return slots, written


@settings(max_examples=25, deadline=None)
@given(
    momentum=st.floats(0.0, 0.99),
    seed=st.integers(0, 10_000),
    num_writes=st.integers(1, 5),
)
def test_bank_matches_numpy_oracle(momentum, seed, num_writes):
    rng = np.random.default_rng(seed)
    writes = []
    for _ in range(num_writes):
        ids = rng.choice(6, size=3, replace=False)
        writes.append((unit(rng.normal(size=(3, 4))).astype(np.float32), ids.astype(np.int32)))
    bank = MomentumBank(6, momentum=momentum, embedding_dim=4)
    for embeddings, ids in writes:
        bank.enqueue(embeddings, labels=np.zeros(3, np.int32), sample_ids=ids)
    slots, written = bank_oracle(6, momentum, writes)
    np.testing.assert_array_equal(bank.valid_mask().numpy(), written)
    np.testing.assert_allclose(bank.embeddings.numpy(), slots, atol=1e-5)


def test_bank_in_model_blends_queries():
    model = make_model("momentum-bank", memory_size=8, momentum=0.6)
    batches = make_batches(2)
    # Step 2 revisits samples 0..3 of step 1.
    x2, labels2, _ = batches[1]
    batches[1] = (x2, batches[0][1], batches[0][2])
    _, before, _ = train_recording_weights(model, batches)

    writes = [(embed(weights, x), ids) for weights, (x, _, ids) in zip(before, batches)]
    slots, written = bank_oracle(8, 0.6, writes)
    np.testing.assert_array_equal(model.memory.valid_mask().numpy(), written)
    np.testing.assert_allclose(model.memory.embeddings.numpy(), slots, atol=1e-5)


def test_bank_memory_term_skips_unwritten_slots_and_self():
    model = make_model("momentum-bank", memory_size=16, learning_rate=0.0)
    batches = make_batches(2)
    logs = train(model, batches)
    (x1, l1, _), (x2, l2, _) = batches
    weights = dense_weights(model.embedding_model)
    q1, q2 = embed(weights, x1), embed(weights, x2)
    assert logs[0]["memory_loss"] == 0.0
    # Only slots 0..3 (batch 1) are written when step 2 computes its loss.
    pos = l2[:, None] == l1[None, :]
    expected = contrastive_oracle(q2 @ q1.T, pos, ~pos, 0.0, "sum")[0]
    assert logs[1]["memory_loss"] == pytest.approx(expected, abs=1e-4)


# Both forms


FORMS = ["momentum-encoder", "momentum-bank"]


@pytest.mark.parametrize("memory_type", FORMS)
def test_warmup_keeps_memory_term_off(memory_type):
    model = make_model(memory_type, memory_size=16, warmup_steps=2)
    logs = train(model, make_batches(3))
    assert [log["memory_loss"] for log in logs[:2]] == [0.0, 0.0]
    assert logs[2]["memory_loss"] > 0.0
    assert int(model.memory.fill_count.numpy()) == 12


@pytest.mark.parametrize("memory_type", FORMS)
def test_save_and_load_weights_restore_state_exactly(memory_type, tmp_path):
    batches = make_batches(4)
    model = make_model(memory_type, memory_size=16, momentum=0.7)
    train(model, batches[:3])
    path = str(tmp_path / "xbm.weights.h5")
    model.save_weights(path)

    restored = make_model(memory_type, memory_size=16, momentum=0.7)
    restored.load_weights(path)
    assert len(restored.weights) == len(model.weights)
    for original, loaded in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(loaded.numpy(), original.numpy(), err_msg=original.path)
    if memory_type == "momentum-encoder":
        assert int(restored.momentum_encoder.updates.numpy()) == 3
    else:
        np.testing.assert_array_equal(restored.memory.last_write.numpy()[:12], np.repeat([0, 1, 2], 4))

    # Training goes on from the restored state exactly as from the original.
    # SGD without momentum has no optimizer state to restore.
    resumed = train(restored, batches[3:])
    continued = train(model, batches[3:])
    for key in ("loss", "memory_loss"):
        assert resumed[0][key] == pytest.approx(continued[0][key], abs=1e-6)


@pytest.mark.parametrize("memory_type", FORMS)
def test_keras_file_round_trip(memory_type, tmp_path):
    model = make_model(memory_type, memory_size=16, momentum=0.7)
    train(model, make_batches(2))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.memory_type == memory_type
    assert restored.momentum == 0.7
    np.testing.assert_array_equal(restored.memory.embeddings.numpy(), model.memory.embeddings.numpy())


@pytest.mark.parametrize("memory_type", FORMS)
def test_jit_compile_matches_graph_mode(memory_type):
    batches = make_batches(4)
    graph_model = make_model(memory_type, memory_size=16, momentum=0.7)
    graph_logs = train(graph_model, batches)
    xla_model = make_model(memory_type, memory_size=16, momentum=0.7, jit_compile=True)
    xla_logs = train(xla_model, batches)
    assert xla_model.jit_compile
    for graph, xla in zip(graph_logs, xla_logs):
        for key in ("loss", "batch_loss", "memory_loss", "hard_negatives"):
            assert xla[key] == pytest.approx(graph[key], rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(xla_model.memory.embeddings.numpy(), graph_model.memory.embeddings.numpy(), atol=1e-5)


class MeanPositiveDistance(PairLoss):
    """A minimal pair loss outside ContrastiveLoss: the mean of 1 - S over positive pairs."""

    def pair_loss(self, similarity, pos_mask, neg_mask):
        weights = tf.cast(pos_mask, tf.float32)
        return tf.math.divide_no_nan(tf.reduce_sum((1.0 - similarity) * weights), tf.reduce_sum(weights))


@pytest.mark.parametrize("memory_type", FORMS)
@pytest.mark.parametrize(
    "loss", [ContrastiveLoss(normalization="pairs"), ContrastiveLoss(normalization="anchor"), MeanPositiveDistance()]
)
def test_any_pair_loss_trains(memory_type, loss):
    model = make_model(memory_type, memory_size=16, loss=loss, learning_rate=0.05)
    batches = make_batches(3)
    logs, before, after = train_recording_weights(model, batches)
    assert all(np.isfinite(log["loss"]) for log in logs)

    # Step 1 scores its queries against step 0's stored rows: the bank stored
    # step 0's queries, the encoder its copy of the weights after step 0.
    (x0, l0, _), (x1, l1, _) = batches[:2]
    stored_weights = before[0] if memory_type == "momentum-bank" else after[0]
    similarity = embed(before[1], x1) @ embed(stored_weights, x0).T
    pos = l1[:, None] == l0[None, :]
    expected = float(loss.pair_loss(tf.constant(similarity, tf.float32), pos, ~pos))
    assert logs[1]["memory_loss"] == pytest.approx(expected, abs=1e-4)


# Bad input


@pytest.mark.parametrize("momentum", [1.5, 1.0, -0.1, float("nan"), "0.9", True])
@pytest.mark.parametrize("memory_type", FORMS)
def test_momentum_out_of_range_rejected(memory_type, momentum):
    with pytest.raises(ValueError, match=f"Invalid momentum={momentum!r}"):
        XBMModel(linear_network(), memory_size=8, memory_type=memory_type, momentum=momentum)


def test_momentum_helpers():
    assert check_momentum(0) == 0.0
    assert check_momentum(np.float32(0.5)) == 0.5
    assert resolve_momentum("momentum-encoder", None) == 0.99
    assert resolve_momentum("momentum-bank", None) == 0.5
    assert resolve_momentum("fifo", None) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"memory_type": "fifo", "momentum": 0.9}, "momentum=0.9 was given for the plain FIFO memory"),
        ({"memory_type": "lifo"}, "Unknown memory_type='lifo'"),
        ({"memory_type": "momentum-bank", "memory_size": 0}, "needs a memory: expected memory_size > 0"),
    ],
)
def test_invalid_memory_arguments_rejected(kwargs, message):
    kwargs = {"memory_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        XBMModel(linear_network(), **kwargs)


def test_bank_without_sample_ids_rejected():
    model = make_model("momentum-bank")
    x, labels, _ = make_batches(1)[0]
    with pytest.raises(ValueError, match="needs sample ids"):
        model.train_on_batch(x, labels)


@pytest.mark.parametrize("jit_compile, run_eagerly", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("bad_id", [8, 1000, -2])
def test_bank_id_beyond_size_rejected(jit_compile, run_eagerly, bad_id):
    model = XBMModel(linear_network(), memory_size=8, memory_type="momentum-bank")
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile, run_eagerly=run_eagerly)
    x, labels, _ = make_batches(1)[0]
    good = {"labels": labels, "sample_ids": np.array([0, 1, 2, 3], np.int32)}
    model.train_on_batch(x, good)
    before = model.memory.embeddings.numpy().copy()

    bad = {"labels": labels, "sample_ids": np.array([4, bad_id, 5, 6], np.int32)}
    with pytest.raises(ValueError, match=rf"Sample id {bad_id} is outside the momentum bank of 8 slots"):
        model.train_on_batch(x, bad)
    # The batch holding the bad id wrote nothing, and training goes on.
    np.testing.assert_array_equal(model.memory.embeddings.numpy(), before)
    np.testing.assert_array_equal(model.memory.valid_mask().numpy(), [True] * 4 + [False] * 4)
    model.train_on_batch(x, good)


def test_bank_enqueue_rejects_id_in_eager_mode():
    bank = MomentumBank(3, embedding_dim=2)
    with pytest.raises(ValueError, match="Sample id 3 is outside the momentum bank of 3 slots"):
        bank.enqueue(np.eye(2, dtype=np.float32), labels=[0, 1], sample_ids=[0, 3])


def test_bank_fit_on_dataset_rejects_large_id():
    model = make_model("momentum-bank", memory_size=10, jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, DIM_IN)).astype(np.float32)
    targets = {"labels": np.repeat(np.arange(4), 4).astype(np.int32), "sample_ids": np.arange(16, dtype=np.int32)}
    dataset = tf.data.Dataset.from_tensor_slices((x, targets)).batch(4)
    with pytest.raises(ValueError, match="Sample id 10 is outside the momentum bank of 10 slots"):
        model.fit(dataset, epochs=1, verbose=0)
