import keras
import numpy as np
import pytest

from keras_xbm import XBMModel
from keras_xbm.callbacks import RetrievalEvaluation
from tests.retrieval_reference import brute_force_metrics
from tests.test_retrieval import brute_force_recall


@pytest.mark.filterwarnings("ignore:Learning rate reduction is conditioned:UserWarning")
def test_callback_logs_recall_for_reduce_lr_on_plateau():
    model, x, labels, validation, validation_labels = small_model_and_data()
    evaluation = RetrievalEvaluation(validation, validation_labels, ks=(1, 4), every_n_epochs=2)
    # min_delta 1.0 and patience 0: the second reading of val_recall@1 cannot improve by 1.0, so the rate halves.
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_recall@1", mode="max", factor=0.5, patience=0, min_delta=1.0)
    history = model.fit(x, labels, batch_size=8, epochs=4, verbose=0, callbacks=[evaluation, plateau])

    embeddings = model.predict(validation, verbose=0)
    expected = brute_force_recall(embeddings, validation_labels, (1, 4))
    assert len(history.history["val_recall@1"]) == 2
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(5e-4)
    assert history.history["val_recall@1"][-1] == pytest.approx(expected["recall@1"])
    assert history.history["val_recall@4"][-1] == pytest.approx(expected["recall@4"])


def small_model_and_data():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs = keras.Input((6,))
    network = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    model = XBMModel(network, memory_size=16)
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    x = rng.normal(size=(32, 6)).astype(np.float32)
    labels = np.repeat(np.arange(8), 4)
    validation = rng.normal(size=(20, 6)).astype(np.float32)
    validation_labels = np.repeat(np.arange(5), 4)
    return model, x, labels, validation, validation_labels


class LogRecorder(keras.callbacks.Callback):
    """Record the batch logs a callback placed earlier in the list has written."""

    def __init__(self):
        super().__init__()
        self.batch_logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs or {}))


def test_callback_every_n_steps_logs_all_metrics():
    model, x, labels, validation, validation_labels = small_model_and_data()
    evaluation = RetrievalEvaluation(validation, validation_labels, ks=(1, 4), every_n_steps=3)
    recorder = LogRecorder()
    # 4 steps per epoch, 2 epochs: evaluations after steps 3 and 6.
    history = model.fit(x, labels, batch_size=8, epochs=2, verbose=0, callbacks=[evaluation, recorder])

    assert sorted(evaluation.results_by_step) == [3, 6]
    evaluated = [index for index, logs in enumerate(recorder.batch_logs) if "val_recall@1" in logs]
    assert evaluated == [2, 5]
    assert set(evaluation.results_by_step[6]) == {"val_recall@1", "val_recall@4", "val_map@r", "val_r_precision"}

    embeddings = model.predict(validation, verbose=0)
    expected = brute_force_metrics(embeddings, validation_labels, ks=(1, 4))
    # No step ran after step 6's evaluation in epoch 2, so the epoch logs hold it.
    for key in ("recall@1", "recall@4", "map@r", "r_precision"):
        assert history.history[f"val_{key}"][-1] == pytest.approx(expected[key])
        assert evaluation.results_by_step[6][f"val_{key}"] == pytest.approx(expected[key])


def test_callback_rejects_bad_step_period():
    with pytest.raises(ValueError, match="Invalid every_n_steps=0"):
        RetrievalEvaluation(np.zeros((4, 6)), np.zeros(4), every_n_steps=0)
