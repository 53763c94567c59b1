"""Finding and replacing a classifier's final linear layer."""

from __future__ import annotations

from torch import nn


def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` in module registration order, as ``(dotted_name, module)``."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


def set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_classifier(model: nn.Module, num_classes: int, bias: bool = True) -> nn.Linear:
    """Swap the last linear layer for a freshly initialized one with ``num_classes`` outputs."""
    found = last_linear(model)
    if found is None:
        raise ValueError("the model has no nn.Linear classifier to replace")
    name, old = found
    new = nn.Linear(old.in_features, num_classes, bias=bias).to(old.weight.device, old.weight.dtype)
    set_submodule(model, name, new)
    return new
