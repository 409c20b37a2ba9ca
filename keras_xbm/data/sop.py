"""Stanford Online Products (Oh Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding", CVPR 2016).

120,053 product photos from eBay in 22,634 classes (products) of 12 super
classes. The official split is by class: 11,318 classes (59,551 images) to
train, the other 11,316 classes (60,502 images) to test. Evaluation is
leave-one-out within the test split, reported at K = 1, 10, 100, 1000.

Layout (the `Stanford_Online_Products` folder of the release):

    Ebay_train.txt, Ebay_test.txt   header "image_id class_id super_class_id path",
                                    then one line per image; class ids start at 1
                                    and the test classes continue after the train ones
    <super class>_final/<file>.JPG  the images, at the listed relative path
"""

import logging
import os

from keras_xbm.data.listing import (
    Benchmark,
    check_header,
    parse_int,
    read_list_file,
    require_directory,
    require_file,
    train_test_splits,
)

logger = logging.getLogger(__name__)

HEADER = ("image_id", "class_id", "super_class_id", "path")
NUM_SUPER_CLASSES = 12
KS = (1, 10, 100, 1000)
LAYOUT = (
    "<data-dir>/Ebay_train.txt and <data-dir>/Ebay_test.txt (header 'image_id class_id super_class_id path', "
    "1-based class ids) with the images at <data-dir>/<path>, e.g. bicycle_final/111085122871_0.JPG."
)


def read_sop_list(path, root):
    """Return `(paths, class_ids)` of one SOP list file; image paths are joined to `root`."""
    require_file(path, LAYOUT)
    with open(path, encoding="utf-8") as handle:
        first_line = handle.readline()
    check_header(path, first_line, HEADER)
    paths, class_ids = [], []
    for line_number, (image_id, class_id, super_class_id, relative) in read_list_file(path, HEADER, LAYOUT, skip_lines=1):
        parse_int(image_id, path, line_number, "image_id", minimum=1)
        class_ids.append(parse_int(class_id, path, line_number, "class_id", minimum=1))
        parse_int(super_class_id, path, line_number, "super_class_id", minimum=1, maximum=NUM_SUPER_CLASSES)
        paths.append(os.path.join(root, relative))
    return paths, class_ids


def load_sop(data_dir):
    """Read Stanford Online Products' train and test splits from `data_dir`.

    Args:
        data_dir: the release folder holding `Ebay_train.txt`, `Ebay_test.txt`
            and the `<super class>_final/` image folders.

    Returns:
        A `Benchmark` with leave-one-out evaluation on the test split and
        `ks=(1, 10, 100, 1000)`. Class names are the official class ids.

    Raises:
        FileNotFoundError: when the folder, a list file or a listed image is missing.
        ValueError: for a line that does not parse (naming the file and line),
            a class id below 1, a super class id outside 1-12, a class in
            both splits, or an empty split.
    """
    root = os.path.abspath(require_directory(data_dir, LAYOUT))
    train_file = os.path.join(root, "Ebay_train.txt")
    test_file = os.path.join(root, "Ebay_test.txt")
    train_paths, train_ids = read_sop_list(train_file, root)
    test_paths, test_ids = read_sop_list(test_file, root)
    train, test = train_test_splits((train_file, train_paths, train_ids), (test_file, test_paths, test_ids), LAYOUT)
    logger.info(
        "SOP: %d train images of %d classes, %d test images of %d classes",
        len(train), train.num_classes, len(test), test.num_classes,
    )
    return Benchmark("sop", train, test, None, KS, "Ebay_test.txt")
