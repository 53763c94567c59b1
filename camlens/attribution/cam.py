r"""CAM — Zhou, Khosla, Lapedriza, Oliva, Torralba, "Learning Deep Features for Discriminative
Localization", CVPR 2016.

For a network whose last conv features :math:`A \in \mathbb{R}^{C\times h\times w}` go through
global average pooling into a linear layer :math:`y_c = \sum_k W_{ck}\,\mathrm{mean}(A_k) + b_c`:

.. math:: M_c(i, j) = \sum_k W_{ck} A_k(i, j)

(for 3-D features :math:`A_k(z, i, j)` and the mean over the :math:`d\,h\,w` positions alike).
No ReLU and no bias, so :math:`\mathrm{mean}_{ij} M_c + b_c = y_c` exactly. The head is found
automatically (the last ``nn.Linear``) and *verified numerically* on the pass itself: if
``mean(A) @ W.T + b`` does not reproduce the logits, the head is not GAP + linear (or the
captured features are not the ones entering the pooling) and a :class:`HeadError` says so.
No backward pass is run.
"""

from __future__ import annotations

import torch
from torch import nn

from camlens.attribution.registry import CLASSIFIERS, MethodOutput, register
from camlens.base.errors import HeadError, MethodError
from camlens.base.ops import spatial_axes, spatial_letters
from camlens.core.engine import ForwardPass
from camlens.models.heads import last_linear


def _head_params(model: nn.Module, head) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    if head is None:
        found = last_linear(model)
        if found is None:
            raise HeadError(
                "cam needs a linear classifier after global average pooling, and this model has "
                "no nn.Linear; use method='gradcam' (it works on any head)"
            )
        name, mod = found
        return mod.weight, mod.bias, name
    if isinstance(head, str):
        sub = model.get_submodule(head)
        if not isinstance(getattr(sub, "weight", None), torch.Tensor):
            raise MethodError(f"head={head!r} is a {type(sub).__name__} without a weight; name the linear layer")
        weight, bias = sub.weight, getattr(sub, "bias", None)
        assert isinstance(weight, torch.Tensor)
        return weight, bias if isinstance(bias, torch.Tensor) else None, head
    if isinstance(head, nn.Linear):
        return head.weight, head.bias, type(head).__name__
    if isinstance(head, (tuple, list)) and len(head) == 2:
        return torch.as_tensor(head[0]), None if head[1] is None else torch.as_tensor(head[1]), "given"
    raise MethodError("head= must be None, a dotted module name, an nn.Linear or a (weight, bias) pair")


def cam_weights(ctx: ForwardPass, head=None, check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's ``(num_classes, C)`` weight and bias, verified against the pass's logits."""
    A = ctx.layer_features
    W, b, name = _head_params(ctx.model, head)
    W = W.detach().to(A.device, A.dtype)
    b = None if b is None else b.detach().to(A.device, A.dtype)
    C = A.shape[1]
    hint = (
        "CAM needs a network whose features go through global average pooling straight into one "
        "linear layer (ResNet, DenseNet, EfficientNet, MobileNet, the VGG16-CAM network). "
        "Use method='gradcam', which works on any head"
    )
    if ctx.logits is None:  # a target object on a detector / segmenter output: no classifier head
        raise HeadError(f"CAM needs a classifier's (N, num_classes) logits; this model's output is not one. {hint}.")
    if W.dim() != 2 or W.shape[1] != C or W.shape[0] != ctx.logits.shape[1]:
        raise HeadError(
            f"the captured features ({ctx.layer_spec.describe()}) have {C} channels but the last linear layer "
            f"{name!r} maps {W.shape[-1]} -> {W.shape[0]}. {hint}."
        )
    if check:
        with torch.no_grad():
            # in float32 against the model's own logits; the tolerance fits the model's dtype (the
            # logits carry its rounding: bf16 has 8 mantissa bits), structural mismatches are O(1)
            pred = A.detach().float().mean(spatial_axes(A)) @ W.float().T + (0 if b is None else b.float())
            logits = ctx.logits.detach().float()
            eps = torch.finfo(ctx.autocast or A.dtype).eps if A.is_floating_point() else 0.0
            tol = max(1e-3, 16 * eps) * (1 + logits.abs().max())
            err = (pred - logits).abs().max()
        if not torch.isfinite(err) or err > tol:
            raise HeadError(
                f"the logits are not global-average-pooled {ctx.layer_spec.describe()} through the linear layer "
                f"{name!r} (max difference {float(err):.3g}). {hint}, or capture the features that enter "
                "the pooling (layer=None chooses them)."
            )
    return W, b


@register(
    "cam",
    paper="Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016",
    summary="class activation map: head weights x last conv features (GAP + linear heads)",
    needs=("features",),
    title="CAM",
    applies_to=CLASSIFIERS,
    volumes=True,
)
def cam(ctx: ForwardPass, *, head=None, check_head: bool = True) -> MethodOutput:
    """``M_c = sum_k W[c, k] A_k`` (no ReLU, no bias); see the module docstring."""
    if ctx.targets.fn is not None:
        raise MethodError("cam needs class indices as targets, not a callable; use gradcam for custom scores")
    A = ctx.layer_features.detach()
    W, b = cam_weights(ctx, head, check_head)
    w = W[ctx.targets.classes.to(A.device)]  # (N, K, C)
    sp = spatial_letters(A)  # "hw", or "dhw" for a volume's features
    raw = torch.einsum(f"nkc,nc{sp}->nk{sp}", w, A)
    extras: dict = {"signed": True}  # no ReLU: negative where the features speak against the class
    if b is not None:
        extras["bias"] = b[ctx.targets.classes.to(A.device)]
    return MethodOutput(raw, extras=extras)
