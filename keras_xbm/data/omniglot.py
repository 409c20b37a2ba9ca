"""The Omniglot retrieval benchmark: train on some alphabets, retrieve characters of unseen ones.

The benchmark uses the two "minimal background" sets of Omniglot (Lake et al.,
Science 2015). Each character was drawn by 20 people; a class is one character
of one alphabet.

- train: every character of `images_background_small1` (Balinese,
  Early_Aramaic, Greek, Korean, Latin): 136 classes, 2,720 images;
- test: the characters of the alphabets only `images_background_small2` has
  (Japanese_(katakana), Sanskrit, Tagalog): 106 classes, 2,120 images.

Greek and Latin are in both sets with identical files, so they are read once,
from the first. Images are 105x105 black strokes on white; they are returned
as float32 "ink" in [0, 1] (1 on the strokes), resized to `image_size`.
"""

import dataclasses
import logging
import os
import re
import zipfile

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

TRAIN_ARCHIVE = "images_background_small1"
TEST_ARCHIVE = "images_background_small2"
TEST_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
PATH_PATTERN = re.compile(r"^(?:.*/)?(images_background_small[12])/([^/]+)/(character\d+)/([^/]+\.png)$")


@dataclasses.dataclass
class ImageSplit:
    """Images of one split with their integer labels.

    Attributes:
        images: float32 `[count, height, width, 1]`, ink in [0, 1].
        labels: int32 `[count]`, class index in `class_names`.
        class_names: one name per class, `"<alphabet>/<character>"`.
        paths: the source path of each image inside its archive or folder.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list
    paths: list

    def __len__(self):
        return len(self.labels)

    @property
    def num_classes(self):
        return len(self.class_names)


def list_omniglot_files(data_dir):
    """Map `(archive, alphabet, character, file)` to a function returning the PNG bytes.

    Reads `images_background_small1.zip` and `images_background_small2.zip` in
    `data_dir`, or their extracted folders of the same names.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"Omniglot data directory not found: {data_dir!r}. Expected a directory holding "
            f"{TRAIN_ARCHIVE}.zip and {TEST_ARCHIVE}.zip, or their extracted folders."
        )
    files = {}
    for archive in (TRAIN_ARCHIVE, TEST_ARCHIVE):
        zip_path = os.path.join(data_dir, archive + ".zip")
        folder = os.path.join(data_dir, archive)
        if os.path.isfile(zip_path):
            files.update(list_zip(zip_path))
        elif os.path.isdir(folder):
            files.update(list_folder(folder))
        else:
            raise FileNotFoundError(
                f"Neither {zip_path!r} nor the folder {folder!r} exists. The Omniglot benchmark needs "
                f"{TRAIN_ARCHIVE} and {TEST_ARCHIVE}, as zips or extracted folders, "
                "laid out as <archive>/<alphabet>/characterNN/<drawing>.png."
            )
    return files


def list_zip(zip_path):
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    files = {}
    for name in names:
        match = PATH_PATTERN.match(name)
        if match:
            files[match.groups()] = (zip_path, name)
    return files


def list_folder(folder):
    files = {}
    root = os.path.dirname(os.path.abspath(folder))
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            match = PATH_PATTERN.match(os.path.relpath(path, root).replace(os.sep, "/"))
            if match:
                files[match.groups()] = (None, path)
    return files


def read_bytes(location, open_zips):
    zip_path, name = location
    if zip_path is None:
        with open(name, "rb") as handle:
            return handle.read()
    if zip_path not in open_zips:
        open_zips[zip_path] = zipfile.ZipFile(zip_path)
    return open_zips[zip_path].read(name)


def decode_images(locations, image_size):
    """Decode PNGs to float32 ink in [0, 1] of shape `[count, image_size, image_size, 1]`."""
    images = np.empty((len(locations), image_size, image_size, 1), np.float32)
    open_zips = {}
    try:
        for index, location in enumerate(locations):
            data = read_bytes(location, open_zips)
            try:
                image = tf.io.decode_png(data, channels=1)
            except tf.errors.InvalidArgumentError as error:
                raise ValueError(f"Cannot decode Omniglot image {location[1]!r}: {error.message}") from error
            ink = 1.0 - tf.cast(image, tf.float32) / 255.0
            images[index] = tf.image.resize(ink, (image_size, image_size), method="area").numpy()
    finally:
        for archive in open_zips.values():
            archive.close()
    return images


