"""keras_xbm: deep metric learning with a cross-batch memory, for TensorFlow and Keras 3."""

from keras_xbm import backbones, data, losses, pairs, retrieval
from keras_xbm.export import export_saved_model
from keras_xbm.losses import ContrastiveLoss
from keras_xbm.memory import CrossBatchMemory
from keras_xbm.models import XBMModel

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "CrossBatchMemory",
    "XBMModel",
    "backbones",
    "data",
    "export_saved_model",
    "losses",
    "pairs",
    "retrieval",
]
