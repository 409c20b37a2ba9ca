"""The benchmark readers on tiny trees in the official formats."""

import os

import numpy as np
import pytest
import tensorflow as tf

from keras_xbm.data import (
    load_benchmark,
    load_cars,
    load_cub,
    load_image_folder,
    load_inshop,
    load_sop,
    load_tfds_benchmark,
    load_vehicleid,
)
from tests.benchmark_trees import (
    write_cars_tree,
    write_cub_tree,
    write_inshop_tree,
    write_jpeg,
    write_lines,
    write_sop_tree,
    write_vehicleid_tree,
)


def check_split_matches(split, expected, root):
    """Check a split against `[(relative path, class key)]` in listing order."""
    assert [os.path.relpath(path, root) for path in split.paths] == [os.path.normpath(p) for p, _ in expected]
    assert [split.class_names[label] for label in split.labels] == [str(key) for _, key in expected]
    np.testing.assert_array_equal(split.sample_ids, np.arange(len(expected)))
    assert split.labels.dtype == np.int32
    assert split.sample_ids.dtype == np.int32


def replace_line(path, line_number, text):
    with open(path) as handle:
        lines = handle.read().splitlines()
    lines[line_number - 1] = text
    write_lines(path, lines)


# Stanford Online Products


def test_sop_counts_labels_and_protocol(tmp_path):
    listed = write_sop_tree(str(tmp_path))
    benchmark = load_sop(str(tmp_path))
    assert len(benchmark.train) == 59
    assert benchmark.train.num_classes == 20
    assert len(benchmark.query) == 6
    assert benchmark.query.num_classes == 3
    check_split_matches(benchmark.train, listed["train"], str(tmp_path))
    check_split_matches(benchmark.query, listed["test"], str(tmp_path))
    assert benchmark.train.class_names == [str(i) for i in range(1, 21)]
    assert benchmark.query.class_names == ["21", "22", "23"]
    assert benchmark.protocol == "leave-one-out"
    assert benchmark.gallery is None
    assert benchmark.ks == (1, 10, 100, 1000)


def test_sop_missing_list_names_path_and_layout(tmp_path):
    write_sop_tree(str(tmp_path))
    os.remove(tmp_path / "Ebay_test.txt")
    with pytest.raises(FileNotFoundError, match=r"Ebay_test\.txt.*Expected this layout: <data-dir>/Ebay_train\.txt"):
        load_sop(str(tmp_path))


def test_sop_missing_image_named(tmp_path):
    listed = write_sop_tree(str(tmp_path))
    os.remove(tmp_path / listed["test"][1][0])
    with pytest.raises(FileNotFoundError, match=r"1 of 65 listed image file\(s\) not found: .*00021_1\.JPG"):
        load_sop(str(tmp_path))


@pytest.mark.parametrize(
    "line, message",
    [
        ("3 2 1", r"Ebay_train\.txt, line 4: expected 4 fields \(image_id class_id super_class_id path\), found 3"),
        ("3 two 1 chair_final/x.JPG", r"Ebay_train\.txt, line 4: class_id 'two' is not an integer"),
        ("3 0 1 chair_final/x.JPG", r"Ebay_train\.txt, line 4: class_id 0 is out of range: expected 1 to inf"),
        ("3 2 13 chair_final/x.JPG", r"Ebay_train\.txt, line 4: super_class_id 13 is out of range: expected 1 to 12"),
    ],
)
def test_sop_bad_line_names_file_and_line(tmp_path, line, message):
    write_sop_tree(str(tmp_path))
    replace_line(tmp_path / "Ebay_train.txt", 4, line)
    with pytest.raises(ValueError, match=message):
        load_sop(str(tmp_path))


def test_sop_wrong_header_rejected(tmp_path):
    write_sop_tree(str(tmp_path))
    replace_line(tmp_path / "Ebay_test.txt", 1, "id class path")
    with pytest.raises(ValueError, match=r"Ebay_test\.txt, line 1: expected the header 'image_id class_id super_class_id path'"):
        load_sop(str(tmp_path))


