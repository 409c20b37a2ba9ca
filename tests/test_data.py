import collections

import numpy as np
import pytest

from keras_xbm.data import PKSampler, load_omniglot, load_omniglot_tfds, pk_dataset
from tests.conftest import write_omniglot_zip


def test_real_omniglot_split_counts(omniglot_dir):
    train, test = load_omniglot(omniglot_dir, image_size=32)
    assert len(train) == 2720
    assert train.num_classes == 136
    assert len(test) == 2120
    assert test.num_classes == 106
    assert set(np.bincount(train.labels)) == {20}
    assert set(np.bincount(test.labels)) == {20}
    assert {name.split("/")[0] for name in test.class_names} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert {name.split("/")[0] for name in train.class_names} == {
        "Balinese", "Early_Aramaic", "Greek", "Korean", "Latin",
    }
    assert train.images.shape == (2720, 32, 32, 1)
    assert train.images.dtype == np.float32
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    # Ink: strokes are 1, the white background 0, and strokes cover a small part.
    assert 0.02 < train.images.mean() < 0.3


def synthetic_tree(tmp_path, image_side=20):
    """Two zips in the Omniglot layout; each image is a constant ink level that encodes its class."""
    small1 = {("Latin", "character01"): [np.full((image_side, image_side), 1.0)] * 2,
              ("Korean", "character02"): [np.zeros((image_side, image_side))] * 2}
    small2 = {("Latin", "character01"): [np.full((image_side, image_side), 1.0)] * 2,
              ("Tagalog", "character03"): [np.full((image_side, image_side), 1.0)] * 3,
              ("Sanskrit", "character01"): [np.zeros((image_side, image_side))] * 2}
    write_omniglot_zip(tmp_path / "images_background_small1.zip", "images_background_small1", small1)
    write_omniglot_zip(tmp_path / "images_background_small2.zip", "images_background_small2", small2)
    return tmp_path


def test_synthetic_zips_give_exact_labels_and_pixels(tmp_path):
    train, test = load_omniglot(str(synthetic_tree(tmp_path)), image_size=8)
    assert train.class_names == ["Korean/character02", "Latin/character01"]
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1])
    np.testing.assert_allclose(train.images[train.labels == 0], 0.0)
    np.testing.assert_allclose(train.images[train.labels == 1], 1.0)
    # Latin is shared by both archives and stays out of the test split.
    assert test.class_names == ["Sanskrit/character01", "Tagalog/character03"]
    np.testing.assert_array_equal(test.labels, [0, 0, 1, 1, 1])
    np.testing.assert_allclose(test.images[test.labels == 1], 1.0)


def test_extracted_folders_match_zips(tmp_path):
    import zipfile

    (tmp_path / "zipped").mkdir()
    zipped = synthetic_tree(tmp_path / "zipped")
    extracted = tmp_path / "extracted"
    for name in ("images_background_small1", "images_background_small2"):
        with zipfile.ZipFile(zipped / f"{name}.zip") as handle:
            handle.extractall(extracted)
    from_zip = load_omniglot(str(zipped), image_size=8)
    from_folder = load_omniglot(str(extracted), image_size=8)
    for a, b in zip(from_zip, from_folder):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.class_names == b.class_names


def test_missing_data_dir_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_omniglot(str(missing))


def test_missing_archive_named(tmp_path):
    synthetic_tree(tmp_path)
    (tmp_path / "images_background_small2.zip").unlink()
    with pytest.raises(FileNotFoundError, match="images_background_small2"):
        load_omniglot(str(tmp_path))


def test_tfds_loader_on_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    names = sorted([f"Alphabet_{i:02d}" for i in range(47)] + ["Japanese_(katakana)", "Sanskrit", "Tagalog"])
    tagalog = names.index("Tagalog")
    ink_level = {0: 255, tagalog: 0}

    def as_dataset(builder, *args, **kwargs):
        # Eight examples: alphabets 0 and Tagalog, two characters each, two drawings each.
        def examples():
            for i in range(8):
                alphabet = 0 if i < 4 else tagalog
                pixel = ink_level[alphabet]
                yield {
                    "image": np.full((105, 105, 3), pixel, np.uint8),
                    "alphabet": alphabet,
                    "alphabet_char_id": (i // 2) % 2,
                    "label": i // 2,
                }

        return tf.data.Dataset.from_generator(
            examples, output_types=builder.info.features.dtype, output_shapes=builder.info.features.shape
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        builder = tfds.builder("omniglot")
        builder.info.features["alphabet"].names = names
        train, test = load_omniglot_tfds(image_size=16, builder=builder)

    assert len(train) == 8
    assert train.class_names == [
        "Alphabet_00/character01", "Alphabet_00/character02", "Tagalog/character01", "Tagalog/character02",
    ]
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2, 3, 3])
    assert train.images.shape == (8, 16, 16, 1)
    # White images are no ink, black images full ink.
    np.testing.assert_allclose(train.images[:4], 0.0)
    np.testing.assert_allclose(train.images[4:], 1.0)
    assert test.class_names == ["Tagalog/character01", "Tagalog/character02"]
    assert len(test) == 4


def test_sampler_batches_are_p_by_k_with_distinct_ids():
    labels = np.repeat(np.arange(10), 5)
    sampler = PKSampler(labels, classes_per_batch=3, samples_per_class=4, seed=1)
    for _ in range(50):
        batch = sampler.sample_batch()
        assert batch.shape == (12,)
        assert len(set(batch.tolist())) == 12
        counts = collections.Counter(labels[batch].tolist())
        assert len(counts) == 3
        assert set(counts.values()) == {4}
        # Class-contiguous order.
        assert (labels[batch].reshape(3, 4) == labels[batch].reshape(3, 4)[:, :1]).all()


def test_sampler_is_deterministic_by_seed():
    labels = np.repeat(np.arange(10), 5)
    first = [PKSampler(labels, 2, 2, seed=7).sample_batch() for _ in range(1)]
    second = [PKSampler(labels, 2, 2, seed=7).sample_batch() for _ in range(1)]
    np.testing.assert_array_equal(first, second)


def test_sampler_pads_small_class_only_when_allowed():
    labels = np.array([0, 0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="samples_per_class=4 is larger than class 1, which has 2 images"):
        PKSampler(labels, 2, 4)
    sampler = PKSampler(labels, 2, 4, seed=0, allow_repeats=True)
    batch = sampler.sample_batch()
    small = batch[labels[batch] == 1]
    assert sorted(set(small.tolist())) == [4, 5]
    assert len(small) == 4


@pytest.mark.parametrize(
    "p, k, message",
    [(0, 2, "classes_per_batch=0"), (5, 2, "classes_per_batch=5 is larger than the 3 classes"), (2, 0, "samples_per_class=0")],
)
def test_sampler_rejects_bad_sizes(p, k, message):
    with pytest.raises(ValueError, match=message):
        PKSampler(np.repeat(np.arange(3), 4), p, k)


def test_pk_dataset_yields_labels_and_sample_ids():
    images = np.arange(40, dtype=np.float32).reshape(40, 1) * np.ones((1, 3), np.float32)
    labels = np.repeat(np.arange(8), 5).astype(np.int32)
    dataset = pk_dataset(images, labels, classes_per_batch=2, samples_per_class=3, seed=0)
    for batch_images, targets in dataset.take(5):
        ids = targets["sample_ids"].numpy()
        np.testing.assert_array_equal(batch_images.numpy()[:, 0], ids)
        np.testing.assert_array_equal(targets["labels"].numpy(), labels[ids])
        assert batch_images.shape == (6, 3)
