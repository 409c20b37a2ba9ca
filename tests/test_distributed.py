"""Training across replicas: one memory, identical on every replica and equal to a single-device run.

The runs on 2 replicas happen in fresh processes (tests/distributed_runs.py),
because TensorFlow fixes its devices when it first runs an operation and this
process has already run some. The tests below compare their results; the
helpers that need no second device are tested in this process.
"""

import json
import os
import pickle
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_xbm import XBMModel, backbones
from keras_xbm.distributed import (
    check_global_batch,
    check_tf_config,
    make_strategy,
    static_batch_size,
    synchronize_batch_norm,
)
from keras_xbm.losses import NORMALIZATIONS, contrastive_loss
from keras_xbm.training import TrainConfig, run_training
from tests.distributed_runs import LINEAR_CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_SCRIPT = os.path.join(REPO, "tests", "distributed_runs.py")
MEMORY_VARIABLES = ("embeddings", "labels", "sample_ids", "pointer", "fill_count")
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def run_script(mode, path, env=None):
    environment = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.Popen(
        [sys.executable, RUNS_SCRIPT, mode, str(path)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process, timeout=900):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    path = tmp_path_factory.mktemp("mirrored") / "results.pkl"
    finish(run_script("mirrored", path))
    with open(path, "rb") as handle:
        return pickle.load(handle)


def free_port():
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


@pytest.fixture(scope="module")
def multi_worker(tmp_path_factory):
    """Two worker processes on this machine, talking over loopback ports."""
    root = tmp_path_factory.mktemp("multi_worker")
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(run_script("multi-worker", root / f"worker{index}.pkl", env={"TF_CONFIG": json.dumps(tf_config)}))
    for process in processes:
        finish(process)
    results = []
    for index in range(2):
        with open(root / f"worker{index}.pkl", "rb") as handle:
            results.append(pickle.load(handle))
    return results


def assert_memory_identical_across_replicas(memory):
    for name in MEMORY_VARIABLES:
        first, *others = memory[name]
        for other in others:
            np.testing.assert_array_equal(first, other, err_msg=name)


def assert_memory_matches(memory, reference):
    for name in ("labels", "sample_ids", "pointer", "fill_count"):
        np.testing.assert_array_equal(memory[name][0], reference[name][0], err_msg=name)
    np.testing.assert_allclose(memory["embeddings"][0], reference["embeddings"][0], **TOLERANCE)


def assert_steps_match(result, reference):
    assert len(result["logs"]) == len(reference["logs"])
    for step, (logs, expected) in enumerate(zip(result["logs"], reference["logs"])):
        for key, value in expected.items():
            np.testing.assert_allclose(logs[key], value, **TOLERANCE, err_msg=f"step {step} {key}")
    for step, (gradients, expected) in enumerate(zip(result["gradients"], reference["gradients"])):
        for gradient, expected_gradient in zip(gradients, expected):
            np.testing.assert_allclose(gradient, expected_gradient, **TOLERANCE, err_msg=f"step {step}")


@pytest.mark.slow
def test_mirrored_runs_on_two_replicas(mirrored):
    assert mirrored["replicas"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_memory_identical_on_both_replicas(mirrored, case):
    assert_memory_identical_across_replicas(mirrored["linear"][case]["mirrored"]["memory"])


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_memory_equals_single_device_run(mirrored, case):
    pair = mirrored["linear"][case]
    assert_memory_matches(pair["mirrored"]["memory"], pair["single"]["memory"])


@pytest.mark.slow
def test_memory_holds_last_rows_in_ring_order(mirrored):
    # 5 global batches of 8 rows into 12 slots: row i sits in slot i % 12, so
    # slots 0..3 hold rows 36..39 and slots 4..11 hold rows 28..35.
    memory = mirrored["linear"]["pairs"]["mirrored"]["memory"]
    for replica in range(2):
        np.testing.assert_array_equal(memory["sample_ids"][replica], [36, 37, 38, 39, 28, 29, 30, 31, 32, 33, 34, 35])
        assert int(memory["pointer"][replica]) == 4
        assert int(memory["fill_count"][replica]) == 12


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_losses_and_gradients_match_single_device(mirrored, case):
    pair = mirrored["linear"][case]
    assert_steps_match(pair["mirrored"], pair["single"])


@pytest.mark.slow
def test_memory_term_active_in_compared_steps(mirrored):
    # The comparison covers the memory term, not only the batch term.
    logs = mirrored["linear"]["pairs"]["single"]["logs"]
    assert logs[0]["memory_loss"] == 0.0
    assert all(step["memory_loss"] > 0.1 for step in logs[1:])


@pytest.mark.slow
def test_loss_split_depends_on_global_count(mirrored):
    assert mirrored["linear"]["pairs"]["mirrored"]["splits_pair_loss"] == [True, True]
    assert mirrored["linear"]["no_global_count"]["mirrored"]["splits_pair_loss"] == [False, False]


@pytest.mark.slow
def test_step_counters_identical_on_replicas(mirrored):
    for case in LINEAR_CASES:
        result = mirrored["linear"][case]["mirrored"]
        assert [int(value) for value in result["train_steps"]] == [5, 5]
    # Without sample ids, 5 batches of 8 rows use 40 generated ids, as on one device.
    generated = mirrored["linear"]["generated_ids"]
    assert [int(value) for value in generated["mirrored"]["next_generated_id"]] == [40, 40]
    assert [int(value) for value in generated["single"]["next_generated_id"]] == [40]
    np.testing.assert_array_equal(generated["mirrored"]["memory"]["sample_ids"][0], -1 - np.array([36, 37, 38, 39, 28, 29, 30, 31, 32, 33, 34, 35]))


@pytest.mark.slow
def test_cnn_with_synchronized_batch_norm_matches_single_device(mirrored):
    cnn = mirrored["cnn"]
    assert_memory_identical_across_replicas(cnn["mirrored"]["memory"])
    assert_memory_matches(cnn["mirrored"]["memory"], cnn["single"]["memory"])
    assert_steps_match(cnn["mirrored"], cnn["single"])
    for replicas in cnn["mirrored"]["moving_mean"]:
        np.testing.assert_array_equal(replicas[0], replicas[1])


@pytest.mark.slow
def test_unsynchronized_batch_norm_drifts_per_replica(mirrored):
    # Keras 3.15 + TensorFlow 2.20: without synchronized=True each replica
    # updates its own moving statistics from its own slice (after one step here).
    first_layer = mirrored["cnn"]["unsynchronized_moving_mean"][0]
    assert np.max(np.abs(first_layer[0] - first_layer[1])) > 1e-6


@pytest.mark.slow
def test_predict_and_export_after_training_match_single_device(mirrored):
    evaluation = mirrored["cnn"]["evaluation"]
    assert evaluation["single_predict"].shape == (20, 8)
    np.testing.assert_allclose(evaluation["mirrored_predict"], evaluation["single_predict"], **TOLERANCE)
    np.testing.assert_allclose(evaluation["export"], evaluation["single_predict"], **TOLERANCE)


@pytest.mark.slow
def test_evaluate_after_training_matches_single_device(mirrored):
    evaluation = mirrored["cnn"]["evaluation"]
    for key in ("loss", "batch_loss"):
        np.testing.assert_allclose(evaluation["mirrored_evaluate"][key], evaluation["single_evaluate"][key], **TOLERANCE)


@pytest.mark.slow
def test_global_batch_not_divisible_rejected(mirrored):
    assert mirrored["bad_input"]["odd_batch"] == (
        "The global batch of 9 rows does not split evenly over 2 replicas: "
        "expected a batch size divisible by 2, for example 8 or 10."
    )


@pytest.mark.slow
def test_memory_smaller_than_global_batch_rejected(mirrored):
    assert mirrored["bad_input"]["small_memory"] == (
        "A global batch of 8 rows (2 replicas x 4) does not fit a memory of 6 slots: "
        "expected memory_size >= global batch size."
    )


@pytest.mark.slow
def test_jit_on_one_device_mirrored_matches_single_device(mirrored):
    jit = mirrored["jit"]
    assert_memory_matches(jit["one_device"]["memory"], jit["reference"]["memory"])
    assert_steps_match(jit["one_device"], jit["reference"])


@pytest.mark.slow
def test_multi_worker_matches_single_device(multi_worker):
    for worker in multi_worker:
        assert worker["replicas"] == 2
        assert_memory_matches(worker["worker"]["memory"], worker["single"]["memory"])
        assert_steps_match(worker["worker"], worker["single"])
        np.testing.assert_allclose(worker["worker_predict"], worker["single_predict"], **TOLERANCE)
    for name in MEMORY_VARIABLES:
        np.testing.assert_array_equal(multi_worker[0]["worker"]["memory"][name][0], multi_worker[1]["worker"]["memory"][name][0])


def split_loss(similarity, pos_mask, neg_mask, normalization, parts):
    """Sum the losses of row blocks, each normalised by the counts of all blocks.

    A first pass records each block's counts in call order; the second pass
    hands every block the totals, as a sum over replicas would.
    """
    blocks = np.array_split(np.arange(similarity.shape[0]), parts)
    recorded = []
    for rows in blocks:
        counts = []

        def record(count, counts=counts):
            counts.append(count)
            return count

        contrastive_loss(similarity[rows], pos_mask[rows], neg_mask[rows], 0.2, normalization, global_count=record)
        recorded.append(counts)
    totals = [tf.add_n(list(column)) for column in zip(*recorded)]

    total = 0.0
    for rows in blocks:
        calls = iter(totals)
        total += contrastive_loss(
            similarity[rows], pos_mask[rows], neg_mask[rows], 0.2, normalization, global_count=lambda _: next(calls)
        )
    return total


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    queries=st.integers(2, 9),
    references=st.integers(1, 12),
    parts=st.integers(1, 4),
    normalization=st.sampled_from(NORMALIZATIONS),
)
def test_global_count_splits_loss_exactly(seed, queries, references, parts, normalization):
    rng = np.random.default_rng(seed)
    similarity = rng.uniform(-1.0, 1.0, size=(queries, references)).astype(np.float32)
    labels = rng.integers(0, 3, size=(queries, 1)) == rng.integers(0, 3, size=(1, references))
    valid = rng.uniform(size=(queries, references)) < 0.9
    pos_mask = labels & valid
    neg_mask = ~labels & valid

    whole = contrastive_loss(similarity, pos_mask, neg_mask, 0.2, normalization)
    assert float(split_loss(similarity, pos_mask, neg_mask, normalization, min(parts, queries))) == pytest.approx(
        float(whole), rel=1e-5, abs=1e-6
    )


def test_memory_variables_are_replica_local():
    network = backbones.small_cnn(input_shape=(8, 8, 1), embedding_dim=4, widths=(2,))
    model = XBMModel(network, memory_size=8)
    for variable in [*model.memory.weights, model.train_steps, model.next_generated_id]:
        assert variable.synchronization == "on_read"
        assert variable.aggregation == "only_first_replica"
        assert not variable.trainable
    assert [variable.name for variable in model.memory.weights] == list(MEMORY_VARIABLES)


@pytest.mark.parametrize(
    "batch, replicas, message",
    [
        (9, 2, "The global batch of 9 rows does not split evenly over 2 replicas: expected a batch size divisible by 2, for example 8 or 10."),
        (16, 3, "The global batch of 16 rows does not split evenly over 3 replicas: expected a batch size divisible by 3, for example 15 or 18."),
        (2, 4, "The global batch of 2 rows does not split evenly over 4 replicas: expected a batch size divisible by 4, for example 4."),
    ],
)
def test_check_global_batch_names_both_numbers(batch, replicas, message):
    with pytest.raises(ValueError) as error:
        check_global_batch(batch, replicas)
    assert str(error.value) == message


@pytest.mark.parametrize("batch, replicas", [(16, 2), (16, 1), (9, 1), (None, 2), (24, 8)])
def test_check_global_batch_accepts_even_splits(batch, replicas):
    check_global_batch(batch, replicas)


def test_static_batch_size_of_inputs():
    dataset = tf.data.Dataset.from_tensor_slices((np.zeros((10, 3)), np.zeros(10))).batch(4, drop_remainder=True)
    assert static_batch_size(dataset) == 4
    assert static_batch_size(dataset.unbatch().batch(4)) is None
    assert static_batch_size(np.zeros((10, 3))) == 32
    assert static_batch_size(np.zeros((10, 3)), batch_size=6) == 6


def test_synchronize_batch_norm_sets_every_layer():
    network = backbones.small_cnn(input_shape=(8, 8, 1), embedding_dim=4, widths=(2, 4, 4))
    assert synchronize_batch_norm(network) == 3
    assert all(layer.synchronized for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert synchronize_batch_norm(network) == 0


@pytest.mark.parametrize(
    "name, devices, message",
    [
        ("ring", 0, "Unknown strategy='ring': expected one of default, mirrored, multi-worker."),
        ("default", 2, "devices=2 applies to the mirrored strategy only"),
        ("multi-worker", 2, "devices=2 applies to the mirrored strategy only"),
        ("mirrored", -1, "Invalid devices=-1: expected a non-negative integer"),
    ],
)
def test_make_strategy_rejects_bad_settings(name, devices, message):
    with pytest.raises(ValueError, match=message):
        make_strategy(name, devices)


def test_make_strategy_default_is_one_replica():
    assert make_strategy("default").num_replicas_in_sync == 1


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "TF_CONFIG is not set"),
        ("{cluster", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG must hold 'cluster' and 'task' entries"),
    ],
)
def test_check_tf_config_rejects_bad_values(text, message):
    with pytest.raises(ValueError, match=message):
        check_tf_config(text)


