"""PKU VehicleID (Liu et al., "Deep Relative Distance Learning", CVPR 2016).

221,763 photos of 26,267 vehicles. 13,134 vehicles (110,178 images) train;
three test lists of 800, 1,600 and 2,400 vehicles (the small, medium and
large test sets) hold other vehicles. Metric-learning papers, XBM among them,
report Recall@1 and Recall@5 with leave-one-out search within one test list.

NOTE: the release's own re-identification protocol instead draws one gallery
image per vehicle at random and queries it with the rest. This reader hands
evaluation the leave-one-out protocol of the metric-learning papers.

Layout (the `VehicleID_V1.0` folder of the release):

    train_test_split/train_list.txt       "<image stem> <vehicle id>" per line
    train_test_split/test_list_800.txt    the same for each test set
    train_test_split/test_list_1600.txt
    train_test_split/test_list_2400.txt
    image/<image stem>.jpg                the images
"""

import logging
import os

from keras_xbm.data.listing import (
    Benchmark,
    parse_int,
    read_list_file,
    require_directory,
    train_test_splits,
)

logger = logging.getLogger(__name__)

TEST_LISTS = (800, 1600, 2400)
FIELDS = ("image_stem", "vehicle_id")
KS = (1, 5)
LAYOUT = (
    "<data-dir>/train_test_split/train_list.txt and test_list_800.txt, test_list_1600.txt, "
    "test_list_2400.txt ('<image stem> <vehicle id>' per line) with the images at <data-dir>/image/<stem>.jpg."
)


def read_vehicle_list(path, image_dir):
    """Return `(paths, vehicle_ids)` of one VehicleID list file."""
    paths, vehicle_ids = [], []
    for line_number, (stem, vehicle_id) in read_list_file(path, FIELDS, LAYOUT):
        vehicle_ids.append(parse_int(vehicle_id, path, line_number, "vehicle_id", minimum=0))
        paths.append(os.path.join(image_dir, stem + ".jpg"))
    return paths, vehicle_ids


def load_vehicleid(data_dir, test_list=800):
    """Read VehicleID's train split and one of its test lists from `data_dir`.

    Args:
        data_dir: the release folder holding `train_test_split/` and `image/`.
        test_list: 800, 1600 or 2400, the number of vehicles of the test set
            (small, medium, large). Defaults to 800.

    Returns:
        A `Benchmark` with leave-one-out evaluation on the test list and
        `ks=(1, 5)`. Class names are the official vehicle ids.

    Raises:
        FileNotFoundError: when the folder, a list file or a listed image is missing.
        ValueError: for an unknown `test_list`, a line that does not parse
            (naming the file and line), a negative vehicle id, a vehicle in
            both lists, or an empty split.
    """
    if test_list not in TEST_LISTS:
        raise ValueError(f"Invalid test_list={test_list!r}: expected one of 800, 1600, 2400.")
    root = os.path.abspath(require_directory(data_dir, LAYOUT))
    split_dir = require_directory(os.path.join(root, "train_test_split"), LAYOUT)
    image_dir = require_directory(os.path.join(root, "image"), LAYOUT)
    train_file = os.path.join(split_dir, "train_list.txt")
    test_file = os.path.join(split_dir, f"test_list_{test_list}.txt")
    train_paths, train_ids = read_vehicle_list(train_file, image_dir)
    test_paths, test_ids = read_vehicle_list(test_file, image_dir)
    train, test = train_test_splits((train_file, train_paths, train_ids), (test_file, test_paths, test_ids), LAYOUT)
    logger.info(
        "VehicleID: %d train images of %d vehicles, test list %d: %d images of %d vehicles",
        len(train), train.num_classes, test_list, len(test), test.num_classes,
    )
    return Benchmark("vehicleid", train, test, None, KS, f"test_list_{test_list}.txt")
