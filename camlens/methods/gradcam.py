r"""The Grad-CAM family: maps from the features :math:`A` ``(C, h, w)`` at a layer and the gradient
:math:`G = \partial y_c / \partial A` of the target score (one backward, through the head only).

* ``gradcam`` — Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization", ICCV 2017:
  :math:`\alpha_k = \frac{1}{hw}\sum_{ij} G_k(i,j)`, :math:`M = \mathrm{ReLU}(\sum_k \alpha_k A_k)`.
  Option ``grad_norm="rms"`` (the notebooks): :math:`G \leftarrow G / (\sqrt{\mathrm{mean}(G^2)} + 10^{-5})`
  per image and class before averaging (a positive rescaling: same map shape). ``relu=False``
  keeps the signed map.
* ``gradcam++`` — Chattopadhyay et al., "Grad-CAM++", WACV 2018, with the exponential-score
  closed form: :math:`a_k(i,j) = \frac{G^2}{2G^2 + \sum_{ab} A_k(a,b)\, G^3}` (0 where the
  denominator is 0), :math:`w_k = \sum_{ij} a_k(i,j)\,\mathrm{ReLU}(G_k(i,j))`,
  :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)`. The positive factor :math:`\exp(y_c)` of the paper
  only scales the map and is left out.
* ``xgradcam`` — Fu et al., "Axiom-based Grad-CAM", BMVC 2020:
  :math:`w_k = \sum_{ij} \frac{A_k(i,j)}{\sum_{ab} A_k(a,b)} G_k(i,j)`, :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)`.
* ``layercam`` — Jiang et al., "LayerCAM", IEEE TIP 2021:
  :math:`M = \mathrm{ReLU}(\sum_k \mathrm{ReLU}(G_k) \odot A_k)`.
* ``hirescam`` — Draelos & Carin, "Use HiResCAM instead of Grad-CAM", 2020:
  :math:`M = \mathrm{ReLU}(\sum_k G_k \odot A_k)` (element-wise, no spatial averaging).

For a GAP + linear head, :math:`G_k = W_{ck}/(hw)`, so Grad-CAM and HiResCAM equal
:math:`\mathrm{ReLU}(\mathrm{CAM})/(hw)`.
"""

from __future__ import annotations

import torch

from ..engine import ForwardPass
from ..errors import MethodError
from .registry import MethodOutput, register

EPS = 1e-7


def _combine(w: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``sum_k w[n, k', k] A[n, k]`` -> ``(N, K, h, w)`` for ``w`` ``(N, K, C)``."""
    return torch.einsum("nkc,nchw->nkhw", w, A)


@register(
    "gradcam",
    paper="Selvaraju et al., Grad-CAM, ICCV 2017",
    summary="gradient averaged per channel weights the feature maps; ReLU",
    title="Grad-CAM",
    aliases=("grad-cam",),
)
def gradcam(ctx: ForwardPass, *, grad_norm: str | None = None, relu: bool = True) -> MethodOutput:
    G = ctx.layer_grads()
    if grad_norm == "rms":
        G = G / (G.pow(2).mean(dim=(2, 3, 4), keepdim=True).sqrt() + 1e-5)
    elif grad_norm is not None:
        raise MethodError(f"grad_norm must be None or 'rms', not {grad_norm!r}")
    raw = _combine(G.mean(dim=(3, 4)), ctx.layer_features.detach())
    return MethodOutput(raw.relu() if relu else raw, extras={} if relu else {"signed": True})


@register(
    "gradcam++",
    paper="Chattopadhyay et al., Grad-CAM++, WACV 2018",
    summary="second-order pixel weights of positive gradients",
    title="Grad-CAM++",
    aliases=("gradcampp", "gradcam_pp", "grad-cam++"),
)
def gradcam_pp(ctx: ForwardPass) -> MethodOutput:
    G = ctx.layer_grads()
    A = ctx.layer_features.detach()
    g2, g3 = G.pow(2), G.pow(3)
    denom = 2 * g2 + A.sum(dim=(2, 3))[:, None, :, None, None] * g3
    alpha = torch.where(
        denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom)
    )
    w = (alpha * G.relu()).sum(dim=(3, 4))
    return MethodOutput(_combine(w, A).relu())


@register(
    "xgradcam",
    paper="Fu et al., Axiom-based Grad-CAM (XGrad-CAM), BMVC 2020",
    summary="gradients weighted by normalized activations",
    title="XGrad-CAM",
    aliases=("xgrad-cam",),
)
def xgradcam(ctx: ForwardPass) -> MethodOutput:
    G = ctx.layer_grads()
    A = ctx.layer_features.detach()
    w = (G * A[:, None]).sum(dim=(3, 4)) / (A.sum(dim=(2, 3))[:, None] + EPS)
    return MethodOutput(_combine(w, A).relu())


@register(
    "layercam",
    paper="Jiang et al., LayerCAM, IEEE TIP 2021",
    summary="element-wise positive gradient x activation, summed over channels",
    title="LayerCAM",
    aliases=("layer-cam",),
)
def layercam(ctx: ForwardPass) -> MethodOutput:
    G = ctx.layer_grads()
    A = ctx.layer_features.detach()
    return MethodOutput((G.relu() * A[:, None]).sum(dim=2).relu())


@register(
    "hirescam",
    paper="Draelos & Carin, Use HiResCAM instead of Grad-CAM, arXiv 2011.08891",
    summary="element-wise gradient x activation, summed over channels (no averaging)",
    title="HiResCAM",
    aliases=("hires-cam", "hirescam++"),
)
def hirescam(ctx: ForwardPass) -> MethodOutput:
    G = ctx.layer_grads()
    A = ctx.layer_features.detach()
    return MethodOutput((G * A[:, None]).sum(dim=2).relu())
