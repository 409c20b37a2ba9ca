"""The image pipeline: decoding, the recipe's transforms, P x K batches from files, unreadable files."""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_xbm.data.images import (
    check_images,
    default_resize_size,
    eval_dataset,
    eval_transform,
    find_unreadable_images,
    sample_crop_box,
    train_dataset,
    train_transform,
)
from keras_xbm.data.listing import make_split
from tests.benchmark_trees import write_jpeg


def write_png(path, pixels):
    with open(path, "wb") as handle:
        handle.write(tf.io.encode_png(np.asarray(pixels, np.uint8)).numpy())
    return str(path)


def gradient_image(height, width):
    """A smooth RGB image that bilinear resizing maps almost exactly onto itself."""
    rows = np.linspace(0, 200, height)[:, None]
    cols = np.linspace(0, 200, width)[None, :]
    return np.stack([rows + 0 * cols, 0 * rows + cols, (rows + cols) / 2], axis=-1).round().astype(np.uint8)


def read(path):
    return tf.io.read_file(str(path))


def test_default_resize_keeps_recipe_ratio():
    assert default_resize_size(224) == 256
    assert default_resize_size(112) == 128
    assert default_resize_size(32) == 37


def test_grayscale_jpeg_and_png_decode_to_rgb(tmp_path):
    gray_jpeg = write_jpeg(str(tmp_path / "gray.jpg"), seed=1, gray=True)
    gray_png = write_png(tmp_path / "gray.png", np.full((30, 40, 1), 77))
    rgba_png = write_png(tmp_path / "rgba.png", np.concatenate([np.full((30, 40, 3), 50), np.full((30, 40, 1), 9)], -1))
    for path in (gray_jpeg, gray_png):
        image = eval_transform(read(path), crop_size=16, resize_size=20).numpy()
        assert image.shape == (16, 16, 3)
        np.testing.assert_allclose(image[..., 0], image[..., 1])
        np.testing.assert_allclose(image[..., 0], image[..., 2])
    np.testing.assert_allclose(eval_transform(read(gray_png), 16, 20).numpy(), 77.0, atol=1e-3)
    np.testing.assert_allclose(eval_transform(read(rgba_png), 16, 20).numpy(), 50.0, atol=1e-3)


@pytest.mark.parametrize("height, width", [(60, 90), (90, 60), (64, 64)])
def test_eval_transform_matches_resize_then_centre_crop(tmp_path, height, width):
    pixels = gradient_image(height, width)
    path = write_png(tmp_path / "gradient.png", pixels)
    crop, resize = 28, 32
    # The reference: shorter side to 32, then the central 28x28.
    scale = resize / min(height, width)
    resized = tf.image.resize(pixels.astype(np.float32), (round(height * scale), round(width * scale)), antialias=True).numpy()
    top = (resized.shape[0] - crop) // 2
    left = (resized.shape[1] - crop) // 2
    expected = resized[top : top + crop, left : left + crop]
    result = eval_transform(read(path), crop_size=crop, resize_size=resize).numpy()
    assert result.shape == (crop, crop, 3)
    assert np.abs(result - expected).max() < 4.0


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(8, 400),
    width=st.integers(8, 400),
    seed=st.integers(0, 2**31 - 1),
)
def test_crop_box_area_and_ratio(height, width, seed):
    top, left, box_height, box_width = sample_crop_box(tf.constant([height, width]), tf.constant([seed, 7], tf.int64)).numpy()
    assert top >= 0
    assert left >= 0
    assert top + box_height <= height
    assert left + box_width <= width
    whole_image = (top, left, box_height, box_width) == (0, 0, height, width)
    if not whole_image:
        area = box_height * box_width / (height * width)
        assert 0.2 <= area <= 1.0
        # Rounding the sides to whole pixels moves the ratio slightly off the drawn value.
        assert 0.7 <= box_width / box_height <= 1.43


def test_train_transform_flips_half(tmp_path):
    pixels = gradient_image(40, 40)
    path = write_png(tmp_path / "square.png", pixels)
    whole = tf.image.resize(pixels.astype(np.float32), (24, 24), antialias=True).numpy()
    flipped = whole[:, ::-1]
    outcomes = collections.Counter()
    for position in range(20):
        image = train_transform(read(path), tf.constant([3, position], tf.int64), crop_size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0)).numpy()
        if np.allclose(image, whole, atol=1e-3):
            outcomes["kept"] += 1
        elif np.allclose(image, flipped, atol=1e-3):
            outcomes["flipped"] += 1
    assert outcomes["kept"] + outcomes["flipped"] == 20
    assert outcomes["kept"] >= 3
    assert outcomes["flipped"] >= 3


