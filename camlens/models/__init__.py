"""Model zoo, preprocessing presets, class names and head utilities."""

from .cam_ready import cam_ready, vgg16_cam
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
    "cam_ready",
    "card_of",
    "imagenet_classes",
    "load_model",
    "load_weights_file",
    "vgg16_cam",
]
