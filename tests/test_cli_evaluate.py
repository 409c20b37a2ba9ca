"""`keras-xbm evaluate` on embeddings saved as .npz files."""

import json

import numpy as np
import pytest

from keras_xbm.cli import build_parser, main
from tests.retrieval_reference import brute_force_metrics, grid_embeddings


def write_npz(path, embeddings, labels):
    np.savez(path, embeddings=embeddings, labels=labels)
    return str(path)


@pytest.fixture
def clustered(tmp_path):
    # Grid rows have exact float32 inner products, exact ties and duplicates.
    embeddings = grid_embeddings(300, seed=3)
    embeddings = np.concatenate([embeddings, embeddings[:20]])
    labels = np.random.default_rng(3).integers(0, 60, 320)
    return embeddings, labels


def test_evaluate_embeddings_leave_one_out(tmp_path, capsys, clustered):
    embeddings, labels = clustered
    path = write_npz(tmp_path / "test.npz", embeddings, labels)
    output = tmp_path / "results.json"
    status = main(["evaluate", "--embeddings", path, "--k", "1,10,100", "--output", str(output)])
    assert status == 0
    printed = capsys.readouterr().out
    assert f"Retrieval on {path} (320 items, leave-one-out, exact search)" in printed
    assert "MAP@R" in printed
    results = json.loads(output.read_text())
    expected = brute_force_metrics(embeddings, labels, ks=(1, 10, 100))
    for key in ("recall@1", "recall@10", "recall@100", "map@r", "r_precision"):
        assert results[key] == pytest.approx(expected[key])
    assert results["queries_without_relevant"] == expected["queries_without_relevant"]
    assert results["protocol"] == "leave_one_out"


def test_evaluate_queries_against_gallery(tmp_path, capsys):
    rng = np.random.default_rng(4)
    queries = grid_embeddings(80, seed=5)
    gallery = np.concatenate([queries[:30], grid_embeddings(90, seed=6)])
    query_labels = rng.integers(0, 25, 80)
    # Labels 20 to 24 are absent from the gallery: those queries are misses.
    gallery_labels = rng.integers(0, 20, 120)
    query_path = write_npz(tmp_path / "queries.npz", queries, query_labels)
    gallery_path = write_npz(tmp_path / "gallery.npz", gallery, gallery_labels)
    output = tmp_path / "results.json"
    status = main(["evaluate", "--queries", query_path, "--gallery", gallery_path, "--recall-k", "1,10,20", "--output", str(output)])
    assert status == 0
    results = json.loads(output.read_text())
    expected = brute_force_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 10, 20))
    assert expected["queries_without_relevant"] > 0
    for key, value in expected.items():
        assert results[key] == pytest.approx(value)
    assert f"{expected['queries_without_relevant']} of 80 queries have no relevant reference" in capsys.readouterr().out


def test_evaluate_embeddings_with_scann(tmp_path, clustered):
    embeddings, labels = clustered
    path = write_npz(tmp_path / "test.npz", embeddings, labels)
    output = tmp_path / "results.json"
    assert main(["evaluate", "--embeddings", path, "--k", "1,10", "--index", "scann", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["index"] == "scann"
    assert {"recall@1", "recall@10", "map@r", "r_precision"} <= set(results)


def test_evaluate_normalize_flag(tmp_path, capsys):
    rng = np.random.default_rng(8)
    raw = rng.normal(size=(50, 6)).astype(np.float32) * 4.0
    labels = np.arange(50) % 10
    path = write_npz(tmp_path / "raw.npz", raw, labels)
    assert main(["evaluate", "--embeddings", path]) == 2
    assert "whose L2 norm is not 1" in capsys.readouterr().err
    output = tmp_path / "results.json"
    assert main(["evaluate", "--embeddings", path, "--normalize", "--output", str(output)]) == 0
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert json.loads(output.read_text())["recall@1"] == pytest.approx(brute_force_metrics(unit, labels)["recall@1"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--embeddings", "{missing}"], "No embeddings file at"),
        (["--embeddings", "{no_labels}"], "has no array 'labels'"),
        (["--embeddings", "{not_npz}"], "is not an .npz file (a zip archive as numpy.savez writes)"),
        (["--embeddings", "{nan}"], "1 row(s) with NaN or Inf values: rows 7"),
        (["--embeddings", "{short_labels}"], "has 10 rows of 'embeddings' but 9 'labels': expected one label per row"),
        (["--embeddings", "{good}", "--k", "1,10"], "K=10 is larger than the 9 references"),
        (["--embeddings", "{good}", "--queries", "{good}"], "not both"),
        (["--queries", "{good}"], "needs both a queries file and a gallery file"),
        (["--queries", "{good}", "--gallery", "{empty}"], "gallery_embeddings is empty"),
        (["--embeddings", "{good}", "--model", "saved_models"], "--model is not used with --embeddings"),
        ([], "evaluate needs --model with --data-dir, --embeddings FILE, or --queries FILE with --gallery FILE"),
    ],
)
def test_evaluate_rejects_bad_input(tmp_path, capsys, arguments, message):
    good = grid_embeddings(10, seed=1)
    nan = good.copy()
    nan[7, 0] = np.nan
    paths = {
        "missing": str(tmp_path / "missing.npz"),
        "good": write_npz(tmp_path / "good.npz", good, np.arange(10) % 3),
        "nan": write_npz(tmp_path / "nan.npz", nan, np.arange(10) % 3),
        "short_labels": write_npz(tmp_path / "short.npz", good, np.arange(9)),
        "empty": write_npz(tmp_path / "empty.npz", np.zeros((0, 8), np.float32), np.zeros(0, np.int64)),
    }
    np.savez(tmp_path / "no_labels.npz", embeddings=good)
    paths["no_labels"] = str(tmp_path / "no_labels.npz")
    (tmp_path / "not_npz.npz").write_text("plain text")
    paths["not_npz"] = str(tmp_path / "not_npz.npz")
    status = main(["evaluate", *[argument.format(**paths) for argument in arguments]])
    assert status == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["evaluate"], ["train", "--data-dir", "d"]])
def test_k_flag_and_recall_k_alias(command):
    assert build_parser().parse_args([*command, "--k", "1,10,100"]).recall_k == (1, 10, 100)
    assert build_parser().parse_args([*command, "--recall-k", "1,5"]).recall_k == (1, 5)
