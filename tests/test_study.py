import csv
import math
import os

import numpy as np
import pytest

from keras_xbm.cli import main
from keras_xbm.losses import CircleLoss, DirectWeightLoss, MultiSimilarityLoss, TripletLoss
from keras_xbm.study import GRIDS, LOSSES, format_gradient_table, format_summary_table, gradient_mass, parse_entry, summarize
from keras_xbm.training import TrainConfig
from keras_xbm.weighting import Constant, Exponential, Linear, Step


def test_parse_curve_pair_entry():
    entry = parse_entry(" linear(increasing=false)/step(threshold=0.3)*exponential(scale=5, threshold=0.3) ")
    assert entry.memory
    assert entry.loss_name is None
    assert entry.positive_curve == Linear(increasing=False)
    assert entry.negative_curve == Step(0.3) * Exponential(5.0, 0.3)
    loss = entry.build_loss(TrainConfig(normalization="anchor"))
    assert isinstance(loss, DirectWeightLoss)
    assert loss.normalization == "anchor"


def test_parse_loss_entry_without_memory():
    entry = parse_entry("triplet_semi_hard@no-memory")
    assert not entry.memory
    assert entry.loss_name == "triplet_semi_hard"
    loss = entry.build_loss(TrainConfig())
    assert isinstance(loss, TripletLoss)
    assert loss.mining == "semi_hard"
    assert entry.slug == "triplet_semi_hard_no-memory"


@pytest.mark.parametrize(
    "text, message",
    [
        ("hinge", "Invalid study entry 'hinge'"),
        ("constant/cosine", "Unknown weight curve 'cosine'"),
        ("constant/step(threshold=2)", "threshold=2"),
    ],
)
def test_invalid_entries_rejected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_entry(text)


def test_full_grid_covers_the_study():
    entries = [parse_entry(text) for text in GRIDS["full"]]
    curve_pairs = [entry for entry in entries if entry.loss_name is None]
    negatives = {repr(entry.negative_curve) for entry in curve_pairs if entry.positive_curve == Constant(1.0)}
    assert {"Step", "Linear", "Exponential", "Sigmoid", "Softmax", "Constant"} <= {text.split("(")[0] for text in negatives}
    assert sum(text.startswith("Step(") for text in negatives) == 3
    positives = {repr(entry.positive_curve) for entry in curve_pairs if entry.negative_curve == Step(0.5)}
    assert len(positives) == 3
    assert all(entry.memory for entry in curve_pairs)
    for name in LOSSES:
        memories = {entry.memory for entry in entries if entry.loss_name == name}
        assert memories == ({False} if name == "contrastive" else {True, False}), name
    assert len({entry.slug for entry in entries}) == len(entries)


def test_losses_build_with_run_settings():
    config = TrainConfig(negative_threshold=0.3, normalization="anchor")
    assert isinstance(parse_entry("multi_similarity").build_loss(config), MultiSimilarityLoss)
    assert isinstance(parse_entry("circle@no-memory").build_loss(config), CircleLoss)
    contrastive = parse_entry("contrastive@no-memory").build_loss(config)
    assert contrastive.negative_threshold == 0.3
    assert contrastive.normalization == "anchor"
    assert parse_entry("constant/linear").build_loss(config).normalization == "anchor"


def test_summary_mean_and_sample_std():
    entries = [parse_entry("constant/step(threshold=0.5)"), parse_entry("circle@no-memory")]
    rows = [
        {"entry": entries[0].text, "recall@1": 0.70, "recall@4": 0.88, "hard_negatives": 10.0},
        {"entry": entries[0].text, "recall@1": 0.72, "recall@4": 0.90, "hard_negatives": 20.0},
        {"entry": entries[0].text, "recall@1": 0.74, "recall@4": 0.86, "hard_negatives": 30.0},
        {"entry": entries[1].text, "recall@1": 0.60, "recall@4": 0.80, "hard_negatives": 5.0},
    ]
    summary = summarize(rows, entries)
    assert summary[0]["r1_mean"] == pytest.approx(0.72)
    assert summary[0]["r1_std"] == pytest.approx(0.02)
    assert summary[0]["r4_mean"] == pytest.approx(0.88)
    assert summary[0]["r4_std"] == pytest.approx(0.02)
    assert summary[0]["hard_negatives"] == pytest.approx(20.0)
    assert summary[0]["seeds"] == 3
    assert math.isnan(summary[1]["r1_std"])
    table = format_summary_table(summary).splitlines()
    assert table[2] == "| `constant/step(threshold=0.5)` | yes | 72.0 | 2.0 | 88.0 | 2.0 | 20.0 | 3 |"
    assert table[3] == "| `circle` | no | 60.0 | - | 80.0 | - | 5.0 | 1 |"


