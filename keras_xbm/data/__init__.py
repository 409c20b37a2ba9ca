"""Dataset readers and class-balanced sampling."""

from keras_xbm.data.omniglot import ImageSplit, load_omniglot, load_omniglot_tfds
from keras_xbm.data.sampler import PKSampler, pk_dataset

__all__ = ["ImageSplit", "PKSampler", "load_omniglot", "load_omniglot_tfds", "pk_dataset"]
