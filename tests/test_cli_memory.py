"""The --memory and --momentum flags of keras-xbm train, on the real Omniglot images."""

import json
import os

import pytest

from keras_xbm.cli import main


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--memory", "momentum-encoder", "--momentum", "1.5"], "Invalid momentum=1.5: expected a number in [0, 1)"),
        (["--memory", "momentum-bank", "--momentum", "-0.2"], "Invalid momentum=-0.2"),
        (["--momentum", "0.9"], "momentum=0.9 was given for the plain FIFO memory"),
        (["--memory", "momentum-bank", "--no-memory"], "memory='momentum-bank' needs a memory"),
    ],
)
def test_train_rejects_bad_memory_settings(omniglot_dir, tmp_path, capsys, extra, message):
    status = main(["train", "--data-dir", omniglot_dir, "--output-dir", str(tmp_path), "--no-export", *extra])
    assert status == 2
    assert message in capsys.readouterr().err


def test_train_rejects_unknown_memory(omniglot_dir, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data-dir", omniglot_dir, "--memory", "lifo"])
    assert "invalid choice: 'lifo'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, memory, momentum, slots",
    [
        (["--memory", "momentum-encoder", "--momentum", "0.99"], "momentum-encoder", 0.99, 256),
        (["--memory", "momentum-bank"], "momentum-bank", 0.5, 2720),
    ],
)
def test_train_and_evaluate_momentum_memory(omniglot_dir, tmp_path, capsys, extra, memory, momentum, slots):
    output_dir, export_dir = tmp_path / "out", tmp_path / "export"
    status = main([
        "train", "--data-dir", omniglot_dir, "--steps", "30", "--warmup-steps", "10", "--memory-size", "256",
        "--output-dir", str(output_dir), "--export-dir", str(export_dir), *extra,
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert f"{memory} memory of {slots} slots, momentum {momentum}" in printed
    with open(output_dir / "metrics.json") as handle:
        metrics = json.load(handle)
    assert (metrics["memory"], metrics["momentum"], metrics["memory_slots"]) == (memory, momentum, slots)
    # 106 classes of 20: chance R@1 is below 0.01.
    assert metrics["recall@1"] > 0.05
    with open(output_dir / "history.json") as handle:
        assert json.load(handle)["memory_loss"][0] > 0.0

    evaluation = tmp_path / "evaluation.json"
    assert main(["evaluate", "--model", str(export_dir), "--data-dir", omniglot_dir, "--output", str(evaluation)]) == 0
    with open(evaluation) as handle:
        evaluated = json.load(handle)
    assert evaluated["recall@1"] == pytest.approx(metrics["recall@1"], abs=0.005)
    assert os.path.isfile(output_dir / "xbm.weights.h5")
