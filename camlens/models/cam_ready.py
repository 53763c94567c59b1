r"""CAM-ready networks: global average pooling straight into one linear layer.

CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016) needs
a network whose last convolutional features :math:`A \in \mathbb{R}^{C\times h\times w}` go
through global average pooling into a linear classifier, so that

.. math:: y_c = \sum_k W_{ck}\,\frac{1}{hw}\sum_{ij} A_k(i,j) + b_c
          \quad\Rightarrow\quad M_c = \sum_k W_{ck} A_k,\;\; \mathrm{mean}_{ij} M_c + b_c = y_c .

:func:`cam_ready` turns a backbone into such a network:

* **VGG** (torchvision ``vgg11``…``vgg19``, with or without BN) — the CAM paper's / notebooks'
  design: the convolutional features up to the last conv ReLU (``conv5_3`` for VGG16; the last
  max-pool and the fully-connected classifier are dropped), then a 3x3 convolution (stride 1,
  pad 1) to 1024 channels with a ReLU, global average pooling, and a linear layer *without
  bias*. For a 224x224 input the map is 1024 x 14 x 14. The 3x3 convolution is **grouped with
  2 groups** by default, exactly as in the released Caffe ``VGG16-CAM`` model that notebook 003
  loads (``CAM_conv`` weights ``(3, 3, 256, 1024)``: two kernels of 256 -> 512 channels applied to
  the two halves of conv5_3), so those weights can be converted without change; ``groups=1``
  gives a dense convolution. Notebook 003 forgets the ReLU after ``CAM_conv`` (the Caffe model
  has ``CAM_relu``); we keep it, which also makes the CAM features non-negative like every
  other network's last activations.
* **ResNet, RegNet, ShuffleNet, DenseNet, EfficientNet, MobileNetV2, MNASNet, the bundled
  EfficientNet-Lite0** (already GAP [+ dropout] + linear): the last linear layer is replaced by
  a fresh one with ``num_classes`` outputs.
* **MobileNetV3** (GAP -> linear -> hardswish -> dropout -> linear, an MLP head): the classifier
  becomes dropout -> one linear layer from the pooled features.
* **ConvNeXt** (GAP -> LayerNorm -> linear): a LayerNorm of the *pooled* vector is not linear in
  the features, so CAM would not be exact. The (pretrained) channel LayerNorm is moved *before*
  the pooling, applied at every position (``avgpool`` becomes ``Sequential(norm, pool)``); the
  classifier becomes flatten -> linear. The features entering the pooling are then the normalized
  map and CAM holds exactly. The network changes slightly (normalize-then-pool instead of
  pool-then-normalize), which fine-tuning absorbs.

Every result is verified numerically with one small probe forward (the same identity that
``explain(method="cam")`` checks), and carries a :class:`~camlens.models.zoo.ModelCard` naming
its new head modules, so ``camlens.explain(model, x, method="cam")`` works with no other
argument.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from camlens.base._util import eval_mode
from camlens.base.errors import CamlensError, CheckpointError, HeadError, WeightsNotFoundError
from camlens.models.builders import build_named, torchvision_weights_file
from camlens.models.card import ModelCard, attach_card, card_of
from camlens.models.classes import imagenet_classes
from camlens.models.heads import last_linear, set_submodule
from camlens.models.preprocess import IMAGENET
from camlens.models.weights import read_state_dict

#: torchvision's ImageNet VGG16 weights file (``VGG16_Weights.IMAGENET1K_V1``) in the torch hub cache
VGG16_FILE = "vgg16-397923af.pth"

#: Channels of the CAM convolution (the paper's 1024).
CAM_CHANNELS = 1024


class CAMNet(nn.Module):
    r"""VGG features -> 3x3 conv (``channels``, ``groups``) -> ReLU -> GAP -> linear without bias.

    ``logits = fc(mean_{ij} relu(cam_conv(features(x))))``. The CAM features are the output of
    ``cam_relu`` (also the input of ``gap``).
    """

    def __init__(
        self,
        features: nn.Module,
        num_classes: int,
        in_channels: int = 512,
        channels: int = CAM_CHANNELS,
        groups: int = 2,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if in_channels % groups or channels % groups:
            raise CamlensError(
                f"groups={groups} must divide the {in_channels} input and {channels} output "
                "channels of the CAM convolution; use groups=1 or 2"
            )
        self.features = features
        self.cam_conv = nn.Conv2d(in_channels, channels, kernel_size=3, stride=1, padding=1, groups=groups)
        self.cam_relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes, bias=bias)
        # torchvision's VGG initialization for the new layers
        nn.init.kaiming_normal_(self.cam_conv.weight, mode="fan_out", nonlinearity="relu")
        if self.cam_conv.bias is not None:
            nn.init.zeros_(self.cam_conv.bias)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.cam_relu(self.cam_conv(self.features(x)))
        return self.fc(torch.flatten(self.gap(a), 1))


# ----------------------------------------------------------------------------------------------
def _tv():
    import torchvision.models as tvm

    return tvm


def _is_vgg(model: nn.Module) -> bool:
    return isinstance(model, _tv().VGG)


def _vgg_trunk(features: nn.Module) -> tuple[nn.Sequential, int]:
    """VGG ``features`` up to the last conv ReLU (last max-pool dropped) and its channel count."""
    feats = list(features.children())
    while feats and isinstance(feats[-1], nn.MaxPool2d):
        feats.pop()
    convs = [m for m in feats if isinstance(m, nn.Conv2d)]
    if not convs:
        raise HeadError("this VGG has no convolution in `features`; cannot build the CAM network")
    # keep torchvision's indices so the names (features.28 = conv5_3 in VGG16) still match its weights
    trunk = nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(feats)))
    return trunk, convs[-1].out_channels


def _base_name(model: nn.Module) -> str:
    card = card_of(model)
    return card.name if card is not None else type(model).__name__


def _new_linear(in_features: int, num_classes: int, bias: bool, like: nn.Module) -> nn.Linear:
    ref = next(like.parameters(), None)
    lin = nn.Linear(in_features, num_classes, bias=bias)
    return lin if ref is None else lin.to(ref.device, ref.dtype)


def _convert_head(model: nn.Module, num_classes: int, bias: bool | None) -> list[str]:
    """Make ``model`` (a private copy) GAP + linear in place; return the new head's module names."""
    tvm = _tv()
    if isinstance(model, tvm.MobileNetV3):
        lins = [m for m in model.classifier if isinstance(m, nn.Linear)]
        drops = [m for m in model.classifier if isinstance(m, nn.Dropout)]
        p = drops[0].p if drops else 0.0
        model.classifier = nn.Sequential(
            nn.Dropout(p), _new_linear(lins[0].in_features, num_classes, bias is not False, model)
        )
        return ["classifier.1"]
    if isinstance(model, tvm.ConvNeXt):
        norm = model.classifier[0]
        lin = model.classifier[-1]
        model.avgpool = nn.Sequential(OrderedDict(norm=norm, pool=nn.AdaptiveAvgPool2d(1)))
        model.classifier = nn.Sequential(
            nn.Flatten(1), _new_linear(lin.in_features, num_classes, bias is not False, model)
        )
        return ["classifier.1"]
    found = last_linear(model)
    if found is None:
        raise HeadError(
            f"{type(model).__name__} has no nn.Linear classifier to replace; cam_ready handles VGG, ResNet, "
            "DenseNet, EfficientNet(-Lite), MobileNet, ConvNeXt and other GAP + linear networks"
        )
    name, old = found
    keep = old.bias is not None if bias is None else bias
    set_submodule(model, name, _new_linear(old.in_features, num_classes, keep, model))
    return [name]


