"""Class names. ImageNet names come from torchvision's weight metadata (no download)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _imagenet() -> tuple[str, ...]:
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order."""
    return list(_imagenet())