def build_split(entries, image_size):
    entries = sorted(entries)
    class_names = sorted({f"{alphabet}/{character}" for ((_, alphabet, character, _), _) in entries})
    class_index = {name: index for index, name in enumerate(class_names)}
    labels = np.array(
        [class_index[f"{alphabet}/{character}"] for ((_, alphabet, character, _), _) in entries], np.int32
    )
    locations = [location for (_, location) in entries]
    paths = ["/".join(key) for (key, _) in entries]
    return ImageSplit(decode_images(locations, image_size), labels, class_names, paths)


def load_omniglot(data_dir, image_size=32):
    """Read the Omniglot benchmark's train and test splits from `data_dir`.

    Args:
        data_dir: directory with `images_background_small1.zip` and
            `images_background_small2.zip` (or the folders they extract to).
        image_size: side of the square images returned. Defaults to 32.

    Returns:
        `(train, test)`, two `ImageSplit`s with labels `0 .. num_classes - 1`
        within each split; classes are sorted by name, images by path.

    Raises:
        FileNotFoundError: when an archive or folder is missing.
        ValueError: when a split comes out empty or an image cannot be decoded.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"Invalid image_size={image_size!r}: expected an integer of at least 8 pixels.")
    files = list_omniglot_files(data_dir)
    train_entries = [(key, location) for key, location in files.items() if key[0] == TRAIN_ARCHIVE]
    test_entries = [
        (key, location)
        for key, location in files.items()
        if key[0] == TEST_ARCHIVE and key[1] in TEST_ALPHABETS
    ]
    for name, entries in (("train", train_entries), ("test", test_entries)):
        if not entries:
            raise ValueError(
                f"The Omniglot {name} split in {data_dir!r} is empty: expected PNG files at "
                "<archive>/<alphabet>/characterNN/<drawing>.png."
            )
    logger.info("Decoding %d train and %d test Omniglot images", len(train_entries), len(test_entries))
    return build_split(train_entries, image_size), build_split(test_entries, image_size)


def load_omniglot_tfds(image_size=32, data_dir=None, builder=None):
    """Build the same benchmark from TensorFlow Datasets' `omniglot` (downloads it once).

    TFDS' splits `small1` and `small2` are the two minimal background sets. Its
    images are 105x105 RGB with black strokes; the result matches
    `load_omniglot`, except that `paths` hold `tfds:<split>/<index>`.

    Args:
        image_size: side of the square images returned. Defaults to 32.
        data_dir: TFDS data directory. Defaults to TFDS' own default.
        builder: a TFDS dataset builder to read instead of
            `tfds.builder("omniglot", data_dir=data_dir)`.
    """
    import tensorflow_datasets as tfds

    if builder is None:
        builder = tfds.builder("omniglot", data_dir=data_dir)
    builder.download_and_prepare()
    alphabet_names = builder.info.features["alphabet"].names
    splits = {}
    for split in ("small1", "small2"):
        entries = []
        for index, example in enumerate(tfds.as_numpy(builder.as_dataset(split=split))):
            alphabet = alphabet_names[int(example["alphabet"])]
            # TFDS numbers characters from 0; the folders of the zips from 1.
            character = f"character{int(example['alphabet_char_id']) + 1:02d}"
            entries.append(((alphabet, character, f"tfds:{split}/{index}"), example["image"]))
        splits[split] = entries

    train_entries = splits["small1"]
    test_entries = [entry for entry in splits["small2"] if entry[0][0] in TEST_ALPHABETS]
    for name, entries in (("train", train_entries), ("test", test_entries)):
        if not entries:
            raise ValueError(
                f"The Omniglot {name} split read from TFDS is empty "
                f"(alphabets found: {sorted(set(alphabet_names))[:5]} ...)."
            )
    return tfds_split(train_entries, image_size), tfds_split(test_entries, image_size)


def tfds_split(entries, image_size):
    entries = sorted(entries, key=lambda entry: entry[0])
    class_names = sorted({f"{alphabet}/{character}" for ((alphabet, character, _), _) in entries})
    class_index = {name: index for index, name in enumerate(class_names)}
    labels = np.array([class_index[f"{alphabet}/{character}"] for ((alphabet, character, _), _) in entries], np.int32)
    images = np.stack([image for (_, image) in entries])
    gray = tf.image.rgb_to_grayscale(images) if images.shape[-1] == 3 else images
    ink = 1.0 - tf.cast(gray, tf.float32) / 255.0
    resized = tf.image.resize(ink, (image_size, image_size), method="area").numpy().astype(np.float32)
    return ImageSplit(resized, labels, class_names, [path for ((_, _, path), _) in entries])