def check_cam_ready(model: nn.Module, size: int = 64, tol: float | None = None) -> float:
    """Probe ``model`` once and verify ``logits == mean(A) @ W.T + b`` for the features ``A``
    entering its last global pooling and its last linear layer. Returns the max difference;
    raises :class:`~camlens.base.errors.HeadError` when the identity fails. ``tol`` (relative to
    ``1 + max|logits|``) defaults to ``max(1e-3, 16 eps)`` of the model's dtype (bf16: 0.125).
    """
    from camlens.core.capture import CaptureSpec, capture
    from camlens.core.layers import resolve_layer

    card = card_of(model)
    spec = (
        resolve_layer(model, card.layer, card.capture)
        if card is not None and card.layer
        else CaptureSpec(None, "auto", "pool")
    )
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g).to(p.device, p.dtype)
    with eval_mode(model), torch.inference_mode(), capture(model, spec, cut=False, need_grad=False) as cap:
        logits = model(x)
    lin = last_linear(model)
    if cap.value is None or lin is None or cap.value.dim() != 4 or cap.value.shape[1] != lin[1].in_features:
        raise HeadError(
            f"{type(model).__name__}: the features entering the global pooling do not feed the "
            "last linear layer; this network is not CAM-ready"
        )
    W, b = lin[1].weight, lin[1].bias
    if tol is None:
        tol = max(1e-3, 16 * torch.finfo(p.dtype).eps) if p.is_floating_point() else 1e-3
    with torch.no_grad():
        pred = cap.value.float().mean((2, 3)) @ W.float().T + (0 if b is None else b.float())
        logits = logits.float()
        err = float((pred - logits).abs().max())
    if not err <= tol * (1 + float(logits.abs().max())):
        raise HeadError(
            f"{type(model).__name__}: logits differ from GAP + linear by {err:.3g} after the "
            "conversion; this network's head is not supported by cam_ready (use Grad-CAM)"
        )
    return err