def test_train_config_rejects_unknown_strategy(tmp_path):
    config = TrainConfig(data_dir=str(tmp_path), strategy="parameter-server")
    with pytest.raises(ValueError, match="Unknown strategy='parameter-server'"):
        config.validate()


def test_run_training_rejects_devices_without_mirrored(tmp_path):
    # The strategy is created before any data is read: the missing folder is never reached.
    config = TrainConfig(data_dir=str(tmp_path / "missing"), strategy="default", devices=3)
    with pytest.raises(ValueError, match="devices=3 applies to the mirrored strategy only"):
        run_training(config)


@pytest.mark.slow
def test_cli_trains_evaluates_and_exports_on_two_devices(omniglot_dir, tmp_path):
    command = [
        os.path.join(os.path.dirname(sys.executable), "keras-xbm"),
        "train", "--dataset", "omniglot", "--data-dir", omniglot_dir,
        "--strategy", "mirrored", "--devices", "2",
        "--steps", "20", "--memory-size", "128", "--warmup-steps", "5",
        "--output-dir", str(tmp_path / "out"), "--export-dir", str(tmp_path / "export"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training: 20 steps on 2 replicas" in result.stdout
    with open(tmp_path / "out" / "metrics.json") as handle:
        metrics = json.load(handle)
    assert metrics["replicas"] == 2
    assert metrics["config"]["strategy"] == "mirrored"
    # 106 classes of 20 images: chance Recall@1 is below 0.01.
    assert metrics["recall@1"] > 0.05

    evaluation = subprocess.run(
        [command[0], "evaluate", "--model", str(tmp_path / "export"), "--dataset", "omniglot", "--data-dir", omniglot_dir,
         "--output", str(tmp_path / "eval.json")],
        capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    with open(tmp_path / "eval.json") as handle:
        exported = json.load(handle)
    assert exported["recall@1"] == pytest.approx(metrics["recall@1"], abs=0.005)


@pytest.mark.slow
def test_cli_rejects_batch_not_divisible_by_devices(omniglot_dir, tmp_path):
    command = [
        os.path.join(os.path.dirname(sys.executable), "keras-xbm"),
        "train", "--dataset", "omniglot", "--data-dir", omniglot_dir,
        "--strategy", "mirrored", "--devices", "3", "--batch-size", "16",
        "--output-dir", str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 2
    assert "The global batch of 16 rows does not split evenly over 3 replicas" in result.stderr
