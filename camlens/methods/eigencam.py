r"""Eigen-CAM — Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal
Components", IJCNN 2020.

The features :math:`A` ``(C, h, w)`` are read as :math:`hw` points in :math:`\mathbb{R}^C`; with
:math:`V_1` the first right singular vector of that ``(hw, C)`` matrix (uncentred, as in the
paper; ``center=True`` subtracts the mean first),

.. math:: M = \mathrm{ReLU}(\pm A \cdot V_1)

with the sign chosen so that the projection sums to a non-negative value (a singular vector's
sign is arbitrary). Class-agnostic: every target class gets the same map. No backward pass.
"""

from __future__ import annotations

import torch

from ..engine import ForwardPass
from .registry import MethodOutput, register


@register(
    "eigencam",
    paper="Muhammad & Yeasin, Eigen-CAM, IJCNN 2020",
    summary="projection of the features on their first principal component (class-agnostic)",
    needs=("features",),
    title="Eigen-CAM",
    aliases=("eigen-cam",),
)
def eigencam(ctx: ForwardPass, *, center: bool = False) -> MethodOutput:
    A = ctx.layer_features.detach()
    N, _, h, w = A.shape
    M = A.flatten(2).transpose(1, 2).double()  # (N, hw, C)
    if center:
        M = M - M.mean(dim=1, keepdim=True)
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    proj = (M @ Vh[:, 0, :, None]).view(N, h, w)
    sign = torch.where(proj.sum(dim=(1, 2)) < 0, -1.0, 1.0).to(proj)
    raw = (proj * sign[:, None, None]).relu().to(A.dtype)
    return MethodOutput(raw[:, None].expand(N, ctx.k, h, w).contiguous(), extras={"class_agnostic": True})
