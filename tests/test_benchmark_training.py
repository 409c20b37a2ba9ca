"""The recipe files and `keras-xbm train --config` on tiny benchmark trees in the official formats."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from keras_xbm.benchmark_training import hold_out_classes, usable_ks
from keras_xbm.cli import build_parser, main, train_settings
from keras_xbm.configs import read_config_file
from keras_xbm.data.listing import make_split
from keras_xbm.training import TrainConfig, run_training
from tests.benchmark_trees import write_inshop_tree, write_sop_tree, write_vehicleid_tree

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def keras_xbm(*args):
    command = [os.path.join(os.path.dirname(sys.executable), "keras-xbm"), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def settings_from(argv):
    args = build_parser().parse_args(argv)
    args.command_line = list(argv)
    return train_settings(args)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


# Recipe files


@pytest.mark.parametrize(
    "name, memory_size, ks",
    [("sop", 55000, (1, 10, 100, 1000)), ("inshop", 23900, (1, 10, 20, 30, 40, 50)), ("vehicleid", 101800, (1, 5))],
)
def test_recipe_files_hold_the_xbm_recipe(name, memory_size, ks):
    settings = read_config_file(str(CONFIGS / f"{name}.yaml"), TrainConfig)
    config = TrainConfig(data_dir="d", **settings)
    config.validate()
    assert config.dataset == name
    assert config.backbone == "resnet50"
    assert config.weights == "imagenet"
    assert config.embedding_dim == 128
    assert config.learning_rate == 1e-4
    assert config.weight_decay == 5e-4
    assert config.weight_decay_mode == "l2"
    assert (config.batch_size, config.samples_per_class, config.classes_per_batch) == (64, 4, 16)
    assert config.steps == 35000
    assert config.warmup_steps == 1000
    assert config.memory_size == memory_size
    assert (config.image_size, config.resize_size) == (224, 256)
    assert config.lr_factor == 0.1
    assert config.validation_fraction > 0
    assert config.recall_ks == ks


def test_memory_sizes_scale_with_training_set():
    # 55,000 slots for SOP's 59,551 training images; the others keep that share, to the nearest 100.
    share = 55000 / 59551
    assert round(share * 25882, -2) == 23900
    assert round(share * 110178, -2) == 101800


def test_config_file_rejects_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: sop\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown setting\(s\) learning_rat"):
        read_config_file(str(path), TrainConfig)


def test_config_file_reads_yaml_1_1_exponents(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("learning_rate: 1e-4\nrecall_ks: [1, 5]\n")
    assert read_config_file(str(path), TrainConfig) == {"learning_rate": 1e-4, "recall_ks": (1, 5)}
    path.write_text("learning_rate: fast\n")
    with pytest.raises(ValueError, match="learning_rate = 'fast' is not a number"):
        read_config_file(str(path), TrainConfig)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        read_config_file(str(path), TrainConfig)
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        read_config_file(str(tmp_path / "none.yaml"), TrainConfig)


def test_given_flags_override_config_file():
    sop = str(CONFIGS / "sop.yaml")
    from_file = settings_from(["train", "--config", sop, "--data-dir", "d"])
    assert from_file["steps"] == 35000
    assert from_file["memory_size"] == 55000
    assert from_file["dataset"] == "sop"
    assert from_file["allow_repeats"] is True
    overridden = settings_from(
        ["train", "--config", sop, "--data-dir", "d", "--steps", "5", "--weights", "none", "--no-allow-repeats",
         "--recall-k", "1,2", "--no-memory"]
    )
    assert overridden["steps"] == 5
    assert overridden["weights"] is None
    assert overridden["allow_repeats"] is False
    assert overridden["recall_ks"] == (1, 2)
    assert overridden["memory_size"] == 0
    assert overridden["learning_rate"] == 1e-4


def test_defaults_depend_on_dataset():
    omniglot = TrainConfig(data_dir="d")
    assert (omniglot.output_dir, omniglot.image_size, omniglot.backbone, omniglot.recall_ks) == (
        "runs/omniglot", 32, "small_cnn", (1, 2, 4, 8),
    )
    cub = TrainConfig(dataset="cub", data_dir="d")
    assert (cub.output_dir, cub.export_dir, cub.image_size, cub.resize_size, cub.backbone, cub.recall_ks) == (
        "runs/cub", "saved_models/cub", 224, 256, "resnet50", None,
    )
    with pytest.raises(ValueError, match="Omniglot is grayscale"):
        TrainConfig(data_dir="d", backbone="resnet50").validate()


# Helpers of the job


def test_usable_ks_drops_k_beyond_references():
    assert usable_ks((1, 10, 100, 1000), 5) == ((1,), (10, 100, 1000))
    assert usable_ks((1, 5), 5) == ((1, 5), ())
    with pytest.raises(ValueError, match="Each query has 0 reference"):
        usable_ks((1, 2), 0)


def test_hold_out_classes_moves_whole_classes():
    split = make_split([f"{i}.jpg" for i in range(40)], [i // 4 for i in range(40)])
    train, validation = hold_out_classes(split, 0.2, min_train_classes=4, seed=0)
    assert validation.num_classes == 2
    assert train.num_classes == 8
    assert len(train) + len(validation) == 40
    assert not set(train.class_names) & set(validation.class_names)
    assert sorted(train.paths + validation.paths) == sorted(split.paths)
    np.testing.assert_array_equal(validation.sample_ids, np.arange(8))
    with pytest.raises(ValueError, match="leaving fewer than the 9 classes"):
        hold_out_classes(split, 0.2, min_train_classes=9, seed=0)


# Recipes trained for a few steps on their trees


@pytest.mark.slow
def test_sop_recipe_trains_resnet50(tmp_path):
    write_sop_tree(str(tmp_path / "sop"))
    result = keras_xbm(
        "train", "--config", str(CONFIGS / "sop.yaml"), "--data-dir", str(tmp_path / "sop"), "--steps", "2",
        "--weights", "none", "--image-size", "32", "--no-jit", "--no-export", "--output-dir", str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Recall@K on the sop test split (3 unseen classes, 6 images, leave-one-out, exact search; memory 55000)" in result.stdout
    assert "Not reported: Recall@K for K = 10, 100, 1000" in result.stdout
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert 0.0 <= metrics["recall@1"] <= 1.0
    assert "recall@10" not in metrics
    assert metrics["dropped_ks"] == [10, 100, 1000]
    assert metrics["protocol"] == "leave-one-out"
    assert (metrics["train_images"], metrics["validation_images"], metrics["test_images"]) == (54, 5, 6)
    config = metrics["config"]
    assert (config["backbone"], config["image_size"], config["steps"], config["memory_size"]) == ("resnet50", 32, 2, 55000)
    assert (config["learning_rate"], config["weight_decay"], config["batch_size"]) == (1e-4, 5e-4, 64)
    history = read_json(tmp_path / "out" / "history.json")
    assert len(history["loss"]) == 1
    assert 0.0 <= history["val_recall@1"][0] <= 1.0
    assert history["learning_rate"] == [pytest.approx(1e-4)]
    # The L2 weight decay term of ResNet-50's weights dominates the loss at initialisation.
    assert history["loss"][0] > history["batch_loss"][0] + 1.0


@pytest.mark.slow
def test_inshop_recipe_exports_and_evaluates_query_gallery(tmp_path):
    write_inshop_tree(str(tmp_path / "inshop"))
    result = keras_xbm(
        "train", "--config", str(CONFIGS / "inshop.yaml"), "--data-dir", str(tmp_path / "inshop"), "--steps", "3",
        "--backbone", "small_cnn", "--image-size", "32", "--no-jit",
        "--output-dir", str(tmp_path / "out"), "--export-dir", str(tmp_path / "export"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 queries against 6 gallery images of 3 unseen items" in result.stdout
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert metrics["protocol"] == "query-gallery"
    assert metrics["dropped_ks"] == [10, 20, 30, 40, 50]
    assert 0.0 <= metrics["recall@1"] <= 1.0

    evaluated = keras_xbm(
        "evaluate", "--model", str(tmp_path / "export"), "--dataset", "inshop", "--data-dir", str(tmp_path / "inshop"),
        "--recall-k", "1,2,50", "--output", str(tmp_path / "eval.json"),
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = read_json(tmp_path / "eval.json")
    assert results["recall@1"] == pytest.approx(metrics["recall@1"], abs=1e-6)
    assert results["dropped_ks"] == [50]
    assert "recall@2" in results


@pytest.mark.slow
def test_vehicleid_recipe_reads_the_chosen_test_list(tmp_path):
    write_vehicleid_tree(str(tmp_path / "vehicleid"))
    status = main(
        ["train", "--config", str(CONFIGS / "vehicleid.yaml"), "--data-dir", str(tmp_path / "vehicleid"),
         "--test-list", "1600", "--steps", "2", "--backbone", "small_cnn", "--image-size", "32", "--no-jit",
         "--no-export", "--output-dir", str(tmp_path / "out")]
    )
    assert status == 0
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert (metrics["test_classes"], metrics["test_images"]) == (4, 8)
    assert metrics["evaluation_split"] == "test_list_1600.txt"
    assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= 1.0
    assert metrics["dropped_ks"] == []


def test_learning_rate_drops_when_validation_recall_stalls(tmp_path):
    write_sop_tree(str(tmp_path / "sop"))
    config = TrainConfig(
        dataset="sop", data_dir=str(tmp_path / "sop"), output_dir=str(tmp_path / "out"), export=False,
        backbone="small_cnn", image_size=32, steps=3, batch_size=8, samples_per_class=4, memory_size=64,
        warmup_steps=0, learning_rate=1e-8, allow_repeats=True, validation_fraction=0.1, validation_every=1,
        lr_patience=0, jit_compile=False, verbose=0,
    )
    run_training(config)
    history = read_json(tmp_path / "out" / "history.json")
    assert len(history["val_recall@1"]) == 3
    # Recall cannot move at this learning rate: the second validation is no better, so the rate is divided by 10.
    assert history["learning_rate"] == [pytest.approx(1e-8), pytest.approx(1e-8), pytest.approx(1e-9)]


# Bad input stops before the first step


def test_malformed_list_line_stops_before_training(tmp_path, capsys):
    write_sop_tree(str(tmp_path / "sop"))
    with open(tmp_path / "sop" / "Ebay_train.txt", "a") as handle:
        handle.write("60 21 1\n")
    status = main(
        ["train", "--config", str(CONFIGS / "sop.yaml"), "--data-dir", str(tmp_path / "sop"), "--steps", "2",
         "--output-dir", str(tmp_path / "out")]
    )
    assert status == 2
    assert "Ebay_train.txt, line 61: expected 4 fields" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_corrupt_image_stops_before_training(tmp_path, capsys):
    listed = write_sop_tree(str(tmp_path / "sop"))
    broken = tmp_path / "sop" / listed["train"][7][0]
    broken.write_bytes(broken.read_bytes()[:200])
    status = main(
        ["train", "--config", str(CONFIGS / "sop.yaml"), "--data-dir", str(tmp_path / "sop"), "--steps", "2",
         "--backbone", "small_cnn", "--output-dir", str(tmp_path / "out")]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "1 of 65 image file(s) cannot be read or decoded" in error
    assert str(broken) in error
    assert not os.path.exists(tmp_path / "out")


def test_missing_test_list_named(tmp_path, capsys):
    write_vehicleid_tree(str(tmp_path / "vehicleid"), test_sizes={800: 3})
    status = main(["train", "--dataset", "vehicleid", "--data-dir", str(tmp_path / "vehicleid"), "--test-list", "2400", "--no-export"])
    assert status == 2
    error = capsys.readouterr().err
    assert "test_list_2400.txt" in error
    assert "Expected this layout" in error
