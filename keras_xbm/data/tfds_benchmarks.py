"""SOP, CUB-200-2011 and Cars196 through TensorFlow Datasets, re-split by class.

For users with a network. TFDS downloads and prepares the dataset once.
`load_tfds_benchmark` then writes every image to an image folder with a
label list, once per output folder, and splits it by class as the on-disk
readers do:

| name   | TFDS dataset               | label field | train labels (0-based) |
| ------ | -------------------------- | ----------- | ---------------------- |
| `sop`  | `stanford_online_products` | `class_id`  | 0-11317 (TFDS' own train split) |
| `cub`  | `caltech_birds2011`        | `label`     | 0-99 (classes 1-100)   |
| `cars` | `cars196`                  | `label`     | 0-97 (classes 1-98)    |

TFDS splits CUB and Cars per image, for classification; both TFDS splits are
read and pooled before the split by class.
"""

import logging
import os

import numpy as np
import tensorflow as tf

from keras_xbm.data import cars, cub, sop
from keras_xbm.data.listing import Benchmark, check_not_empty, make_split, parse_int, read_list_file

logger = logging.getLogger(__name__)

TFDS_BENCHMARKS = {
    "sop": ("stanford_online_products", "class_id", 11318, sop.KS),
    "cub": ("caltech_birds2011", "label", cub.TRAIN_CLASSES, cub.KS),
    "cars": ("cars196", "label", cars.TRAIN_CLASSES, cars.KS),
}
TFDS_SPLITS = ("train", "test")
LABEL_FILE = "labels.txt"
LAYOUT = "<output-dir>/labels.txt ('<relative image path> <label>' per line) and <output-dir>/images/, as written by convert_tfds."


def image_extension(data):
    """Return the file extension matching the encoded image `data` by its magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    raise ValueError(f"Unknown image encoding, starting with bytes {data[:8]!r}: expected JPEG or PNG.")


def encoded_image(image):
    """Return `(bytes, extension)`: encoded images pass through unchanged, decoded arrays are written as PNG."""
    if isinstance(image, (bytes, np.bytes_)):
        return bytes(image), image_extension(bytes(image))
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"Expected an encoded image or a uint8 [height, width, channels] array, received {pixels.dtype} {pixels.shape}.")
    return tf.io.encode_png(pixels).numpy(), ".png"


def convert_tfds(name, output_dir, data_dir=None, builder=None):
    """Write the images and labels of a TFDS benchmark to `output_dir`; return the label list's path.

    Images keep their original encoding where TFDS stores it (JPEG for the
    three datasets) and are named `images/<tfds split>_<index>.<ext>`.
    `labels.txt` is written last, so its presence means a finished
    conversion, and a later call returns at once.

    Args:
        name: `"sop"`, `"cub"` or `"cars"`.
        output_dir: folder for `images/` and `labels.txt`.
        data_dir: TFDS data directory. Defaults to TFDS' own default.
        builder: a TFDS builder to read instead of `tfds.builder(...)`.
    """
    import tensorflow_datasets as tfds

    if name not in TFDS_BENCHMARKS:
        raise ValueError(f"Unknown TFDS benchmark {name!r}: expected one of {', '.join(TFDS_BENCHMARKS)}.")
    tfds_name, label_field, _, _ = TFDS_BENCHMARKS[name]
    label_path = os.path.join(output_dir, LABEL_FILE)
    if os.path.isfile(label_path):
        logger.info("Reusing the %s images converted earlier in %s", tfds_name, output_dir)
        return label_path

    if builder is None:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    builder.download_and_prepare()
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    lines = []
    for split in TFDS_SPLITS:
        dataset = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
        for index, example in enumerate(tfds.as_numpy(dataset)):
            data, extension = encoded_image(example["image"])
            relative = f"images/{split}_{index:06d}{extension}"
            with open(os.path.join(output_dir, relative), "wb") as handle:
                handle.write(data)
            lines.append(f"{relative} {int(example[label_field])}\n")
        logger.info("Converted the %s split of %s: %d images so far", split, tfds_name, len(lines))

    partial = label_path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
    os.replace(partial, label_path)
    return label_path


def load_tfds_benchmark(name, output_dir, data_dir=None, builder=None):
    """Convert a TFDS benchmark once (see `convert_tfds`) and return it split by class.

    Returns:
        A `Benchmark` like the on-disk reader's: leave-one-out on the test
        classes, with that reader's K values. Class names are TFDS' 0-based labels.

    Raises:
        ValueError: for an unknown name, a label outside the dataset's
            classes or an empty split.
    """
    label_path = convert_tfds(name, output_dir, data_dir=data_dir, builder=builder)
    _, _, train_classes, ks = TFDS_BENCHMARKS[name]
    num_classes = {"sop": 22634, "cub": cub.NUM_CLASSES, "cars": cars.NUM_CLASSES}[name]
    entries = {"train": ([], []), "test": ([], [])}
    for line_number, (relative, label) in read_list_file(label_path, ("path", "label"), LAYOUT):
        label = parse_int(label, label_path, line_number, "label", minimum=0, maximum=num_classes - 1)
        paths, labels = entries["train" if label < train_classes else "test"]
        paths.append(os.path.join(os.path.abspath(output_dir), relative))
        labels.append(label)
    train = make_split(*entries["train"])
    test = make_split(*entries["test"])
    check_not_empty(train, "train", label_path)
    check_not_empty(test, "test", label_path)
    logger.info(
        "%s from TFDS: %d train images of %d classes, %d test images of %d classes",
        name, len(train), train.num_classes, len(test), test.num_classes,
    )
    return Benchmark(name, train, test, None, ks, f"TFDS labels {train_classes} and above")
