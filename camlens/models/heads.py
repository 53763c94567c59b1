"""Finding and replacing a classifier's final linear layer."""

from __future__ import annotations

from torch import nn

from camlens.base.errors import HeadError


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


def replace_classifier(model: nn.Module, num_classes: int, bias: bool | None = None) -> str:
    """Swap the last ``nn.Linear`` (in registration order) for a freshly initialized one with
    ``num_classes`` outputs, on the old layer's device and dtype; ``bias=None`` keeps a bias if the old
    layer had one. Returns the replaced module's dotted name. The new layer draws its initialization
    from the global RNG (callers that need determinism fork and seed it)."""
    found = last_linear(model)
    if found is None:
        raise HeadError(
            f"{type(model).__name__} has no nn.Linear classifier to replace; pass a model whose last "
            "layer is linear, or use cam_ready=True"
        )
    name, old = found
    keep = old.bias is not None if bias is None else bias
    new = nn.Linear(old.in_features, num_classes, bias=keep).to(old.weight.device, old.weight.dtype)
    set_submodule(model, name, new)
    return name