def cam_ready(
    backbone: nn.Module | str,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    channels: int = CAM_CHANNELS,
    groups: int = 2,
    bias: bool | None = None,
    class_names: Sequence[str] | None = None,
    check: bool = True,
) -> nn.Module:
    r"""Turn a backbone into a CAM-ready classifier with ``num_classes`` outputs.

    Args:
        backbone: an ``nn.Module`` (never modified: the result owns copies of its layers) or a
            zoo name (``"vgg16"``, ``"resnet50"``, ``"efficientnet_lite0"``…, loaded with ``weights``).
        num_classes: outputs of the new linear layer.
        weights: for a zoo name, passed to :func:`camlens.load_model` (``"random"`` for an
            untrained backbone). Ignored for a module.
        channels, groups: the VGG CAM convolution (1024 channels, 2 groups: the CAM paper /
            notebook 003; ``groups=1`` for a dense convolution).
        bias: bias of the new linear layer. Default: none for VGG (the paper's ``CAM_fc``); for
            the other families, a bias if their own classifier had one.
        class_names: names of the ``num_classes`` outputs, stored on the model card.
        check: verify :math:`y = \mathrm{mean}(A) W^\top + b` with one probe forward.

    Returns:
        The network in eval mode with ``model.camlens`` (a ModelCard); ``card.extra["head"]``
        lists the new modules (the ones :func:`camlens.train.finetune` trains when the backbone
        is frozen).
    """
    if num_classes < 1:
        raise CamlensError(f"num_classes must be >= 1, not {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise CamlensError(f"{len(class_names)} class names for {num_classes} classes")
    if isinstance(backbone, str):
        key = backbone.lower().replace("-", "_")
        backbone = vgg16_cam(weights=weights) if key == "vgg16_cam" else build_named(backbone, weights).eval()
    elif not isinstance(backbone, nn.Module):
        raise CamlensError(f"backbone must be an nn.Module or a zoo name, not {type(backbone).__name__}")
    card = card_of(backbone)
    base = _base_name(backbone)
    if _is_vgg(backbone):
        features = backbone.features
        assert isinstance(features, nn.Module)
        trunk, c_in = _vgg_trunk(features)
        trunk = copy.deepcopy(trunk)
        ref = next(trunk.parameters())
        model: nn.Module = CAMNet(trunk, num_classes, c_in, channels, groups, bias=bool(bias))
        model.cam_conv.to(ref.device, ref.dtype)
        model.fc.to(ref.device, ref.dtype)
        layer: str | None = "cam_relu"
        head, capture = ["cam_conv", "fc"], "output"
        name = f"{base}_cam" if not base.endswith("_cam") else base
        extra = {"cam_channels": channels, "cam_groups": groups}
    else:
        model = copy.deepcopy(backbone)
        head = _convert_head(model, num_classes, bias)
        layer = card.layer if card is not None else None
        capture = card.capture if card is not None else "output"
        name = base
        extra = {}
    new_card = ModelCard(
        name,
        card.preprocess if card is not None else IMAGENET,
        list(class_names) if class_names is not None else None,
        layer=layer,
        capture=capture,
        extra={**(card.extra if card is not None else {}), **extra, "head": head, "cam_ready": True, "base": base},
    )
    attach_card(model, new_card)
    model.eval()
    if check:
        check_cam_ready(model)
    return model


def _load_into(model: nn.Module, state: dict, path, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: expected {what}; the tensors do not fit:\n{exc}") from None


def vgg16_cam(
    num_classes: int = 1000,
    weights: str | os.PathLike | None = None,
    *,
    groups: int = 2,
    channels: int = CAM_CHANNELS,
) -> nn.Module:
    """The notebooks' VGG16-CAM network (``load_model("vgg16_cam")``).

    Args:
        num_classes: outputs of the linear layer (1000: ImageNet class names on the card).
        weights: ``None`` — torchvision's ImageNet VGG16 backbone weights from the torch hub cache
            (never downloaded; a clear error says how to get them), ``"random"``, or a path to a
            ``.pth``/``.safetensors`` state dict: either torchvision's ``vgg16`` (its ``features.*``
            are used, the CAM layers start fresh) or a full VGG16-CAM state dict (``features.*``,
            ``cam_conv.*``, ``fc.*``).

    Only the convolutional trunk is built (torchvision's ``make_layers``, layer indices kept), never
    the 120M-parameter classifier that the CAM network drops. Random weights use torchvision's VGG
    initialization.

    Preprocessing: torchvision's ImageNet normalization (RGB, mean/std), because the backbone
    weights are torchvision's. The notebooks' Caffe BGR mean subtraction (``CAFFE_BGR``) is right
    only for the original Caffe weights: ``load_model("vgg16_cam", PATH, preprocess="caffe_bgr")``.
    """
    from torchvision.models.vgg import cfgs, make_layers

    state: dict | None = None
    source = weights
    if weights is None or str(weights) in ("DEFAULT", "IMAGENET1K_V1"):
        source, _ = torchvision_weights_file("vgg16", None if weights is None else str(weights))
    elif weights != "random" and not Path(weights).exists():
        raise WeightsNotFoundError(
            f"weights file not found: {weights}. For torchvision's ImageNet VGG16 backbone, run once on a "
            "connected machine: python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\" "
            f"and copy {Path(torch.hub.get_dir()) / 'checkpoints' / VGG16_FILE} to the same place here; then "
            "leave out --weights (weights=None) and camlens finds it in the torch hub cache. Or pass a "
            "VGG16 / VGG16-CAM state dict you have, or 'random'."
        )
    if weights != "random":
        assert source is not None
        state = read_state_dict(source)
    trunk, c_in = _vgg_trunk(make_layers(cfgs["D"], batch_norm=False))
    model = CAMNet(trunk, num_classes, c_in, channels, groups, bias=False)
    if state is None:
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    elif any(k.startswith("cam_conv.") for k in state):
        _load_into(model, state, source, f"a VGG16-CAM state dict with {num_classes} classes and groups={groups}")
    else:
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        if not feats:
            raise CheckpointError(
                f"{source}: expected a torchvision VGG16 state dict (features.*) or a VGG16-CAM "
                "one (features.*, cam_conv.*, fc.*); found neither"
            )
        _load_into(
            model.features,
            {k.removeprefix("features."): v for k, v in feats.items()},
            source,
            "a torchvision VGG16 state dict",
        )
    classes = imagenet_classes() if num_classes == 1000 else None
    attach_card(
        model,
        ModelCard(
            "vgg16_cam",
            IMAGENET,
            classes,
            layer="cam_relu",
            capture="output",
            extra={
                "head": ["cam_conv", "fc"],
                "cam_ready": True,
                "base": "vgg16",
                "cam_channels": channels,
                "cam_groups": groups,
            },
        ),
    )
    return model.eval()


__all__ = ["CAMNet", "cam_ready", "check_cam_ready", "vgg16_cam"]
