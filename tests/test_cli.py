"""End-to-end runs of the keras-xbm command on the real Omniglot images."""

import json
import os
import subprocess
import sys

import pytest

from keras_xbm.cli import build_parser, main


def keras_xbm(*args, cwd=None):
    command = [os.path.join(os.path.dirname(sys.executable), "keras-xbm"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def trained_run(omniglot_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    result = keras_xbm(
        "train", "--dataset", "omniglot", "--data-dir", omniglot_dir,
        "--steps", "40", "--memory-size", "128", "--warmup-steps", "10",
        "--output-dir", str(root / "out"), "--export-dir", str(root / "export"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


@pytest.mark.slow
def test_train_prints_table_and_writes_metrics(trained_run):
    root, result = trained_run
    assert "Recall@K on the omniglot test split (106 unseen classes, 2120 images" in result.stdout
    with open(root / "out" / "metrics.json") as handle:
        metrics = json.load(handle)
    for k in (1, 2, 4, 8):
        assert 0.0 < metrics[f"recall@{k}"] <= 1.0
    assert metrics["recall@1"] <= metrics["recall@2"] <= metrics["recall@4"] <= metrics["recall@8"]
    # 106 classes of 20: chance R@1 is 19/2119, below 0.01; 40 steps already beat it.
    assert metrics["recall@1"] > 0.05
    assert metrics["config"]["memory_size"] == 128
    assert os.path.isfile(root / "export" / "1" / "saved_model.pb")
    assert os.path.isfile(root / "out" / "xbm.weights.h5")
    with open(root / "out" / "history.json") as handle:
        history = json.load(handle)
    assert history["memory_loss"][0] > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("index, tolerance", [("exact", 0.005), ("scann", 0.01)])
def test_evaluate_export_reproduces_training_recall(trained_run, omniglot_dir, index, tolerance):
    root, _ = trained_run
    output = root / f"eval_{index}.json"
    result = keras_xbm(
        "evaluate", "--model", str(root / "export"), "--dataset", "omniglot", "--data-dir", omniglot_dir,
        "--index", index, "--output", str(output),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(root / "out" / "metrics.json") as handle:
        trained = json.load(handle)
    with open(output) as handle:
        evaluated = json.load(handle)
    assert evaluated["model"].endswith(os.path.join("export", "1"))
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"):
        assert evaluated[key] == pytest.approx(trained[key], abs=tolerance)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "30", "--samples-per-class", "30"], "samples_per_class=30 is larger than class"),
        (["--batch-size", "16", "--memory-size", "8"], "memory_size=8 is smaller than batch_size=16"),
        (["--batch-size", "10", "--samples-per-class", "4"], "batch_size=10 is not a multiple of samples_per_class=4"),
        (["--steps", "0"], "Invalid steps=0"),
        (["--loss", "arcface"], "Unknown loss 'arcface'"),
        (["--loss", "constant/step(threshold=1.5)"], "threshold=1.5"),
    ],
)
def test_train_rejects_bad_settings(omniglot_dir, tmp_path, capsys, extra, message):
    status = main(["train", "--data-dir", omniglot_dir, "--output-dir", str(tmp_path), "--no-export", *extra])
    assert status == 2
    assert message in capsys.readouterr().err


def test_train_names_missing_data_dir(tmp_path, capsys):
    missing = str(tmp_path / "no_such_dir")
    status = main(["train", "--data-dir", missing, "--output-dir", str(tmp_path / "out"), "--no-export"])
    assert status == 2
    assert "no_such_dir" in capsys.readouterr().err


def test_evaluate_names_missing_model(tmp_path, omniglot_dir, capsys):
    status = main(["evaluate", "--model", str(tmp_path / "nothing"), "--data-dir", omniglot_dir])
    assert status == 2
    assert "No SavedModel at" in capsys.readouterr().err


def test_recall_k_flag_parses_list():
    args = build_parser().parse_args(["train", "--data-dir", "d", "--recall-k", "1,5,10"])
    assert args.recall_k == (1, 5, 10)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data-dir", "d", "--recall-k", "one"])


def test_train_warns_when_warmup_covers_run(omniglot_dir, tmp_path, caplog):
    status = main([
        "train", "--data-dir", omniglot_dir, "--output-dir", str(tmp_path), "--no-export",
        "--steps", "3", "--memory-size", "64", "--warmup-steps", "3",
    ])
    assert status == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("steps=3 is not more than warmup_steps=3" in message for message in warnings), warnings
