"""The traits of a model that decide which methods apply to it, found without running it."""

from __future__ import annotations

from typing import Any

from torch import nn

from camlens.attribution.registry import MethodInfo, ModelTraits, Task, applicable
from camlens.core.attention import attention_modules, windowed_attention_modules
from camlens.models.card import card_of
from camlens.targets import Detection, Segmentation, is_target_object


def model_traits(model: nn.Module, targets: Any = None) -> ModelTraits:
    """The model's :class:`~camlens.attribution.registry.ModelTraits`: its task from its zoo card, or
    from the target object when one is given (a :class:`~camlens.targets.Detection` explains a
    detector whatever the card says; a similarity or custom target is ``"other"``), and whether it
    has global self-attention modules camlens captures. Costs one walk over the modules."""
    card = card_of(model)
    task: Task = "classification"
    if card is not None and card.extra.get("task") in ("detection", "segmentation"):
        task = card.extra["task"]
    if isinstance(targets, Detection):
        task = "detection"
    elif isinstance(targets, Segmentation):
        task = "segmentation"
    elif is_target_object(targets):
        task = "other"
    name = card.name if card is not None else type(model).__name__
    return ModelTraits(
        task=task,
        attention=bool(attention_modules(model)),
        name=name,
        windowed=bool(windowed_attention_modules(model)),
    )


def methods_for(model: nn.Module, targets: Any = None) -> dict[str, MethodInfo]:
    """The registered methods that apply to ``model`` (with ``targets``), by name."""
    return applicable(model_traits(model, targets))


__all__ = ["methods_for", "model_traits"]
