"""The tf.data image pipeline of the file benchmarks: decode, the recipe's transforms, P x K batches.

The transforms are those of the XBM recipe for 224-pixel ResNet-50 inputs:

- train: resize the shorter side to 256, take a random crop of 20% to 100%
  of the area with an aspect ratio between 3/4 and 4/3, resize it to
  224x224, flip it horizontally with probability 1/2;
- eval: resize the shorter side to 256, take the central 224x224 crop.

Both are computed as one crop of the decoded image followed by one resize
(bilinear with antialiasing). The crop box is mapped back to the original
pixels, so the result equals resize-then-crop up to interpolation and
rounding. A JPEG is decoded only inside the crop window
(`tf.image.decode_and_crop_jpeg`). Images are decoded as RGB whatever their
encoding (JPEG, PNG, BMP or GIF; grayscale is replicated to three channels)
and come out as float32 in [0, 255]. The backbone's own input normalisation
is the first layer of the networks in `keras_xbm.backbones`, so the same
pixels feed training, evaluation and the exported SavedModel.

Unreadable images: `find_unreadable_images` decodes every file once, and
the training job calls it before the first step (`verify_images`), so a
corrupt, truncated, empty or missing file stops the run before training
with an error naming the files. A file that turns bad after that check
stops the run at the step that reads it, with TensorFlow's decode error.
"""

import logging

import numpy as np
import tensorflow as tf

from keras_xbm.data.sampler import PKSampler

logger = logging.getLogger(__name__)

RESIZE_SIZE = 256
CROP_SIZE = 224
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def default_resize_size(crop_size):
    """Return the shorter side that keeps the recipe's 256:224 ratio for `crop_size` (256 for 224)."""
    return int(round(crop_size * RESIZE_SIZE / CROP_SIZE))


def decode_rgb(contents):
    """Decode JPEG, PNG, BMP or GIF bytes to uint8 `[height, width, 3]` (grayscale made RGB, first GIF frame)."""
    return tf.io.decode_image(contents, channels=3, expand_animations=False)


def image_shape(contents):
    """Return `[height, width]` of an encoded image, read from the JPEG header without decoding where possible."""
    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int32),
        lambda: tf.shape(decode_rgb(contents))[:2],
    )


def decode_crop(contents, box):
    """Decode the window `box = [top, left, height, width]` of an encoded image as uint8 RGB."""
    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.image.decode_and_crop_jpeg(contents, box, channels=3),
        lambda: tf.slice(decode_rgb(contents), tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], 3])),
    )


def resize_to(image, crop_size):
    resized = tf.image.resize(image, (crop_size, crop_size), method="bilinear", antialias=True)
    return tf.ensure_shape(resized, (crop_size, crop_size, 3))


def train_transform(contents, seed, crop_size=CROP_SIZE, scale=CROP_SCALE, ratio=CROP_RATIO):
    """Apply the train transform to one encoded image; return float32 `[crop_size, crop_size, 3]` in [0, 255].

    Args:
        contents: scalar string tensor, the encoded image.
        seed: int `[2]`, the seed of the stateless crop and flip draws.
        crop_size: output side. Defaults to 224.
        scale: range of the crop's share of the image area. Defaults to (0.2, 1.0).
        ratio: range of the crop's width / height. Defaults to (3/4, 4/3).

    The crop window comes from `sample_crop_box`.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    box = sample_crop_box(image_shape(contents), crop_seed, scale, ratio)
    image = resize_to(decode_crop(contents, box), crop_size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def sample_crop_box(shape, seed, scale=CROP_SCALE, ratio=CROP_RATIO):
    """Draw a random resized crop's window `[top, left, height, width]` inside an image of `shape = [height, width]`.

    The window covers a share of the area drawn from `scale`, with a width /
    height drawn from `ratio`. When 10 draws in a row do not fit inside the
    image, the window is the whole image.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([tf.cast(shape, tf.int32), [3]], axis=0),
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def eval_transform(contents, crop_size=CROP_SIZE, resize_size=RESIZE_SIZE):
    """Apply the eval transform to one encoded image; return float32 `[crop_size, crop_size, 3]` in [0, 255].

    Resizing the shorter side to `resize_size` and cropping the central
    `crop_size` square is the central square of side
    `shorter * crop_size / resize_size` of the original image, resized to
    `crop_size`.
    """
    shape = image_shape(contents)
    side = tf.cast(tf.round(tf.cast(tf.reduce_min(shape), tf.float32) * crop_size / resize_size), tf.int32)
    side = tf.clip_by_value(side, 1, tf.reduce_min(shape))
    top = (shape[0] - side) // 2
    left = (shape[1] - side) // 2
    return resize_to(decode_crop(contents, tf.stack([top, left, side, side])), crop_size)


