"""Your own images: a folder with one sub-folder per class, split by class.

Two layouts are read:

    <data-dir>/train/<class>/<image>, <data-dir>/test/<class>/<image>
        the split is given: train on the classes under train/, test
        (leave-one-out) on the classes under test/;
    <data-dir>/<class>/<image>
        the classes, sorted by folder name, are split in two: the first
        `floor(count * train_fraction)` classes train, the rest test.

Image files are those ending in .jpg, .jpeg, .png, .bmp or .gif (any case);
other files and hidden entries are skipped.
"""

import logging
import os

from keras_xbm.data.listing import Benchmark, check_disjoint_classes, check_not_empty, make_split, require_directory

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
KS = (1, 2, 4, 8)
LAYOUT = (
    "<data-dir>/<class>/<image> (one sub-folder per class), or <data-dir>/train/<class>/<image> "
    "and <data-dir>/test/<class>/<image>; images end in .jpg, .jpeg, .png, .bmp or .gif."
)


def list_class_folders(directory):
    """Return `{class name: [image paths]}` for the non-empty class sub-folders of `directory`."""
    classes = {}
    for name in sorted(os.listdir(directory)):
        folder = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        images = []
        for current, subfolders, files in os.walk(folder):
            subfolders[:] = sorted(sub for sub in subfolders if not sub.startswith("."))
            images.extend(
                os.path.join(current, file)
                for file in sorted(files)
                if not file.startswith(".") and file.lower().endswith(IMAGE_EXTENSIONS)
            )
        if images:
            classes[name] = images
        else:
            logger.warning("Class folder %s contains no image file and is skipped", folder)
    return classes


def split_from_classes(classes):
    paths = [path for name in classes for path in classes[name]]
    keys = [name for name in classes for _ in classes[name]]
    return make_split(paths, keys)


def load_image_folder(data_dir, train_fraction=0.5):
    """Read a folder of class sub-folders as a retrieval benchmark split by class.

    Args:
        data_dir: the folder (see the module docstring for both layouts).
        train_fraction: share of the sorted classes that train when the
            folder has no `train/` and `test/` sub-folders. Defaults to 0.5.

    Returns:
        A `Benchmark` with leave-one-out evaluation on the test classes and
        `ks=(1, 2, 4, 8)`. Class names are the folder names.

    Raises:
        FileNotFoundError: when `data_dir` is missing.
        ValueError: for fewer than two classes, a `train_fraction` that
            leaves a split without classes, a class folder name in both
            train/ and test/, or an empty split.
    """
    root = os.path.abspath(require_directory(data_dir, LAYOUT))
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        train_classes = list_class_folders(os.path.join(root, "train"))
        test_classes = list_class_folders(os.path.join(root, "test"))
        check_disjoint_classes(train_classes, test_classes, os.path.join(root, "train"), os.path.join(root, "test"))
        description = "test/"
    else:
        classes = list_class_folders(root)
        if len(classes) < 2:
            raise ValueError(
                f"{root!r} contains {len(classes)} class folder(s) with images: expected at least two. Layout: {LAYOUT}"
            )
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"Invalid train_fraction={train_fraction!r}: expected a number between 0 and 1.")
        names = sorted(classes)
        cut = int(len(names) * train_fraction)
        if not 0 < cut < len(names):
            raise ValueError(
                f"train_fraction={train_fraction} splits the {len(names)} classes of {root!r} into {cut} train "
                f"and {len(names) - cut} test classes: expected at least one of each."
            )
        train_classes = {name: classes[name] for name in names[:cut]}
        test_classes = {name: classes[name] for name in names[cut:]}
        description = f"classes {names[cut]} to {names[-1]}"

    train = split_from_classes(train_classes)
    test = split_from_classes(test_classes)
    check_not_empty(train, "train", root)
    check_not_empty(test, "test", root)
    logger.info(
        "Image folder: %d train images of %d classes, %d test images of %d classes",
        len(train), train.num_classes, len(test), test.num_classes,
    )
    return Benchmark("folder", train, test, None, KS, description)
