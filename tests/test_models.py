import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_xbm import ContrastiveLoss, XBMModel
from tests.test_losses import contrastive_oracle

DIM_IN, DIM_OUT = 6, 4


def linear_network(seed=0):
    """A network without batch statistics, so embeddings do not depend on the batch."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((DIM_IN,))
    return keras.Model(inputs, keras.layers.Dense(DIM_OUT)(inputs))


def make_batches(count, batch_size=4, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for step in range(count):
        x = rng.normal(size=(batch_size, DIM_IN)).astype(np.float32)
        labels = rng.integers(0, 3, size=batch_size).astype(np.int32)
        ids = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int32)
        batches.append((x, labels, ids))
    return batches


def make_model(memory_size=8, warmup_steps=0, learning_rate=0.0, threshold=0.0, jit_compile=False, **kwargs):
    model = XBMModel(
        linear_network(),
        memory_size=memory_size,
        warmup_steps=warmup_steps,
        loss=ContrastiveLoss(negative_threshold=threshold, normalization="sum"),
        **kwargs,
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), jit_compile=jit_compile)
    return model


def train(model, batches):
    logs = []
    for x, labels, ids in batches:
        logs.append(model.train_on_batch(x, {"labels": labels, "sample_ids": ids}, return_dict=True))
    return logs


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_memory_holds_last_batches_exactly():
    model = make_model(memory_size=6)
    batches = make_batches(3)
    train(model, batches)

    # With a learning rate of 0 the stored rows are the network's embeddings.
    # 12 rows written to 6 slots: batch 1 wraps into slots 4, 5, 0, 1, then
    # batch 2 fills slots 2..5, so slots 0..1 keep the end of batch 1.
    expected_rows = np.concatenate([batches[1][0][2:], batches[2][0]])
    expected = unit(model.embedding_model.predict(expected_rows, verbose=0))
    np.testing.assert_allclose(model.memory.embeddings.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(model.memory.sample_ids.numpy(), [6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(
        model.memory.labels.numpy(), np.concatenate([batches[1][1][2:], batches[2][1]])
    )
    assert int(model.memory.pointer.numpy()) == 0
    assert int(model.memory.fill_count.numpy()) == 6


def test_in_batch_pairs_counted_once():
    model = make_model(memory_size=8, threshold=0.0)
    batches = make_batches(2)
    logs = train(model, batches)

    embed = lambda x: unit(model.embedding_model.predict(x, verbose=0))
    q1, q2 = embed(batches[0][0]), embed(batches[1][0])
    (_, l1, ids1), (_, l2, ids2) = batches

    def batch_term(q, labels, ids):
        pos = (labels[:, None] == labels[None, :]) & (ids[:, None] != ids[None, :])
        neg = labels[:, None] != labels[None, :]
        return contrastive_oracle(q @ q.T, pos, neg, 0.0, "sum")[0]

    # Step 2's memory term pairs batch 2 with batch 1 only: batch 2 is written after its loss.
    memory_pos = l2[:, None] == l1[None, :]
    memory_term = contrastive_oracle(q2 @ q1.T, memory_pos, ~memory_pos, 0.0, "sum")[0]
    assert logs[0]["memory_loss"] == pytest.approx(0.0, abs=1e-6)
    assert logs[1]["batch_loss"] == pytest.approx(batch_term(q2, l2, ids2), abs=1e-4)
    assert logs[1]["memory_loss"] == pytest.approx(memory_term, abs=1e-4)
    assert logs[1]["loss"] == pytest.approx(batch_term(q2, l2, ids2) + memory_term, abs=1e-4)


def test_hard_negatives_metric_counts_active_pairs():
    model = make_model(memory_size=8, threshold=0.2)
    batches = make_batches(2)
    logs = train(model, batches)
    q1 = unit(model.embedding_model.predict(batches[0][0], verbose=0))
    q2 = unit(model.embedding_model.predict(batches[1][0], verbose=0))
    l1, l2 = batches[0][1], batches[1][1]
    batch_hard = ((l2[:, None] != l2[None, :]) & (q2 @ q2.T > 0.2)).sum()
    memory_hard = ((l2[:, None] != l1[None, :]) & (q2 @ q1.T > 0.2)).sum()
    assert logs[1]["hard_negatives"] == pytest.approx((batch_hard + memory_hard) / 4, abs=1e-6)


def test_warmup_keeps_memory_term_off_but_fills_memory():
    model = make_model(memory_size=8, warmup_steps=2)
    logs = train(model, make_batches(3))
    assert logs[0]["memory_loss"] == 0.0
    assert logs[1]["memory_loss"] == 0.0
    assert logs[2]["memory_loss"] > 0.0
    assert int(model.train_steps.numpy()) == 3
    assert int(model.memory.fill_count.numpy()) == 8


def test_evaluate_and_predict_leave_memory_untouched():
    model = make_model(memory_size=8, learning_rate=0.1)
    batches = make_batches(3)
    train(model, batches[:2])
    before = [variable.numpy().copy() for variable in model.memory.weights]
    x, labels, ids = batches[2]
    model.evaluate(x, {"labels": labels, "sample_ids": ids}, verbose=0)
    model.predict(x, verbose=0)
    model(x)
    for saved, variable in zip(before, model.memory.weights):
        np.testing.assert_array_equal(saved, variable.numpy())


def test_save_and_restore_weights_restore_memory(tmp_path):
    model = make_model(memory_size=7, learning_rate=0.1)
    train(model, make_batches(3))
    path = str(tmp_path / "xbm.weights.h5")
    model.save_weights(path)

    restored = make_model(memory_size=7, learning_rate=0.1)
    restored.load_weights(path)
    for name in ("embeddings", "labels", "sample_ids", "pointer", "fill_count"):
        np.testing.assert_array_equal(getattr(restored.memory, name).numpy(), getattr(model.memory, name).numpy())
    assert int(restored.memory.pointer.numpy()) == 5
    assert int(restored.train_steps.numpy()) == 3
    for original, loaded in zip(model.embedding_model.weights, restored.embedding_model.weights):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy())


def test_keras_file_round_trip(tmp_path):
    model = make_model(memory_size=8, warmup_steps=5, memory_weight=0.5, learning_rate=0.1)
    train(model, make_batches(2))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, XBMModel)
    assert restored.memory_size == 8
    assert restored.warmup_steps == 5
    assert restored.memory_weight == 0.5
    assert restored.pair_loss.get_config() == model.pair_loss.get_config()
    np.testing.assert_array_equal(restored.memory.sample_ids.numpy(), model.memory.sample_ids.numpy())
    x = make_batches(1, seed=9)[0][0]
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_jit_compile_matches_graph_mode():
    batches = make_batches(4)
    graph_logs = train(make_model(memory_size=8, learning_rate=0.05, jit_compile=False), batches)
    xla_model = make_model(memory_size=8, learning_rate=0.05, jit_compile=True)
    xla_logs = train(xla_model, batches)
    assert xla_model.jit_compile
    for graph, xla in zip(graph_logs, xla_logs):
        for key in ("loss", "batch_loss", "memory_loss", "hard_negatives"):
            assert xla[key] == pytest.approx(graph[key], rel=1e-4, abs=1e-5)


def test_mixed_precision_uses_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model(memory_size=8, learning_rate=0.05)
        logs = train(model, make_batches(3))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.memory.embeddings.dtype == "float32"
    assert all(np.isfinite(log["loss"]) for log in logs)
    assert logs[2]["memory_loss"] > 0


def test_fit_without_sample_ids_and_without_memory():
    x = np.random.default_rng(0).normal(size=(32, DIM_IN)).astype(np.float32)
    labels = np.repeat(np.arange(8), 4)
    with_memory = make_model(memory_size=16, learning_rate=0.01)
    history = with_memory.fit(x, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # Generated ids are negative and distinct.
    ids = with_memory.memory.sample_ids.numpy()
    assert (ids < 0).all()
    assert len(set(ids.tolist())) == 16

    no_memory = make_model(memory_size=0, learning_rate=0.01)
    history = no_memory.fit(x, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert no_memory.memory is None
    assert history.history["memory_loss"] == [0.0]


def test_fit_on_dataset_without_shuffle_warning():
    x = np.random.default_rng(0).normal(size=(32, DIM_IN)).astype(np.float32)
    labels = np.repeat(np.arange(8), 4)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(8)
    model = make_model(memory_size=16, learning_rate=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    messages = [str(warning.message) for warning in caught]
    assert not [message for message in messages if "shuffle" in message], messages


def test_memory_smaller_than_batch_rejected():
    model = make_model(memory_size=2)
    x, labels, ids = make_batches(1)[0]
    with pytest.raises(ValueError, match="batch of 4 rows does not fit a memory of 2 slots"):
        model.train_on_batch(x, {"labels": labels, "sample_ids": ids})


def test_labels_of_wrong_shape_rejected():
    model = make_model()
    x, _, ids = make_batches(1)[0]
    with pytest.raises(ValueError, match=r"Expected labels of shape \[batch\] or \[batch, 1\]"):
        model.train_on_batch(x, {"labels": np.zeros((4, 2), np.int32), "sample_ids": ids})


def test_float_labels_rejected_by_model():
    model = make_model()
    x, _, _ = make_batches(1)[0]
    with pytest.raises(ValueError, match="Expected integer labels, received dtype float32"):
        model.train_on_batch(x, np.zeros(4, np.float32))


def test_network_with_non_2d_output_rejected():
    inputs = keras.Input((5, 3))
    network = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match=r"must output \[batch, dim\] embeddings"):
        XBMModel(network)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"memory_size": -1}, "memory_size=-1"),
        ({"warmup_steps": -5}, "warmup_steps=-5"),
        ({"memory_weight": -0.5}, "memory_weight=-0.5"),
        ({"loss": keras.losses.MeanSquaredError()}, "Expected a keras_xbm.losses.PairLoss"),
    ],
)
def test_invalid_model_arguments_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XBMModel(linear_network(), **kwargs)


def test_loss_in_compile_rejected():
    model = XBMModel(linear_network())
    with pytest.raises(ValueError, match="takes its pair loss in the constructor"):
        model.compile(optimizer="adam", loss=ContrastiveLoss())


def test_unknown_target_keys_rejected():
    model = make_model()
    x, labels, ids = make_batches(1)[0]
    with pytest.raises(ValueError, match="received keys"):
        model.train_on_batch(x, {"labels": labels, "ids": ids})
