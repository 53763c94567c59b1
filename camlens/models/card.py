"""The card camlens attaches to a model it loaded (``model.camlens``): name, preprocessing, class
names, default layer and capture, and free-form extras."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from camlens.models.preprocess import IMAGENET, Preprocess


@dataclass
class ModelCard:
    """What camlens knows about a loaded model. Attached to it as ``model.camlens``."""

    name: str
    preprocess: Preprocess = IMAGENET
    class_names: list[str] | None = None
    layer: str | None = None  # default target layer (None: automatic)
    capture: str = "output"
    extra: dict[str, Any] = field(default_factory=dict)


def card_of(model: nn.Module) -> ModelCard | None:
    """The :class:`ModelCard` of a camlens-loaded model, else ``None``."""
    card = getattr(model, "camlens", None)
    return card if isinstance(card, ModelCard) else None


def card_task(model: nn.Module) -> str | None:
    """The task a model's card states (``"detection"``, ``"segmentation"``, ``"classification"``…),
    else ``None``."""
    card = card_of(model)
    return card.extra.get("task") if card is not None else None


def attach_card(model: nn.Module, card: ModelCard) -> nn.Module:
    object.__setattr__(model, "camlens", card)
    return model


__all__ = ["ModelCard", "attach_card", "card_of"]
