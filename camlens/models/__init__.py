"""Model zoo, preprocessing presets, class names and head utilities."""

from camlens.models.cam_ready import cam_ready, vgg16_cam
from camlens.models.classes import imagenet_classes
from camlens.models.preprocess import CAFFE_BGR, EFFICIENTNET_LITE, IMAGENET, PRESETS, Preprocess
from camlens.models.zoo import DEFAULT_MODEL, ModelCard, available_models, card_of, load_model, load_weights_file

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