def test_sop_class_in_both_splits_rejected(tmp_path):
    listed = write_sop_tree(str(tmp_path))
    relative = listed["test"][0][0]
    replace_line(tmp_path / "Ebay_test.txt", 2, f"1 5 1 {relative}")
    with pytest.raises(ValueError, match=r"1 class\(es\) appear in both .*Ebay_train\.txt and .*Ebay_test\.txt \(5\)"):
        load_sop(str(tmp_path))


def test_sop_empty_split_rejected(tmp_path):
    write_sop_tree(str(tmp_path))
    write_lines(tmp_path / "Ebay_test.txt", ["image_id class_id super_class_id path"])
    with pytest.raises(ValueError, match=r"The test split read from .*Ebay_test\.txt contains no images"):
        load_sop(str(tmp_path))


# In-Shop


@pytest.mark.parametrize("image_folder", ["img", os.path.join("Img", "img")])
def test_inshop_query_gallery_protocol(tmp_path, image_folder):
    entries = write_inshop_tree(str(tmp_path), image_folder=image_folder)
    benchmark = load_inshop(str(tmp_path))
    assert benchmark.protocol == "query-gallery"
    assert benchmark.ks == (1, 10, 20, 30, 40, 50)
    assert len(benchmark.train) == 59
    assert benchmark.train.num_classes == 20
    assert len(benchmark.query) == 6
    assert len(benchmark.gallery) == 6
    # Query and gallery share one labelling of the three test items.
    assert benchmark.query.class_names == benchmark.gallery.class_names == ["id_00000021", "id_00000022", "id_00000023"]
    np.testing.assert_array_equal(benchmark.query.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(benchmark.gallery.labels, [0, 0, 1, 1, 2, 2])
    root = os.path.dirname(image_folder) or "."
    expected_query = [(os.path.join(root, name), item) for name, item, status in (e.split() for e in entries) if status == "query"]
    check_split_matches(benchmark.query, expected_query, str(tmp_path))
    assert benchmark.evaluation_paths() == benchmark.query.paths + benchmark.gallery.paths


@pytest.mark.parametrize(
    "line_number, line, message",
    [
        (1, "many", r"list_eval_partition\.txt, line 1: expected the number of images, found 'many'"),
        (2, "image_name item_id", r"list_eval_partition\.txt, line 2: expected the header"),
        (5, "img/a.jpg id_00000001", r"list_eval_partition\.txt, line 5: expected 3 fields"),
        (5, "img/a.jpg id_00000001 validation", r"line 5: evaluation_status 'validation' is invalid"),
        (1, "7", r"line 1 announces 7 images but 71 are listed"),
    ],
)
def test_inshop_bad_partition_named(tmp_path, line_number, line, message):
    write_inshop_tree(str(tmp_path))
    replace_line(tmp_path / "Eval" / "list_eval_partition.txt", line_number, line)
    with pytest.raises(ValueError, match=message):
        load_inshop(str(tmp_path))


def test_inshop_missing_partition_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Eval/list_eval_partition\.txt.*image_name item_id evaluation_status"):
        load_inshop(str(tmp_path))


# VehicleID


@pytest.mark.parametrize("test_list, vehicles", [(800, 3), (1600, 4), (2400, 5)])
def test_vehicleid_test_lists(tmp_path, test_list, vehicles):
    write_vehicleid_tree(str(tmp_path))
    benchmark = load_vehicleid(str(tmp_path), test_list=test_list)
    assert len(benchmark.train) == 59
    assert benchmark.train.num_classes == 20
    assert benchmark.query.num_classes == vehicles
    assert len(benchmark.query) == 2 * vehicles
    assert benchmark.query.class_names == [str(1000 + i) for i in range(vehicles)]
    assert benchmark.query.paths[0] == os.path.join(str(tmp_path), "image", "00010000.jpg")
    assert benchmark.protocol == "leave-one-out"
    assert benchmark.ks == (1, 5)
    assert benchmark.description == f"test_list_{test_list}.txt"


def test_vehicleid_rejects_unknown_test_list(tmp_path):
    write_vehicleid_tree(str(tmp_path))
    with pytest.raises(ValueError, match="Invalid test_list=1000: expected one of 800, 1600, 2400"):
        load_vehicleid(str(tmp_path), test_list=1000)


def test_vehicleid_missing_image_folder_named(tmp_path):
    write_vehicleid_tree(str(tmp_path))
    os.rename(tmp_path / "image", tmp_path / "images")
    with pytest.raises(FileNotFoundError, match=r"Directory not found: '.*/image'.*image/<stem>\.jpg"):
        load_vehicleid(str(tmp_path))


@pytest.mark.parametrize(
    "line, message",
    [
        ("00000000", r"train_list\.txt, line 1: expected 2 fields \(image_stem vehicle_id\), found 1"),
        ("00000000 -3", r"train_list\.txt, line 1: vehicle_id -3 is out of range"),
    ],
)
def test_vehicleid_bad_line_named(tmp_path, line, message):
    write_vehicleid_tree(str(tmp_path))
    replace_line(tmp_path / "train_test_split" / "train_list.txt", 1, line)
    with pytest.raises(ValueError, match=message):
        load_vehicleid(str(tmp_path))


# CUB-200-2011 and Cars196, split by class


@pytest.mark.parametrize("nested", [False, True])
def test_cub_split_by_class(tmp_path, nested):
    folder = write_cub_tree(str(tmp_path))
    benchmark = load_cub(folder if nested else str(tmp_path))
    assert benchmark.train.class_names == ["1", "2", "3", "100"]
    assert benchmark.query.class_names == ["101", "150", "200"]
    assert len(benchmark.train) == 8
    assert len(benchmark.query) == 6
    np.testing.assert_array_equal(benchmark.train.labels, [0, 0, 1, 1, 2, 2, 3, 3])
    assert benchmark.query.paths[0] == os.path.join(folder, "images", "101.Bird_101", "Bird_101_0000.jpg")
    assert benchmark.protocol == "leave-one-out"
    assert benchmark.ks == (1, 2, 4, 8)


def test_cub_class_out_of_range_named(tmp_path):
    folder = write_cub_tree(str(tmp_path))
    replace_line(os.path.join(folder, "image_class_labels.txt"), 3, "3 201")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt, line 3: class_id 201 is out of range: expected 1 to 200"):
        load_cub(folder)


def test_cub_unlabelled_image_rejected(tmp_path):
    folder = write_cub_tree(str(tmp_path))
    with open(os.path.join(folder, "image_class_labels.txt")) as handle:
        lines = handle.read().splitlines()
    write_lines(os.path.join(folder, "image_class_labels.txt"), lines[:-1])
    with pytest.raises(ValueError, match=r"1 image id\(s\) of .*images\.txt have no class"):
        load_cub(folder)


def test_cub_empty_test_split_rejected(tmp_path):
    folder = write_cub_tree(str(tmp_path), classes=(1, 2))
    with pytest.raises(ValueError, match=r"The test \(classes 101-200\) split read from .* contains no images"):
        load_cub(folder)


def test_cars_split_by_class_ignores_test_flag(tmp_path):
    records = write_cars_tree(str(tmp_path))
    benchmark = load_cars(str(tmp_path))
    assert benchmark.train.class_names == ["1", "50", "98"]
    assert benchmark.query.class_names == ["99", "150", "196"]
    assert [os.path.relpath(p, str(tmp_path)) for p in benchmark.train.paths] == [r[0] for r in records[:6]]
    assert len(benchmark.query) == 6
    assert benchmark.protocol == "leave-one-out"


def test_cars_class_out_of_range_named(tmp_path):
    write_cars_tree(str(tmp_path), classes=(1, 99, 197))
    with pytest.raises(ValueError, match=r"cars_annos\.mat, annotation 5 \(car_ims/000005\.jpg\): class 197 is out of range"):
        load_cars(str(tmp_path))


def test_cars_missing_annotations_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cars_annos\.mat.*relative_im_path"):
        load_cars(str(tmp_path))


# Class folders


def test_folder_split_by_sorted_classes(tmp_path):
    for index, name in enumerate(["e", "a", "d", "b", "c", "f"]):
        for shot in range(index % 2 + 2):
            write_jpeg(str(tmp_path / name / f"{shot}.jpg"), seed=index * 10 + shot)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    benchmark = load_benchmark("folder", str(tmp_path))
    assert benchmark.train.class_names == ["a", "b", "c"]
    assert benchmark.query.class_names == ["d", "e", "f"]
    assert len(benchmark.train) == 3 + 2 + 3
    assert all(path.endswith(".jpg") for path in benchmark.train.paths)


def test_folder_train_test_layout(tmp_path):
    for split, names in (("train", ["x", "y"]), ("test", ["z"])):
        for name in names:
            for shot in range(2):
                write_jpeg(str(tmp_path / split / name / f"{shot}.png.jpg"), seed=shot)
    benchmark = load_image_folder(str(tmp_path))
    assert benchmark.train.class_names == ["x", "y"]
    assert benchmark.query.class_names == ["z"]


def test_folder_with_one_class_rejected(tmp_path):
    write_jpeg(str(tmp_path / "only" / "0.jpg"), seed=0)
    with pytest.raises(ValueError, match="contains 1 class folder"):
        load_image_folder(str(tmp_path))


def test_load_benchmark_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown benchmark 'mnist'"):
        load_benchmark("mnist", str(tmp_path))


# TFDS, converted to files and re-split by class


@pytest.mark.parametrize(
    "name, tfds_name, label_field, labels, train_count",
    [
        ("cub", "caltech_birds2011", "label", [0, 99, 100, 199, 0, 150], 3),
        ("cars", "cars196", "label", [0, 97, 98, 195, 97, 120], 3),
        ("sop", "stanford_online_products", "class_id", [0, 11317, 11318, 22633, 5, 20000], 3),
    ],
)
def test_tfds_conversion_on_mock_data(tmp_path, name, tfds_name, label_field, labels, train_count):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8) for i in range(len(labels))]

    def as_dataset(builder, split=None, **kwargs):
        # The first four examples in TFDS' train split, the others in its test split.
        rows = range(4) if split == "train" else range(4, len(labels))

        def examples():
            for row in rows:
                yield {"image": images[row], label_field: labels[row]}

        signature = {"image": tf.TensorSpec([None, None, 3], tf.uint8), label_field: tf.TensorSpec([], tf.int64)}
        return tf.data.Dataset.from_generator(examples, output_signature=signature)

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        benchmark = load_tfds_benchmark(name, str(tmp_path / "converted"), builder=tfds.builder(tfds_name))

    split_point = {"cub": 100, "cars": 98, "sop": 11318}[name]
    train_rows = [row for row, label in enumerate(labels) if label < split_point]
    test_rows = [row for row, label in enumerate(labels) if label >= split_point]
    assert len(benchmark.train) == train_count
    assert benchmark.train.class_names == sorted({str(labels[row]) for row in train_rows}, key=int)
    assert [benchmark.query.class_names[label] for label in benchmark.query.labels] == [str(labels[row]) for row in test_rows]
    # The converted PNG files hold the exact pixels TFDS returned.
    for row, path in zip(test_rows, benchmark.query.paths):
        decoded = tf.io.decode_png(tf.io.read_file(path)).numpy()
        np.testing.assert_array_equal(decoded, images[row])
    assert benchmark.protocol == "leave-one-out"

    # A second call reuses the conversion without touching TFDS.
    again = load_tfds_benchmark(name, str(tmp_path / "converted"), builder=object())
    assert again.train.paths == benchmark.train.paths
