"""Adapters that run the peer libraries on exactly the work camlens does.

Peers are benchmark-only dependencies (``pip install -r requirements-bench.txt``, or the
``bench`` extra); a missing peer is reported and skipped, never an error.

Each adapter takes its *own copy* of the model (several peers change the model they are given:
pytorch-grad-cam calls ``model.eval()``, back-propagates into the parameters' ``.grad`` and, for
guided backprop, swaps ``nn.ReLU`` modules), the layer, the input batch and the explained
classes, and returns a zero-argument callable that produces ``(N, H, W)`` maps at input
resolution (peers that stop at the layer's resolution get the same bilinear upsampling camlens
does, so every contender delivers the same thing), plus a ``close`` callable that removes the
peer's hooks.

pytorch-grad-cam's Score-CAM prints a tqdm bar per image; its stderr is silenced while timed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: distribution name -> short label used in the tables
PEERS = {"grad-cam": "pytorch-grad-cam", "captum": "Captum", "torchcam": "TorchCAM"}


def peer_versions() -> dict[str, str | None]:
    """Installed version of each peer (``None`` when it is not installed)."""
    out: dict[str, str | None] = {}
    for dist in PEERS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


@dataclass
class PeerCall:
    """A ready-to-time peer call: ``run()`` returns maps; ``close()`` removes the peer's hooks."""

    run: Callable[[], torch.Tensor]
    close: Callable[[], None] = field(default=lambda: None)
    note: str = ""
    label: str | None = None  # the row's name when not the peer's own (a variant of its call)


def _up(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, 1, h, w)`` or ``(N, h, w)`` -> ``(N, H, W)`` bilinear (what camlens does)."""
    if maps.dim() == 3:
        maps = maps[:, None]
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)[:, 0]


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stderr(io.StringIO()):
        yield


# ---------------------------------------------------------------- pytorch-grad-cam
def pgc_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]) -> PeerCall:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[layer])
    targets = [ClassifierOutputTarget(c) for c in classes]
    return PeerCall(lambda: torch.from_numpy(cam(input_tensor=x, targets=targets)), cam.activations_and_grads.release)


def pgc_scorecam(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]) -> PeerCall:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = ScoreCAM(model=model, target_layers=[layer])
    targets = [ClassifierOutputTarget(c) for c in classes]

    def run() -> torch.Tensor:
        with _quiet():
            return torch.from_numpy(cam(input_tensor=x, targets=targets))

    return PeerCall(run, cam.activations_and_grads.release, "default settings (batch 16)")


def pgc_guided(model: nn.Module, layer: nn.Module | None, x: torch.Tensor, classes: list[int]) -> PeerCall:
    """``GuidedBackpropReLUModel`` takes one image per call: the batch is a Python loop."""
    from pytorch_grad_cam import GuidedBackpropReLUModel

    gb = GuidedBackpropReLUModel(model, device=x.device)

    def run() -> torch.Tensor:
        outs = [gb(x[i : i + 1].clone(), target_category=c) for i, c in enumerate(classes)]
        return torch.from_numpy(np.stack(outs))

    return PeerCall(run, note="one image per call")


# ---------------------------------------------------------------- Captum
def captum_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]) -> PeerCall:
    from captum.attr import LayerGradCam

    lgc = LayerGradCam(model, layer)
    target = torch.tensor(classes)

    def run() -> torch.Tensor:
        a = lgc.attribute(x, target=target, relu_attributions=True)
        return _up(a.detach(), tuple(x.shape[-2:]))

    return PeerCall(run, note="+ bilinear upsampling")


def captum_gradcam_frozen(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]) -> PeerCall:
    """Captum's Grad-CAM on a model whose parameters are frozen (``requires_grad_(False)``, what a
    user can do before calling it): no gradient buffers for the parameters, so its memory is fair
    to compare with camlens' (which never back-propagates into parameters)."""
    model.requires_grad_(False)
    call = captum_gradcam(model, layer, x, classes)
    call.label = "Captum (frozen parameters)"
    call.note = "model.requires_grad_(False) first; + bilinear upsampling"
    return call


def captum_guided(model: nn.Module, layer: nn.Module | None, x: torch.Tensor, classes: list[int]) -> PeerCall:
    from captum.attr import GuidedBackprop

    gb = GuidedBackprop(model)
    target = torch.tensor(classes)
    return PeerCall(lambda: gb.attribute(x, target=target).detach())


# ---------------------------------------------------------------- TorchCAM
def torchcam_gradcam(model: nn.Module, layer_name: str, x: torch.Tensor, classes: list[int]) -> PeerCall:
    from torchcam.methods import GradCAM

    ext = GradCAM(model, layer_name, input_shape=tuple(x.shape[1:]))

    def run() -> torch.Tensor:
        with torch.enable_grad():
            scores = model(x)
            (cam,) = ext(class_idx=list(classes), scores=scores)
        return _up(cam.detach(), tuple(x.shape[-2:]))

    return PeerCall(run, ext.remove_hooks, "+ bilinear upsampling")


def torchcam_scorecam(model: nn.Module, layer_name: str, x: torch.Tensor, classes: list[int]) -> PeerCall:
    from torchcam.methods import ScoreCAM

    ext = ScoreCAM(model, layer_name, input_shape=tuple(x.shape[1:]))

    def run() -> torch.Tensor:
        with torch.inference_mode():
            model(x)
        (cam,) = ext(class_idx=list(classes))
        return _up(cam.detach(), tuple(x.shape[-2:]))

    return PeerCall(run, ext.remove_hooks, "default settings (batch 32) + bilinear upsampling")


#: task -> [(peer distribution, adapter, takes the layer by name)]
ADAPTERS: dict[str, list[tuple[str, Callable[..., PeerCall], bool]]] = {
    "gradcam": [
        ("grad-cam", pgc_gradcam, False),
        ("captum", captum_gradcam, False),
        ("captum", captum_gradcam_frozen, False),
        ("torchcam", torchcam_gradcam, True),
    ],
    "scorecam": [("grad-cam", pgc_scorecam, False), ("torchcam", torchcam_scorecam, True)],
    "guided_backprop": [("grad-cam", pgc_guided, False), ("captum", captum_guided, False)],
}
