"""One entry point to every image-file benchmark, by the name the command line uses."""

import os

from keras_xbm.data.cars import load_cars
from keras_xbm.data.cub import load_cub
from keras_xbm.data.folder import load_image_folder
from keras_xbm.data.inshop import load_inshop
from keras_xbm.data.sop import load_sop
from keras_xbm.data.tfds_benchmarks import TFDS_BENCHMARKS, load_tfds_benchmark
from keras_xbm.data.vehicleid import load_vehicleid

FILE_BENCHMARKS = ("sop", "inshop", "vehicleid", "cub", "cars", "folder")


def load_benchmark(name, data_dir, test_list=800, from_tfds=False, tfds_data_dir=None):
    """Read the benchmark `name` from `data_dir` and return a `Benchmark`.

    Args:
        name: one of `"sop"`, `"inshop"`, `"vehicleid"`, `"cub"`, `"cars"`,
            `"folder"`.
        data_dir: the dataset's folder in its official layout; with
            `from_tfds`, the folder the TFDS images are converted into.
        test_list: VehicleID's test set, 800, 1600 or 2400. Defaults to 800.
        from_tfds: read `"sop"`, `"cub"` or `"cars"` through TensorFlow
            Datasets (downloads once) instead of the official files.
            Defaults to False.
        tfds_data_dir: TFDS' data directory. Defaults to TFDS' own default.
    """
    if name not in FILE_BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}: expected one of {', '.join(FILE_BENCHMARKS)}.")
    if from_tfds:
        if name not in TFDS_BENCHMARKS:
            raise ValueError(f"{name!r} cannot be read from TFDS: expected one of {', '.join(TFDS_BENCHMARKS)}.")
        return load_tfds_benchmark(name, os.path.join(data_dir, TFDS_BENCHMARKS[name][0]), data_dir=tfds_data_dir)
    if name == "vehicleid":
        return load_vehicleid(data_dir, test_list=test_list)
    readers = {"sop": load_sop, "inshop": load_inshop, "cub": load_cub, "cars": load_cars, "folder": load_image_folder}
    return readers[name](data_dir)
