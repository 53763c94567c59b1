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

Volumes and clips: with 3-D features :math:`A` ``(C, d, h, w)`` every sum and mean over
:math:`(i, j)` runs over the :math:`d\,h\,w` positions; the maps are ``(d, h, w)``.
"""

from __future__ import annotations

import torch

from camlens.attribution.registry import MethodOutput, layer_grad_reduction, register
from camlens.base.errors import MethodError
from camlens.base.ops import spatial_axes, spatial_letters
from camlens.core.engine import ForwardPass

EPS = 1e-7


def _combine(w: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``sum_k w[n, k', k] A[n, k]`` -> ``(N, K, *spatial)`` for ``w`` ``(N, K, C)`` and ``A``
    ``(N, C, *spatial)`` (``(h, w)``, or ``(d, h, w)`` for a volume)."""
    sp = spatial_letters(A)
    return torch.einsum(f"nkc,nc{sp}->nk{sp}", w, A)


# Reductions of a chunk G (N, Kc, C, *spatial) of layer gradients (see camlens.core.engine): each
# method below declares the one it needs, so the (N, K, C, *spatial) tensor never exists in full.
# Every sum over (i, j) runs over all spatial positions (i, j) or (z, i, j) of the features.
@layer_grad_reduction("gradcam++")
def _gradcam_pp_weights(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``w_k = sum_ij alpha_k(i,j) ReLU(G_k(i,j))`` ``(N, Kc, C)``, ``alpha = G^2 / (2 G^2 + sum_ab A G^3)``."""
    g2 = G.pow(2)
    ones = (1,) * (A.dim() - 2)
    denom = 2 * g2 + A.sum(dim=spatial_axes(A)).view(A.shape[0], 1, A.shape[1], *ones) * (g2 * G)
    alpha = torch.where(
        denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom)
    )
    return (alpha * G.relu()).sum(dim=spatial_axes(G, 3))


@layer_grad_reduction("xgradcam")
def _xgradcam_weights(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``w_k = sum_ij A_k(i,j) G_k(i,j) / sum_ab A_k(a,b)`` ``(N, Kc, C)``."""
    sp = spatial_letters(A)
    return torch.einsum(f"nkc{sp},nc{sp}->nkc", G, A) / (A.sum(dim=spatial_axes(A))[:, None] + EPS)


@layer_grad_reduction("hirescam")
def _hirescam_sum(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``sum_k G_k A_k`` ``(N, Kc, *spatial)`` (before the ReLU)."""
    sp = spatial_letters(A)
    return torch.einsum(f"nkc{sp},nc{sp}->nk{sp}", G, A)


@layer_grad_reduction("layercam")
def _layercam_sum(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``sum_k ReLU(G_k) A_k`` ``(N, Kc, *spatial)`` (before the ReLU)."""
    sp = spatial_letters(A)
    return torch.einsum(f"nkc{sp},nc{sp}->nk{sp}", G.relu(), A)


@register(
    "gradcam",
    paper="Selvaraju et al., Grad-CAM, ICCV 2017",
    summary="gradient averaged per channel weights the feature maps; ReLU",
    needs=("features", "layer_grads:mean"),
    title="Grad-CAM",
    aliases=("grad-cam",),
    volumes=True,
)
def gradcam(ctx: ForwardPass, *, grad_norm: str | None = None, relu: bool = True) -> MethodOutput:
    w = ctx.layer_grad_sums("mean")  # (N, K, C) spatial means of the gradient
    if grad_norm == "rms":  # G / (sqrt(mean G^2) + 1e-5) per image and class, then averaged
        w = w / (ctx.layer_grad_sums("sqmean").sqrt() + 1e-5)[:, :, None]
    elif grad_norm is not None:
        raise MethodError(f"grad_norm must be None or 'rms', not {grad_norm!r}")
    raw = _combine(w, ctx.layer_features.detach())
    return MethodOutput(raw.relu() if relu else raw, extras={} if relu else {"signed": True})


@register(
    "gradcam++",
    paper="Chattopadhyay et al., Grad-CAM++, WACV 2018",
    summary="second-order pixel weights of positive gradients",
    needs=("features", "layer_grads:gradcam++"),
    title="Grad-CAM++",
    aliases=("gradcampp", "gradcam_pp", "grad-cam++"),
    volumes=True,
)
def gradcam_pp(ctx: ForwardPass) -> MethodOutput:
    return MethodOutput(_combine(ctx.layer_grad_sums("gradcam++"), ctx.layer_features.detach()).relu())


@register(
    "xgradcam",
    paper="Fu et al., Axiom-based Grad-CAM (XGrad-CAM), BMVC 2020",
    summary="gradients weighted by normalized activations",
    needs=("features", "layer_grads:xgradcam"),
    title="XGrad-CAM",
    aliases=("xgrad-cam",),
    volumes=True,
)
def xgradcam(ctx: ForwardPass) -> MethodOutput:
    return MethodOutput(_combine(ctx.layer_grad_sums("xgradcam"), ctx.layer_features.detach()).relu())


@register(
    "layercam",
    paper="Jiang et al., LayerCAM, IEEE TIP 2021",
    summary="element-wise positive gradient x activation, summed over channels",
    needs=("features", "layer_grads:layercam"),
    title="LayerCAM",
    aliases=("layer-cam",),
    volumes=True,
)
def layercam(ctx: ForwardPass) -> MethodOutput:
    return MethodOutput(ctx.layer_grad_sums("layercam").relu())


@register(
    "hirescam",
    paper="Draelos & Carin, Use HiResCAM instead of Grad-CAM, arXiv 2011.08891",
    summary="element-wise gradient x activation, summed over channels (no averaging)",
    needs=("features", "layer_grads:hirescam"),
    title="HiResCAM",
    aliases=("hires-cam", "hirescam++"),
    volumes=True,
)
def hirescam(ctx: ForwardPass) -> MethodOutput:
    return MethodOutput(ctx.layer_grad_sums("hirescam").relu())
