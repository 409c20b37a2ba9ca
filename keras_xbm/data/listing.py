"""Image-file benchmarks: the splits every reader returns and the checks the readers share.

A reader turns a dataset's official list files into a `Benchmark`: the train
split, the evaluation split(s), the protocol evaluation uses (leave-one-out
within the test split, or query against gallery) and the benchmark's usual
K values of Recall@K. Images stay on disk; `keras_xbm.data.images` decodes
them while training.
"""

import dataclasses
import os

import numpy as np

LEAVE_ONE_OUT = "leave-one-out"
QUERY_GALLERY = "query-gallery"


@dataclasses.dataclass
class FileSplit:
    """Image files of one split with their integer labels.

    Attributes:
        paths: absolute path of each image file.
        labels: int32 `[count]`, class index in `class_names`.
        sample_ids: int32 `[count]`, the row index of each image in the split
            (unique within the split, as the cross-batch memory needs).
        class_names: the dataset's own identifier of each class (class id,
            item id or folder name), as a string.
    """

    paths: list
    labels: np.ndarray
    sample_ids: np.ndarray
    class_names: list

    def __len__(self):
        return len(self.paths)

    @property
    def num_classes(self):
        return len(self.class_names)

    def subset(self, rows):
        """Return the split restricted to `rows`, relabelled `0 .. classes - 1` and with fresh sample ids."""
        rows = np.asarray(rows, np.int64)
        keys = [self.class_names[label] for label in self.labels[rows]]
        return make_split([self.paths[row] for row in rows], keys)


@dataclasses.dataclass
class Benchmark:
    """A retrieval benchmark read from disk.

    Attributes:
        name: dataset name, as the command line spells it (`"sop"`, ...).
        train: the training split.
        query: the evaluation queries; under leave-one-out also the
            references they search.
        gallery: the references of the query-gallery protocol, or `None`
            for leave-one-out.
        ks: the K values of Recall@K the benchmark is usually reported with.
        description: which files or options defined the evaluation split.
    """

    name: str
    train: FileSplit
    query: FileSplit
    gallery: object = None
    ks: tuple = (1, 2, 4, 8)
    description: str = ""

    @property
    def protocol(self):
        return LEAVE_ONE_OUT if self.gallery is None else QUERY_GALLERY

    def evaluation_paths(self):
        """Return every image path evaluation reads (queries, then gallery)."""
        return list(self.query.paths) + ([] if self.gallery is None else list(self.gallery.paths))


def make_split(paths, class_keys, class_index=None):
    """Build a `FileSplit`, labelling classes by sorted key unless `class_index` maps them already."""
    if class_index is None:
        class_index = {key: index for index, key in enumerate(sorted(set(class_keys)))}
    names = [None] * len(class_index)
    for key, index in class_index.items():
        names[index] = str(key)
    labels = np.array([class_index[key] for key in class_keys], np.int32)
    return FileSplit(list(paths), labels, np.arange(len(paths), dtype=np.int32), names)


def require_directory(path, layout):
    """Return `path` when it is a directory; raise `FileNotFoundError` naming it and `layout` otherwise."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Directory not found: {path!r}. Expected this layout: {layout}")
    return path


def require_file(path, layout):
    """Return `path` when it is a file; raise `FileNotFoundError` naming it and `layout` otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"File not found: {path!r}. Expected this layout: {layout}")
    return path


def read_list_file(path, field_names, layout, skip_lines=0):
    """Yield `(line_number, fields)` for each non-blank line of a whitespace-separated list file.

    Args:
        path: the list file.
        field_names: the expected columns; a line with another number of
            fields raises.
        layout: the dataset layout, quoted when the file is missing.
        skip_lines: leading lines (count and header lines) not yielded.

    Raises:
        FileNotFoundError: when `path` is missing.
        ValueError: naming the file and 1-based line number of a line that
            does not have `len(field_names)` fields.
    """
    require_file(path, layout)
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line_number <= skip_lines or not line.strip():
                continue
            fields = line.split()
            if len(fields) != len(field_names):
                raise ValueError(
                    f"{path}, line {line_number}: expected {len(field_names)} fields "
                    f"({' '.join(field_names)}), found {len(fields)} in {line.rstrip()!r}."
                )
            yield line_number, fields


def parse_int(text, path, line_number, field_name, minimum=None, maximum=None):
    """Parse one integer field of a list file; raise `ValueError` naming file, line and range."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{path}, line {line_number}: {field_name} {text!r} is not an integer.") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(
            f"{path}, line {line_number}: {field_name} {value} is out of range: expected {low} to {high}."
        )
    return value


def check_header(path, line, expected):
    """Raise `ValueError` when the header `line` (line 1 of `path`) differs from the `expected` words."""
    if line.split() != list(expected):
        raise ValueError(
            f"{path}, line 1: expected the header {' '.join(expected)!r}, found {line.strip()!r}."
        )


def check_not_empty(split, split_name, source):
    """Raise `ValueError` when `split` contains no image."""
    if len(split) == 0:
        raise ValueError(f"The {split_name} split read from {source} contains no images.")


def check_disjoint_classes(train_keys, test_keys, train_source, test_source):
    """Raise `ValueError` when a class is in both the train and the test split (the benchmarks split by class)."""
    shared = sorted(set(train_keys) & set(test_keys), key=str)
    if shared:
        shown = ", ".join(str(key) for key in shared[:5]) + (" ..." if len(shared) > 5 else "")
        raise ValueError(
            f"{len(shared)} class(es) appear in both {train_source} and {test_source} ({shown}): "
            "the benchmark expects disjoint train and test classes."
        )


def train_test_splits(train_listing, test_listing, layout):
    """Build the checked train and test splits of a benchmark listed in two files.

    Args:
        train_listing: `(list_file, paths, class_keys)` of the train split.
        test_listing: the same for the test split.
        layout: the expected layout, named in the errors.

    Raises:
        ValueError: when a class is in both splits or a split is empty.
        FileNotFoundError: when a listed image file is missing.
    """
    (train_file, train_paths, train_keys), (test_file, test_paths, test_keys) = train_listing, test_listing
    check_disjoint_classes(train_keys, test_keys, train_file, test_file)
    train = make_split(train_paths, train_keys)
    test = make_split(test_paths, test_keys)
    check_not_empty(train, "train", train_file)
    check_not_empty(test, "test", test_file)
    check_files_exist(train.paths + test.paths, layout)
    return train, test


def check_files_exist(paths, layout):
    """Raise `FileNotFoundError` naming the first missing image files, with the expected `layout`."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(repr(path) for path in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} listed image file(s) not found: {shown}. Expected this layout: {layout}"
        )
