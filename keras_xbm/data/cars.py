"""Cars196 (Krause et al., "3D Object Representations for Fine-Grained Categorization", 3dRR 2013), split by class.

16,185 photos of 196 car models. Metric learning trains on models 1-98
(8,054 images) and tests on models 99-196 (8,131 images), leave-one-out,
reported at K = 1, 2, 4, 8. The release's per-image `test` flag (and TFDS'
`cars196` splits) is a classification split and is ignored.

Layout: the Stanford Cars release with all images in one folder and the
annotation file that covers them all:

    cars_annos.mat        MATLAB struct array "annotations" with the fields
                          relative_im_path ("car_ims/000001.jpg"), class (1-196),
                          bbox_x1, bbox_y1, bbox_x2, bbox_y2 and test
    car_ims/<file>.jpg    the images, at relative_im_path

Reading the `.mat` file needs SciPy.
"""

import logging
import os

import numpy as np

from keras_xbm.data.listing import (
    Benchmark,
    check_files_exist,
    check_not_empty,
    make_split,
    require_directory,
    require_file,
)

logger = logging.getLogger(__name__)

NUM_CLASSES = 196
TRAIN_CLASSES = 98
KS = (1, 2, 4, 8)
LAYOUT = (
    "<data-dir>/cars_annos.mat (struct array 'annotations' with fields relative_im_path and class, "
    "class ids 1-196) and the images at <data-dir>/<relative_im_path>, e.g. car_ims/000001.jpg."
)


def read_annotations(path):
    """Return `(relative_paths, class_ids)` from `cars_annos.mat`."""
    from scipy.io import loadmat

    try:
        contents = loadmat(path, squeeze_me=True)
    except (ValueError, TypeError, OSError) as error:
        raise ValueError(f"Cannot read {path!r} as a MATLAB file: {error}. Expected this layout: {LAYOUT}") from error
    annotations = np.atleast_1d(contents.get("annotations", np.array([])))
    names = annotations.dtype.names or ()
    if "relative_im_path" not in names or "class" not in names:
        raise ValueError(
            f"{path}: expected a struct array 'annotations' with fields relative_im_path and class, "
            f"found variables {sorted(key for key in contents if not key.startswith('__'))} and fields {list(names)}."
        )
    relative_paths, class_ids = [], []
    for position, record in enumerate(annotations):
        relative = str(record["relative_im_path"])
        try:
            class_id = int(record["class"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}, annotation {position + 1} ({relative}): class {record['class']!r} is not an integer.") from None
        if not 1 <= class_id <= NUM_CLASSES:
            raise ValueError(
                f"{path}, annotation {position + 1} ({relative}): class {class_id} is out of range: expected 1 to {NUM_CLASSES}."
            )
        relative_paths.append(relative)
        class_ids.append(class_id)
    return relative_paths, class_ids


def load_cars(data_dir):
    """Read Cars196 from `data_dir`, split by class: 1-98 train, 99-196 test.

    Args:
        data_dir: the folder holding `cars_annos.mat` and `car_ims/`.

    Returns:
        A `Benchmark` with leave-one-out evaluation and `ks=(1, 2, 4, 8)`.
        Class names are the official class ids, "1" to "196".

    Raises:
        FileNotFoundError: when the folder, the annotation file or a listed image is missing.
        ValueError: for an unreadable annotation file, a class outside
            1-196 (naming the annotation), or an empty split.
    """
    root = os.path.abspath(require_directory(data_dir, LAYOUT))
    annotation_file = require_file(os.path.join(root, "cars_annos.mat"), LAYOUT)
    relative_paths, class_ids = read_annotations(annotation_file)

    splits = {}
    for name, keep in (("train", lambda c: c <= TRAIN_CLASSES), ("test", lambda c: c > TRAIN_CLASSES)):
        rows = [row for row, class_id in enumerate(class_ids) if keep(class_id)]
        splits[name] = make_split([os.path.join(root, relative_paths[row]) for row in rows], [class_ids[row] for row in rows])
        check_not_empty(splits[name], f"{name} (classes {'1-98' if name == 'train' else '99-196'})", annotation_file)
    check_files_exist(splits["train"].paths + splits["test"].paths, LAYOUT)
    logger.info(
        "Cars196: %d train images of %d classes, %d test images of %d classes",
        len(splits["train"]), splits["train"].num_classes, len(splits["test"]), splits["test"].num_classes,
    )
    return Benchmark("cars", splits["train"], splits["test"], None, KS, "classes 99-196")
