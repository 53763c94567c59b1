"""Model zoo, preprocessing presets, class names and head utilities."""

from .classes import imagenet_classes
from .preprocess import CAFFE_BGR, EFFICIENTNET_LITE, IMAGENET, PRESETS, Preprocess
from .zoo import DEFAULT_MODEL, ModelCard, available_models, card_of, load_model, load_weights_file

__all__ = [
    "CAFFE_BGR",
    "DEFAULT_MODEL",
    "EFFICIENTNET_LITE",
    "IMAGENET",
    "PRESETS",
    "ModelCard",
    "Preprocess",
    "available_models",
    "card_of",
    "imagenet_classes",
    "load_model",
    "load_weights_file",
]
