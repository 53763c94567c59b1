"""Fine-tuning: ImageFolder data, the notebooks' objective (CE + L2 on weights), safetensors
checkpoints with JSON cards, resume, metrics, curves and a validation grid of explanations.

    result = camlens.train.finetune("shapes/", epochs=2, image_size=128, out="runs/shapes")
    model = camlens.load_model(checkpoint="runs/shapes")      # best checkpoint, class names, preprocessing
"""

from camlens.models.heads import replace_classifier
from camlens.train.checkpoint import load_checkpoint, read_card, read_state_dict, save_checkpoint
from camlens.train.data import DataError, ImageFolderData, scan_image_folder, stratified_split
from camlens.train.loop import FinetuneConfig, FinetuneResult, WarningSkippedImages, evaluate, finetune
from camlens.train.losses import decayed_parameters, l2_penalty, regularized_loss

__all__ = [
    "DataError",
    "FinetuneConfig",
    "FinetuneResult",
    "ImageFolderData",
    "WarningSkippedImages",
    "decayed_parameters",
    "evaluate",
    "finetune",
    "l2_penalty",
    "load_checkpoint",
    "read_card",
    "read_state_dict",
    "regularized_loss",
    "replace_classifier",
    "save_checkpoint",
    "scan_image_folder",
    "stratified_split",
]
