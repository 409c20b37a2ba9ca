"""Dataset readers, image pipelines and class-balanced sampling."""

from keras_xbm.data.benchmarks import FILE_BENCHMARKS, load_benchmark
from keras_xbm.data.cars import load_cars
from keras_xbm.data.cub import load_cub
from keras_xbm.data.folder import load_image_folder
from keras_xbm.data.inshop import load_inshop
from keras_xbm.data.listing import Benchmark, FileSplit
from keras_xbm.data.omniglot import ImageSplit, load_omniglot, load_omniglot_tfds
from keras_xbm.data.sampler import PKSampler, pk_dataset
from keras_xbm.data.sop import load_sop
from keras_xbm.data.tfds_benchmarks import convert_tfds, load_tfds_benchmark
from keras_xbm.data.vehicleid import load_vehicleid

__all__ = [
    "FILE_BENCHMARKS",
    "Benchmark",
    "FileSplit",
    "ImageSplit",
    "PKSampler",
    "convert_tfds",
    "load_benchmark",
    "load_cars",
    "load_cub",
    "load_image_folder",
    "load_inshop",
    "load_omniglot",
    "load_omniglot_tfds",
    "load_sop",
    "load_tfds_benchmark",
    "load_vehicleid",
    "pk_dataset",
]
