import glob
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_xbm import ContrastiveLoss, XBMModel
from keras_xbm.diagnostics import MemoryDrift, PairStatistics, memory_entries, pair_statistics
from tests.test_models import DIM_IN, linear_network, make_batches, train, unit


def rotation_network():
    """Dense(2) without bias: its kernel is set to a rotation, so embeddings turn by a known angle."""
    inputs = keras.Input((2,))
    return keras.Model(inputs, keras.layers.Dense(2, use_bias=False)(inputs))


def set_rotation(model, angle):
    # Row vectors: x @ [[cos, sin], [-sin, cos]] turns x by +angle.
    kernel = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]], np.float32)
    model.embedding_model.set_weights([kernel])


def points(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def attach(callback, model):
    callback.set_model(model)
    return callback


def test_drift_of_rotated_network_ring_buffer():
    model = XBMModel(rotation_network(), memory_size=6)
    images = points(np.linspace(0.0, 2.0, 6))
    # Three steps of two rows, written while the network turned by 0.1, 0.2 and 0.3 rad.
    for step, angle in enumerate((0.1, 0.2, 0.3)):
        set_rotation(model, angle)
        ids = np.array([2 * step, 2 * step + 1], np.int32)
        model.memory.enqueue(model(images[ids]), labels=[0, 1], sample_ids=ids)
    set_rotation(model, 0.5)

    drift = attach(MemoryDrift(images, rows_per_step=2), model)
    record = drift.measure()
    # Stored and fresh embeddings differ by a rotation of 0.5 - angle.
    assert record["ages"] == [0, 1, 2]
    np.testing.assert_allclose(record["similarity"], [math.cos(0.2), math.cos(0.3), math.cos(0.4)], atol=1e-6)
    assert record["counts"] == [2, 2, 2]
    assert record["mean_similarity"] == pytest.approx(np.mean([math.cos(0.2), math.cos(0.3), math.cos(0.4)]), abs=1e-6)


def test_drift_age_bins_and_wrapped_pointer():
    model = XBMModel(rotation_network(), memory_size=6)
    images = points(np.linspace(0.0, 2.0, 8))
    # Four steps of two rows into six slots: step 0 is overwritten by step 3.
    for step, angle in enumerate((0.0, 0.1, 0.2, 0.3)):
        set_rotation(model, angle)
        ids = np.array([2 * step, 2 * step + 1], np.int32)
        model.memory.enqueue(model(images[ids]), labels=[0, 1], sample_ids=ids)
    set_rotation(model, 0.3)

    _, sample_ids, ages = memory_entries(model, rows_per_step=2)
    np.testing.assert_array_equal(sample_ids, [6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(ages, [0, 0, 2, 2, 1, 1])

    record = attach(MemoryDrift(images, rows_per_step=2, age_bin_steps=2), model).measure()
    assert record["ages"] == [0, 2]
    np.testing.assert_allclose(record["similarity"], [(1.0 + math.cos(0.1)) / 2, math.cos(0.2)], atol=1e-6)
    assert record["counts"] == [4, 2]


def test_drift_of_momentum_bank_uses_write_steps():
    model = XBMModel(rotation_network(), memory_size=5, memory_type="momentum-bank", momentum=0.5)
    images = points(np.linspace(0.0, 1.0, 5))
    set_rotation(model, 0.0)
    model.memory.enqueue(model(images[[0, 1]]), labels=[0, 0], sample_ids=[0, 1])
    set_rotation(model, 0.4)
    model.memory.enqueue(model(images[[2]]), labels=[1], sample_ids=[2])
    set_rotation(model, 0.6)

    record = attach(MemoryDrift(images), model).measure()
    # Slot 2 was written at the last write (age 0, turned by 0.4); slots 0, 1 one write before (0.0).
    assert record["ages"] == [0, 1]
    np.testing.assert_allclose(record["similarity"], [math.cos(0.2), math.cos(0.6)], atol=1e-6)
    assert record["counts"] == [1, 2]


def test_drift_callback_during_fit_writes_png(tmp_path):
    model = XBMModel(linear_network(), memory_size=8, loss=ContrastiveLoss(negative_threshold=0.0))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(24, DIM_IN)).astype(np.float32)
    targets = {"labels": np.repeat(np.arange(6), 4).astype(np.int32), "sample_ids": np.arange(24, dtype=np.int32)}
    dataset = tf.data.Dataset.from_tensor_slices((images, targets)).batch(4)
    plot_path = str(tmp_path / "drift.png")
    drift = MemoryDrift(images, every_n_steps=3, plot_path=plot_path, training=True)
    history = model.fit(dataset, epochs=1, verbose=0, callbacks=[drift])

    assert drift.rows_per_step == 4
    assert [record["step"] for record in drift.records] == [3, 6]
    # At step 6 the memory contains steps 5 and 6 (samples 16..23); recompute their drift with numpy.
    fresh = unit(model.embedding_model.predict(images[16:24], verbose=0))
    stored = model.memory.embeddings.numpy()
    order = np.argsort(model.memory.sample_ids.numpy())
    expected = np.sum(stored[order] * fresh, axis=1)
    assert drift.records[-1]["ages"] == [0, 1]
    np.testing.assert_allclose(
        drift.records[-1]["similarity"], [expected[4:].mean(), expected[:4].mean()], atol=1e-5
    )
    # The step moved the network, so even the newest entries differ from fresh embeddings.
    assert drift.records[-1]["similarity"][0] < 0.9999
    assert "loss" in history.history
    with open(plot_path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_drift_rejects_model_without_memory():
    model = XBMModel(linear_network(), memory_size=0)
    model.compile(optimizer="sgd")
    x, labels, _ = make_batches(1)[0]
    with pytest.raises(ValueError, match="needs a model with a memory"):
        model.fit(x, labels, verbose=0, callbacks=[MemoryDrift(x)])


@pytest.mark.parametrize("name, value", [("every_n_steps", 0), ("sample_size", -1), ("age_bin_steps", 1.5)])
def test_drift_rejects_bad_settings(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}={value!r}"):
        MemoryDrift(np.zeros((2, 2)), **{name: value})


def statistics_oracle(similarity, pos, neg, gradient):
    hard = neg & (gradient != 0)
    rows = similarity.shape[0]
    mean = lambda mask: similarity[mask].mean() if mask.any() else float("nan")
    return {
        "positives": pos.sum() / rows,
        "positive_similarity": mean(pos),
        "hard_negatives": hard.sum() / rows,
        "hard_negative_similarity": mean(hard),
    }


def test_pair_statistics_match_numpy():
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, size=(4, 4)).astype(np.float32)
    memory = rng.uniform(-1, 1, size=(4, 6)).astype(np.float32)
    batch_pos = rng.uniform(size=(4, 4)) < 0.3
    memory_pos = rng.uniform(size=(4, 6)) < 0.3
    batch_grad = np.where(batch > 0.2, 1.0, 0.0).astype(np.float32)
    # No hard negative in the memory: its similarity mean is NaN, its count 0.
    memory_grad = np.zeros_like(memory)
    values = pair_statistics(
        [batch, memory], [batch_pos, memory_pos], [~batch_pos, ~memory_pos], [batch_grad, memory_grad]
    )
    for source, args in (("batch", (batch, batch_pos, ~batch_pos, batch_grad)), ("memory", (memory, memory_pos, ~memory_pos, memory_grad))):
        for key, expected in statistics_oracle(*args).items():
            value = float(values[f"{source}_{key}"])
            if np.isnan(expected):
                assert np.isnan(value), f"{source}_{key}"
            else:
                assert value == pytest.approx(expected, abs=1e-6), f"{source}_{key}"
    assert float(values["memory_hard_negatives"]) == 0.0


def test_pair_statistics_callback_history_and_tensorboard(tmp_path):
    model = XBMModel(linear_network(), memory_size=8, loss=ContrastiveLoss(negative_threshold=0.2, normalization="sum"))
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    batches = make_batches(3)
    # Pairs of classes: each query has exactly one positive in its batch.
    batches = [(x, np.array([0, 0, 1, 1], np.int32), ids) for x, _, ids in batches]
    x = np.concatenate([b[0] for b in batches])
    targets = {"labels": np.concatenate([b[1] for b in batches]), "sample_ids": np.concatenate([b[2] for b in batches])}
    dataset = tf.data.Dataset.from_tensor_slices((x, targets)).batch(4)
    log_dir = str(tmp_path / "tensorboard")
    statistics = PairStatistics(log_dir=log_dir)
    history = model.fit(dataset, epochs=1, verbose=0, callbacks=[statistics])

    assert statistics.history["batch_positives"] == [1.0, 1.0, 1.0]
    # Step 1 scores against 4 stored rows, 2 of each label, and step 2 against 8.
    assert statistics.history["memory_positives"] == [0.0, 2.0, 4.0]
    q = unit(model.embedding_model.predict(x, verbose=0))
    labels = targets["labels"]
    similarity = q[8:] @ q[:8].T
    neg = labels[8:, None] != labels[None, :8]
    hard = neg & (similarity > 0.2)
    assert statistics.history["memory_hard_negatives"][2] == pytest.approx(hard.sum() / 4, abs=1e-6)
    if hard.any():
        assert statistics.history["memory_hard_negative_similarity"][2] == pytest.approx(similarity[hard].mean(), abs=1e-5)
    pos = ~neg
    assert statistics.history["memory_positive_similarity"][2] == pytest.approx(similarity[pos].mean(), abs=1e-5)
    # The epoch mean goes into fit's history; the step with no memory yet is skipped by nanmean.
    assert history.history["memory_positives"] == [pytest.approx(2.0)]
    assert model.report_pair_statistics is False

    events = glob.glob(f"{log_dir}/events.out.tfevents.*")
    assert len(events) == 1
    recorded = {}
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
            recorded.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    assert recorded["pair_statistics/memory_positives"] == [(0, 0.0), (1, 2.0), (2, 4.0)]
    assert recorded["pair_statistics/batch_positives"] == [(0, 1.0), (1, 1.0), (2, 1.0)]


def test_pair_statistics_rejects_other_models():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    with pytest.raises(ValueError, match="needs a keras_xbm.XBMModel"):
        PairStatistics().set_model(model)


def test_logs_without_pair_statistics_unchanged():
    model = XBMModel(linear_network(), memory_size=8)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = train(model, make_batches(1))
    assert sorted(logs[0]) == ["batch_loss", "hard_negatives", "loss", "memory_loss"]