def test_gradient_mass_of_contrastive_curves():
    similarity = np.array([[0.9, 0.2, 0.7, 0.6, -0.3], [0.4, 0.8, 0.1, 0.55, 0.3]], np.float32)
    pos = np.array([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]], bool)
    neg = np.array([[0, 0, 1, 1, 1], [1, 0, 1, 1, 1]], bool)
    mass = gradient_mass(DirectWeightLoss(Constant(1.0), Step(0.6), normalization="sum"), similarity, pos, neg)
    assert mass["positive_mass"] == pytest.approx(3.0)
    # Negatives above 0.6: 0.7 only; above 0.5: 0.7, 0.6 and 0.55.
    assert mass["negative_mass"] == pytest.approx(1.0)
    assert mass["hard_share"] == pytest.approx(1.0)
    assert mass["weighted_negatives"] == pytest.approx(1 / 7)
    assert mass["hard_negatives_fraction"] == pytest.approx(3 / 7)
    table = format_gradient_table({"constant/step(threshold=0.6)": mass}).splitlines()
    assert table[2] == "| `constant/step(threshold=0.6)` | 0.333 | 100.0% | 14.3% | 42.86% |"


@pytest.mark.slow
def test_study_command_writes_results_and_resumes(omniglot_dir, tmp_path, capsys, caplog):
    output = tmp_path / "study"
    arguments = [
        "study", "--dataset", "omniglot", "--data-dir", omniglot_dir, "--steps", "30", "--seeds", "4",
        "--entry", "constant/step(threshold=0.5)", "--entry", "circle@no-memory", "--output-dir", str(output),
    ]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "| `constant/step(threshold=0.5)` | yes |" in printed
    assert "| `circle` | no |" in printed

    with open(output / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["entry"], row["memory"], row["seed"], row["steps"]) for row in rows] == [
        ("constant/step(threshold=0.5)", "True", "4", "30"),
        ("circle@no-memory", "False", "4", "30"),
    ]
    for row in rows:
        assert 0.0 < float(row["recall@1"]) <= float(row["recall@4"]) <= 1.0
    summary = (output / "summary.md").read_text()
    assert "Settings: steps=30" in summary
    assert "| `constant/step(threshold=0.5)` | " in summary.split("Gradient of the memory term")[1]
    assert "| `circle@no-memory` |" not in summary
    assert os.path.getsize(output / "curves_recall.png") > 0
    assert os.path.getsize(output / "weights_constant_step_threshold=0.5.png") > 0
    assert not os.path.exists(output / "weights_circle_no-memory.png")

    # A second call reads every run back instead of training it again.
    caplog.set_level("INFO", logger="keras_xbm")
    assert main(arguments) == 0
    assert caplog.text.count("Read back") == 2
    with open(output / "results.csv") as handle:
        assert [row["recall@1"] for row in csv.DictReader(handle)] == [row["recall@1"] for row in rows]


def test_study_command_rejects_bad_entry(omniglot_dir, tmp_path, capsys):
    status = main(["study", "--data-dir", omniglot_dir, "--entry", "hinge", "--output-dir", str(tmp_path)])
    assert status == 2
    assert "Invalid study entry 'hinge'" in capsys.readouterr().err


def test_study_command_passes_run_settings(omniglot_dir, tmp_path, monkeypatch):
    import keras_xbm.study

    calls = {}

    def record(data_dir, entries, **kwargs):
        calls.update(kwargs, data_dir=data_dir, entries=entries)
        return []

    monkeypatch.setattr(keras_xbm.study, "run_study", record)
    status = main([
        "study", "--data-dir", omniglot_dir, "--grid", "full", "--seeds", "3,5", "--memory-size", "512",
        "--learning-rate", "0.002", "--output-dir", str(tmp_path),
    ])
    assert status == 0
    assert calls["entries"] == list(GRIDS["full"])
    assert calls["seeds"] == (3, 5)
    assert calls["base_config"].memory_size == 512
    assert calls["base_config"].learning_rate == 0.002
    assert calls["base_config"].normalization == TrainConfig().normalization


def test_study_command_rejects_zero_steps(omniglot_dir, tmp_path, capsys):
    status = main(["study", "--data-dir", omniglot_dir, "--steps", "0", "--entry", "circle", "--output-dir", str(tmp_path)])
    assert status == 2
    assert "Invalid steps=0" in capsys.readouterr().err
