"""MONAI's classification networks as zoo names: ``load_model("monai:densenet121_3d", weights=FILE)``.

``monai:ARCH_3d`` (or ``_2d``) builds a MONAI network (``pip install 'camlens[medical]'``) with
``spatial_dims=3`` (``2``) — DenseNet-121/169/201, ResNet-10…200 (``resnet18_3d``…), SE-ResNet-50/101/152
and SE-ResNeXt-50/101 — with random weights (``weights="random"``) or the user's state dict
(``weights=FILE``, ``.pth`` / ``.safetensors``). camlens never downloads (MONAI's ``pretrained=``
is never used).

``in_channels`` and ``num_classes`` are read from the weights file when not given (the first
convolution's input channels, the last linear layer's outputs); for random weights they default
to 1 and 2 (a single-channel scan, two classes). The card states the input (``extra["inputs"]``:
``volumes (N, C, D, H, W)``, ``extra["in_channels"]``) and a default layer: the features entering
the network's global pooling (what :func:`camlens.explain` also finds by itself), so CAM's identity
holds on the GAP + linear head and Grad-CAM equals MONAI's own ``GradCAM`` there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camlens.base.errors import CamlensError, WeightsNotFoundError
from camlens.models.card import ModelCard, attach_card
from camlens.models.preprocess import Preprocess
from camlens.models.weights import load_weights_file, read_state_dict

MONAI_PREFIX = "monai:"
DEFAULT_IN_CHANNELS = 1
DEFAULT_NUM_CLASSES = 2
#: a scan is given as it is (intensities windowed by the reader); the 2-D preprocessing is not used
VOLUME_INPUT = Preprocess(size=(96, 96), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1.0, name="volumes as given")


@dataclass(frozen=True)
class _Arch:
    """One MONAI network: its constructor's name, the keywords of its channel and class counts,
    and its default layer (captured module, ``"input"`` or ``"output"``)."""

    factory: str
    in_kw: str
    out_kw: str
    layer: str
    capture: str = "input"


_DENSENET = ("in_channels", "out_channels", "class_layers.pool")
_RESNET = ("n_input_channels", "num_classes", "avgpool")
_SERESNET = ("in_channels", "num_classes", "adaptive_avg_pool")
ARCHS: dict[str, _Arch] = {
    **{f"densenet{d}": _Arch(f"DenseNet{d}", *_DENSENET) for d in (121, 169, 201)},
    **{f"resnet{d}": _Arch(f"resnet{d}", *_RESNET) for d in (10, 18, 34, 50, 101, 152, 200)},
    **{f"seresnet{d}": _Arch(f"SEResNet{d}", *_SERESNET) for d in (50, 101, 152)},
    **{f"seresnext{d}": _Arch(f"SEResNext{d}", *_SERESNET) for d in (50, 101)},
}


def monai_models() -> list[str]:
    """The ``monai:`` zoo names (3-D first; every architecture also as ``_2d``)."""
    return [f"{MONAI_PREFIX}{a}_{d}d" for d in (3, 2) for a in ARCHS]


def _parse(name: str) -> tuple[str, _Arch, int]:
    """``"densenet121_3d"`` -> ``("densenet121", its _Arch, 3)``; unknown names fail with the list."""
    key = name.lower().replace("-", "_")
    arch, _, dims = key.rpartition("_")
    if dims in ("3d", "2d") and arch in ARCHS:
        return arch, ARCHS[arch], int(dims[0])
    import difflib

    close = difflib.get_close_matches(MONAI_PREFIX + key, monai_models(), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise CamlensError(
        f"unknown MONAI model {MONAI_PREFIX}{name!r}.{hint} Names are {MONAI_PREFIX}ARCH_3d (or _2d) with ARCH one of "
        f"{', '.join(ARCHS)}"
    )


def _monai_nets() -> Any:
    try:
        import monai.networks.nets as nets  # optional extra (pip install camlens[medical]): monai: names only
    except ImportError as exc:
        raise CamlensError(f"{MONAI_PREFIX} models need MONAI: pip install 'camlens[medical]'") from exc
    return nets


def sizes_from_state(state: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """``(in_channels, num_classes)`` of a classifier's state dict: the input channels of its first
    convolution kernel (3-D or more) and the outputs of its last 2-D ``weight`` (the linear head)."""
    weights = [(k, v) for k, v in state.items() if k.endswith("weight") and isinstance(v, torch.Tensor)]
    first = next((v for _, v in weights if v.dim() >= 4), None)
    last = next((v for _, v in reversed(weights) if v.dim() == 2), None)
    return (int(first.shape[1]) if first is not None else None, int(last.shape[0]) if last is not None else None)


@dataclass
class MonaiRequest:
    """What :func:`load_monai` builds: the name after ``monai:``, the weights (a file or
    ``"random"``), and the channel and class counts (``None``: from the file, else the defaults)."""

    name: str
    weights: str | os.PathLike | None
    in_channels: int | None = None
    num_classes: int | None = None


def _sizes(req: MonaiRequest) -> tuple[int, int]:
    """The channel and class counts to build with (given, else from the weights file, else the defaults)."""
    if req.weights is None:
        raise WeightsNotFoundError(
            f"{MONAI_PREFIX}{req.name}: camlens never downloads weights; pass weights=PATH to a state dict you "
            "trained (.pth or .safetensors), or weights='random' for an untrained network"
        )
    if req.weights == "random":
        return req.in_channels or DEFAULT_IN_CHANNELS, req.num_classes or DEFAULT_NUM_CLASSES
    path = Path(req.weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"{MONAI_PREFIX}{req.name}: weights file {str(path)!r} does not exist")
    c, k = sizes_from_state(read_state_dict(path))
    return req.in_channels or c or DEFAULT_IN_CHANNELS, req.num_classes or k or DEFAULT_NUM_CLASSES


def load_monai(req: MonaiRequest) -> nn.Module:
    """A MONAI network with its weights and card (see the module docstring); not yet in eval mode."""
    arch_name, arch, dims = _parse(req.name)
    nets = _monai_nets()
    in_channels, num_classes = _sizes(req)
    factory: Callable[..., nn.Module] = getattr(nets, arch.factory)
    kwargs = {"spatial_dims": dims, arch.in_kw: in_channels, arch.out_kw: num_classes}
    with torch.random.fork_rng(devices=[]):  # the initialization must not consume the caller's RNG
        if req.weights == "random":
            torch.manual_seed(0)  # the same random network every time (a CLI rerun, every rank)
        model = factory(**kwargs)
    if req.weights is not None and req.weights != "random":
        load_weights_file(model, req.weights)
    axes = "volumes (N, C, D, H, W)" if dims == 3 else "images (N, C, H, W)"
    card = ModelCard(
        f"{MONAI_PREFIX}{arch_name}_{dims}d",
        VOLUME_INPUT,
        None,
        layer=arch.layer,
        capture=arch.capture,
        extra={"inputs": axes, "in_channels": in_channels, "num_classes": num_classes, "spatial_dims": dims},
    )
    return attach_card(model, card)


__all__ = ["ARCHS", "MONAI_PREFIX", "MonaiRequest", "load_monai", "monai_models", "sizes_from_state"]