def test_train_transform_is_a_function_of_its_seed(tmp_path):
    path = write_jpeg(str(tmp_path / "a.jpg"), seed=5, height=80, width=120)
    first = train_transform(read(path), tf.constant([1, 2], tf.int64), crop_size=32).numpy()
    again = train_transform(read(path), tf.constant([1, 2], tf.int64), crop_size=32).numpy()
    other = train_transform(read(path), tf.constant([1, 3], tf.int64), crop_size=32).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32
    assert first.min() >= 0.0
    assert first.max() <= 255.0


def constant_class_split(tmp_path, sizes):
    """One PNG per image, every pixel equal to the image's row index, so a batch shows which files it read."""
    paths, keys = [], []
    for class_id, size in enumerate(sizes):
        for _ in range(size):
            row = len(paths)
            paths.append(write_png(tmp_path / f"{row}.png", np.full((20 + row % 3, 24, 3), row)))
            keys.append(f"class{class_id}")
    return make_split(paths, keys)


def test_train_dataset_pk_batches(tmp_path):
    split = constant_class_split(tmp_path, [4, 5, 4, 6])
    dataset = train_dataset(split, classes_per_batch=2, samples_per_class=3, crop_size=16, seed=0, allow_repeats=False)
    for images, targets in dataset.take(6):
        images = images.numpy()
        ids = targets["sample_ids"].numpy()
        labels = targets["labels"].numpy()
        assert images.shape == (6, 16, 16, 3)
        # Each image is the file of its sample id.
        np.testing.assert_allclose(images.reshape(6, -1).mean(axis=1), ids, atol=1e-3)
        np.testing.assert_array_equal(labels, split.labels[ids])
        assert len(set(ids.tolist())) == 6
        counts = collections.Counter(labels.tolist())
        assert len(counts) == 2
        assert set(counts.values()) == {3}


def test_train_dataset_pads_small_classes_with_repeats(tmp_path):
    split = constant_class_split(tmp_path, [2, 5])
    dataset = train_dataset(split, classes_per_batch=2, samples_per_class=4, crop_size=8, seed=1, allow_repeats=True)
    _, targets = next(iter(dataset))
    ids = targets["sample_ids"].numpy()
    small = ids[targets["labels"].numpy() == 0]
    assert len(small) == 4
    assert set(small.tolist()) == {0, 1}


def test_train_dataset_is_reproducible_by_seed(tmp_path):
    split = constant_class_split(tmp_path, [3, 3, 3])
    first = [batch[0].numpy() for batch in train_dataset(split, 2, 2, crop_size=8, seed=4).take(3)]
    second = [batch[0].numpy() for batch in train_dataset(split, 2, 2, crop_size=8, seed=4).take(3)]
    np.testing.assert_array_equal(np.stack(first), np.stack(second))


def test_eval_dataset_keeps_order_and_last_partial_batch(tmp_path):
    split = constant_class_split(tmp_path, [3, 4])
    batches = [batch.numpy() for batch in eval_dataset(split.paths, crop_size=8, batch_size=3)]
    assert [len(batch) for batch in batches] == [3, 3, 1]
    means = np.concatenate(batches).reshape(7, -1).mean(axis=1)
    np.testing.assert_allclose(means, np.arange(7), atol=1e-3)


def test_eval_dataset_rejects_resize_below_crop(tmp_path):
    with pytest.raises(ValueError, match="resize_size=20 is smaller than crop_size=24"):
        eval_dataset(["x.jpg"], crop_size=24, resize_size=20)


def test_unreadable_images_found_and_named(tmp_path):
    good_jpeg = write_jpeg(str(tmp_path / "good.jpg"), seed=0, height=64, width=64)
    good_png = write_png(tmp_path / "good.png", np.zeros((8, 8, 3)))
    truncated = str(tmp_path / "truncated.jpg")
    with open(good_jpeg, "rb") as source, open(truncated, "wb") as target:
        target.write(source.read()[:300])
    empty = str(tmp_path / "empty.jpg")
    open(empty, "wb").close()
    text = str(tmp_path / "text.png")
    with open(text, "w") as handle:
        handle.write("not an image")
    missing = str(tmp_path / "missing.jpg")
    paths = [good_jpeg, truncated, good_png, empty, text, missing]
    assert find_unreadable_images(paths) == [truncated, empty, text, missing]
    assert find_unreadable_images([good_jpeg, good_png]) == []
    with pytest.raises(ValueError, match=r"4 of 6 image file\(s\) cannot be read or decoded.*truncated\.jpg.*empty\.jpg"):
        check_images(paths)
    assert os.path.isfile(good_jpeg)
