"""CUB-200-2011 (Wah et al., Caltech technical report CNS-TR-2011-001), split by class for retrieval.

11,788 photos of 200 bird species. Metric learning trains on species 1-100
(5,864 images) and tests on species 101-200 (5,924 images), leave-one-out,
reported at K = 1, 2, 4, 8. The release's per-image `train_test_split.txt`
(used by TFDS' `caltech_birds2011` splits) is a classification split and is
not read.

Layout (the `CUB_200_2011` folder of the release):

    images.txt               "<image id> <relative path>" per line
    image_class_labels.txt   "<image id> <class id>" per line, class ids 1-200
    images/<relative path>   the images, e.g. images/001.Black_footed_Albatross/<file>.jpg
"""

import logging
import os

from keras_xbm.data.listing import (
    Benchmark,
    check_files_exist,
    check_not_empty,
    make_split,
    parse_int,
    read_list_file,
    require_directory,
)

logger = logging.getLogger(__name__)

NUM_CLASSES = 200
TRAIN_CLASSES = 100
KS = (1, 2, 4, 8)
LAYOUT = (
    "<data-dir>/images.txt ('<image id> <relative path>'), <data-dir>/image_class_labels.txt "
    "('<image id> <class id>', class ids 1-200) and the images at <data-dir>/images/<relative path>; "
    "<data-dir> may also be the folder that holds CUB_200_2011/."
)


def find_root(data_dir):
    """Return `data_dir`, or its `CUB_200_2011` sub-folder when the list files are there."""
    require_directory(data_dir, LAYOUT)
    nested = os.path.join(data_dir, "CUB_200_2011")
    if not os.path.isfile(os.path.join(data_dir, "images.txt")) and os.path.isfile(os.path.join(nested, "images.txt")):
        return os.path.abspath(nested)
    return os.path.abspath(data_dir)


def load_cub(data_dir):
    """Read CUB-200-2011 from `data_dir`, split by class: 1-100 train, 101-200 test.

    Args:
        data_dir: the `CUB_200_2011` folder, or the folder holding it.

    Returns:
        A `Benchmark` with leave-one-out evaluation and `ks=(1, 2, 4, 8)`.
        Class names are the official class ids, "1" to "200".

    Raises:
        FileNotFoundError: when the folder, a list file or a listed image is missing.
        ValueError: for a line that does not parse (naming the file and
            line), a class id outside 1-200, an image id listed twice or
            without a class, or an empty split.
    """
    root = find_root(data_dir)
    images_file = os.path.join(root, "images.txt")
    labels_file = os.path.join(root, "image_class_labels.txt")

    relative_paths = {}
    for line_number, (image_id, relative) in read_list_file(images_file, ("image_id", "path"), LAYOUT):
        image_id = parse_int(image_id, images_file, line_number, "image_id", minimum=1)
        if image_id in relative_paths:
            raise ValueError(f"{images_file}, line {line_number}: image_id {image_id} is listed twice.")
        relative_paths[image_id] = relative
    class_ids = {}
    for line_number, (image_id, class_id) in read_list_file(labels_file, ("image_id", "class_id"), LAYOUT):
        image_id = parse_int(image_id, labels_file, line_number, "image_id", minimum=1)
        if image_id not in relative_paths:
            raise ValueError(f"{labels_file}, line {line_number}: image_id {image_id} is not in {images_file}.")
        class_ids[image_id] = parse_int(class_id, labels_file, line_number, "class_id", minimum=1, maximum=NUM_CLASSES)
    unlabelled = sorted(set(relative_paths) - set(class_ids))
    if unlabelled:
        raise ValueError(
            f"{len(unlabelled)} image id(s) of {images_file} have no class in {labels_file}, e.g. {unlabelled[0]}."
        )

    image_dir = os.path.join(root, "images")
    ordered = sorted(relative_paths)
    splits = {}
    for name, keep in (("train", lambda c: c <= TRAIN_CLASSES), ("test", lambda c: c > TRAIN_CLASSES)):
        ids = [image_id for image_id in ordered if keep(class_ids[image_id])]
        splits[name] = make_split([os.path.join(image_dir, relative_paths[i]) for i in ids], [class_ids[i] for i in ids])
        check_not_empty(splits[name], f"{name} (classes {'1-100' if name == 'train' else '101-200'})", labels_file)
    check_files_exist(splits["train"].paths + splits["test"].paths, LAYOUT)
    logger.info(
        "CUB-200-2011: %d train images of %d classes, %d test images of %d classes",
        len(splits["train"]), splits["train"].num_classes, len(splits["test"]), splits["test"].num_classes,
    )
    return Benchmark("cub", splits["train"], splits["test"], None, KS, "classes 101-200")