def train_dataset(split, classes_per_batch, samples_per_class, crop_size=CROP_SIZE, seed=None, allow_repeats=True, scale=CROP_SCALE, ratio=CROP_RATIO):
    """Return an endless dataset of P x K batches `(images, {"labels", "sample_ids"})` read from image files.

    Batches come from `PKSampler`: P distinct classes, K images of each, a
    class smaller than K padded by repeating its images only when
    `allow_repeats` (the repeats share a sample id). Files are read and
    decoded in parallel (`tf.data.AUTOTUNE`) in a deterministic order, and
    every random draw is seeded by `seed` and the image's position in the
    stream, so a seed fixes the batches and their augmentation.

    Args:
        split: a `keras_xbm.data.FileSplit`.
        classes_per_batch: P.
        samples_per_class: K.
        crop_size: side of the images. Defaults to 224.
        seed: seed of the sampler and the augmentation. Defaults to `None`
            (a fresh seed).
        allow_repeats: see `PKSampler`. Defaults to True, because SOP and
            In-Shop have classes of two or three images.
        scale, ratio: see `train_transform`.

    Returns:
        Elements `(float32 [P*K, crop_size, crop_size, 3] in [0, 255],
        {"labels": int32 [P*K], "sample_ids": int32 [P*K]})`; the sample id
        is the image's row in `split`.
    """
    sampler = PKSampler(split.labels, classes_per_batch, samples_per_class, seed=seed, allow_repeats=allow_repeats)
    base_seed = int(np.random.default_rng(seed).integers(2**31 - 1))
    paths = tf.constant(split.paths)
    labels = tf.constant(split.labels, tf.int32)
    sample_ids = tf.constant(split.sample_ids, tf.int32)

    def load(index, position):
        contents = tf.io.read_file(tf.gather(paths, index))
        image = train_transform(contents, tf.stack([tf.constant(base_seed, tf.int64), position]), crop_size, scale, ratio)
        return image, {"labels": tf.gather(labels, index), "sample_ids": tf.gather(sample_ids, index)}

    # Unbatched so that decoding runs image by image in parallel; the fixed
    # batch size of the re-batching keeps each P x K block together.
    indices = sampler.index_dataset().unbatch()
    dataset = tf.data.Dataset.zip(indices, tf.data.Dataset.counter())
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(sampler.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(paths, crop_size=CROP_SIZE, resize_size=None, batch_size=64):
    """Return a finite dataset of eval-transformed image batches, float32 `[batch, crop_size, crop_size, 3]`, in `paths` order.

    Args:
        paths: image file paths.
        crop_size: side of the images. Defaults to 224.
        resize_size: the shorter side before the central crop. Defaults to
            `default_resize_size(crop_size)` (256 for 224).
        batch_size: images per batch. Defaults to 64.
    """
    resize_size = default_resize_size(crop_size) if resize_size is None else resize_size
    if resize_size < crop_size:
        raise ValueError(f"resize_size={resize_size} is smaller than crop_size={crop_size}: expected resize_size >= crop_size.")
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), tf.string))
    dataset = dataset.map(
        lambda path: eval_transform(tf.io.read_file(path), crop_size, resize_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def find_unreadable_images(paths):
    """Decode every file of `paths` once; return the paths that cannot be read or decoded, in input order.

    JPEGs are decoded at 1/8 scale, which still reads all of their
    compressed data, so truncated files are found at a fraction of the cost.
    """
    paths = list(paths)
    if not paths:
        return []

    def check(index):
        contents = tf.io.read_file(tf.gather(path_tensor, index))
        height = tf.cond(
            tf.io.is_jpeg(contents),
            lambda: tf.shape(tf.io.decode_jpeg(contents, channels=3, ratio=8))[0],
            lambda: tf.shape(decode_rgb(contents))[0],
        )
        return index, height

    path_tensor = tf.constant(paths)
    dataset = tf.data.Dataset.range(len(paths)).map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    # A read or decode error drops the element; the missing indices are the unreadable files.
    dataset = dataset.ignore_errors().batch(1024)
    readable = np.zeros(len(paths), bool)
    for indices, _ in dataset.as_numpy_iterator():
        readable[indices] = True
    return [path for path, ok in zip(paths, readable) if not ok]


def check_images(paths):
    """Raise `ValueError` naming the files of `paths` that cannot be read or decoded as images."""
    logger.info("Checking that %d image files decode", len(paths))
    unreadable = find_unreadable_images(paths)
    if unreadable:
        shown = ", ".join(repr(path) for path in unreadable[:10]) + (" ..." if len(unreadable) > 10 else "")
        raise ValueError(
            f"{len(unreadable)} of {len(paths)} image file(s) cannot be read or decoded as JPEG, PNG, BMP or GIF: "
            f"{shown}. Replace or remove them (and their list lines) before training."
        )
