"""In-Shop Clothes Retrieval (Liu et al., "DeepFashion", CVPR 2016).

52,712 photos of 7,982 clothing items. 3,997 items (25,882 images) train;
the other 3,985 items are split into 14,218 query and 12,612 gallery images.
Each query searches the gallery (not the other queries), reported at
K = 1, 10, 20, 30, 40, 50.

Layout (the "In-shop Clothes Retrieval Benchmark" folder of the release):

    Eval/list_eval_partition.txt   line 1: the number of images; line 2: the header
                                   "image_name item_id evaluation_status"; then one
                                   line per image, status train, query or gallery
    img/<gender>/<category>/<item>/<file>.jpg
                                   the images, at the listed image_name (which starts
                                   with "img/"); the release's "Img/img" also works
"""

import logging
import os

from keras_xbm.data.listing import (
    Benchmark,
    check_disjoint_classes,
    check_files_exist,
    check_not_empty,
    make_split,
    read_list_file,
    require_directory,
    require_file,
)

logger = logging.getLogger(__name__)

HEADER = ("image_name", "item_id", "evaluation_status")
STATUSES = ("train", "query", "gallery")
KS = (1, 10, 20, 30, 40, 50)
LAYOUT = (
    "<data-dir>/Eval/list_eval_partition.txt (line 1 the image count, line 2 the header "
    "'image_name item_id evaluation_status', status train, query or gallery) with the images at "
    "<data-dir>/<image_name>, e.g. img/WOMEN/Dresses/id_00000002/02_1_front.jpg."
)


def image_root(root):
    """Return the folder the listed `img/...` names are relative to: `root`, or `root/Img` as extracted from the release."""
    if not os.path.isdir(os.path.join(root, "img")) and os.path.isdir(os.path.join(root, "Img", "img")):
        return os.path.join(root, "Img")
    return root


def read_partition(path):
    """Return `{status: [(image_name, item_id), ...]}` from `list_eval_partition.txt`."""
    require_file(path, LAYOUT)
    with open(path, encoding="utf-8") as handle:
        count_line = handle.readline()
        header_line = handle.readline()
    try:
        expected_count = int(count_line.strip())
    except ValueError:
        raise ValueError(f"{path}, line 1: expected the number of images, found {count_line.strip()!r}.") from None
    if header_line.split() != list(HEADER):
        # The header is line 2 here: report it as such.
        raise ValueError(f"{path}, line 2: expected the header {' '.join(HEADER)!r}, found {header_line.strip()!r}.")

    entries = {status: [] for status in STATUSES}
    count = 0
    for line_number, (image_name, item_id, status) in read_list_file(path, HEADER, LAYOUT, skip_lines=2):
        if status not in STATUSES:
            raise ValueError(
                f"{path}, line {line_number}: evaluation_status {status!r} is invalid: expected train, query or gallery."
            )
        entries[status].append((image_name, item_id))
        count += 1
    if count != expected_count:
        raise ValueError(f"{path}: line 1 announces {expected_count} images but {count} are listed.")
    return entries


def load_inshop(data_dir):
    """Read In-Shop Clothes' train, query and gallery splits from `data_dir`.

    Args:
        data_dir: the benchmark folder holding `Eval/list_eval_partition.txt`
            and `img/` (or `Img/img/`).

    Returns:
        A `Benchmark` with the query-gallery protocol and
        `ks=(1, 10, 20, 30, 40, 50)`. Query and gallery share one labelling of
        the test items, so equal labels mean the same item.

    Raises:
        FileNotFoundError: when the folder, the partition file or a listed image is missing.
        ValueError: for a line that does not parse (naming the file and line),
            an unknown status, a count that does not match line 1, an item in
            both train and test, or an empty split.
    """
    root = os.path.abspath(require_directory(data_dir, LAYOUT))
    partition_file = os.path.join(root, "Eval", "list_eval_partition.txt")
    entries = read_partition(partition_file)
    images = image_root(root)

    def paths(status):
        return [os.path.join(images, name) for name, _ in entries[status]]

    def items(status):
        return [item for _, item in entries[status]]

    check_disjoint_classes(items("train"), items("query") + items("gallery"), f"{partition_file} (train)", "query/gallery")
    train = make_split(paths("train"), items("train"))
    test_items = sorted(set(items("query")) | set(items("gallery")))
    test_index = {item: index for index, item in enumerate(test_items)}
    query = make_split(paths("query"), items("query"), test_index)
    gallery = make_split(paths("gallery"), items("gallery"), test_index)
    for name, split in (("train", train), ("query", query), ("gallery", gallery)):
        check_not_empty(split, name, partition_file)

    without_match = set(items("query")) - set(items("gallery"))
    if without_match:
        logger.warning(
            "In-Shop: %d query item(s) have no gallery image and count as misses, e.g. %s",
            len(without_match), sorted(without_match)[0],
        )
    check_files_exist(train.paths + query.paths + gallery.paths, LAYOUT)
    logger.info(
        "In-Shop: %d train images of %d items; %d queries and %d gallery images of %d items",
        len(train), train.num_classes, len(query), len(gallery), len(test_items),
    )
    return Benchmark("inshop", train, query, gallery, KS, "Eval/list_eval_partition.txt")
