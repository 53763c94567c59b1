r"""EigenGrad-CAM — the class-discriminative variant of Eigen-CAM (Muhammad & Yeasin, "Eigen-CAM:
Class Activation Map using Principal Components", IJCNN 2020) that pytorch-grad-cam ships as
``EigenGradCAM``: the principal component of the gradient-weighted features.

With :math:`G = \partial y_c / \partial A` and :math:`P = G \odot A` ``(C, h, w)`` read as :math:`hw`
points in :math:`\mathbb{R}^C`, centred (:math:`\tilde P = P - \bar P`, as pytorch-grad-cam does), and
:math:`V_1` the first right singular vector of :math:`\tilde P`,

.. math:: M_c = \mathrm{ReLU}(\pm \tilde P\, V_1)

The sign of :math:`V_1` is arbitrary (LAPACK returns either); as for Eigen-CAM it is oriented along
the mean of the *uncentred* points, :math:`\bar P \cdot V_1 \ge 0` (the direction in which the
gradient-weighted features are, on average, positive), which is stable under rounding. pytorch-grad-cam
keeps LAPACK's sign, so the two agree up to that choice. One batched backward to the layer; the
``(N, K, C, h, w)`` gradients are reduced chunk by chunk (:func:`camlens.attribution.registry.layer_grad_reduction`).
"""

from __future__ import annotations

import torch

from camlens.attribution.registry import MethodOutput, layer_grad_reduction, register
from camlens.core.engine import ForwardPass


def principal_projection(P: torch.Tensor, center: bool) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h, w)``: the (centred) points projected on their first principal
    axis, oriented along their uncentred mean (see the module docstring); float64 inside."""
    B, _, h, w = P.shape
    M = P.flatten(2).transpose(1, 2).double()  # (B, hw, C)
    mean = M.mean(dim=1, keepdim=True)
    if center:
        M = M - mean
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    v1 = Vh[:, 0, :, None]  # (B, C, 1)
    sign = torch.where((mean @ v1).view(B) < 0, -1.0, 1.0).to(M)
    return ((M @ v1).view(B, h, w) * sign[:, None, None]).to(P.dtype)


@layer_grad_reduction("eigengradcam")
def _eigengrad_projection(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``(N, Kc, h, w)``: the centred principal projection of ``G * A`` per image and class."""
    N, Kc = G.shape[:2]
    return principal_projection((G * A[:, None]).flatten(0, 1), center=True).view(N, Kc, *A.shape[-2:])


@register(
    "eigengradcam",
    paper="Muhammad & Yeasin, Eigen-CAM, IJCNN 2020 (gradient-weighted, as pytorch-grad-cam's EigenGradCAM)",
    summary="first principal component of gradients x features, per class",
    needs=("features", "layer_grads:eigengradcam"),
    title="EigenGrad-CAM",
    aliases=("eigengrad-cam", "eigen-grad-cam"),
)
def eigengradcam(ctx: ForwardPass) -> MethodOutput:
    return MethodOutput(ctx.layer_grad_sums("eigengradcam").relu())
