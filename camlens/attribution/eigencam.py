r"""Eigen-CAM — Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal
Components", IJCNN 2020.

The features :math:`A` ``(C, h, w)`` are read as :math:`hw` points in :math:`\mathbb{R}^C`; with
:math:`V_1` the first right singular vector of that ``(hw, C)`` matrix (uncentred, as in the
paper; ``center=True`` subtracts the mean first),

.. math:: M = \mathrm{ReLU}(\pm A \cdot V_1)

**The sign.** A singular vector's sign is arbitrary (LAPACK returns either, depending on
rounding), so :math:`V_1` is oriented along the mean activation vector
:math:`\bar a = \frac{1}{hw} \sum_p A_{:,p}` of the *uncentred* features: :math:`\bar a \cdot V_1 \ge 0`,
i.e. the uncentred projection :math:`\sum_p A_{:,p} \cdot V_1` sums to a non-negative value; the
principal axis points the way the features are active (the object, where a bright object
dominates). Uncentred, this is the rule "the projection sums to a non-negative value". Centred,
that sum is zero by construction (:math:`\sum_p (A_{:,p} - \bar a) = 0`): its sign would be
rounding noise of 1e-15…1e-12 against values of 1…1000, and the map came back inverted
(background highlighted) for about half the inputs; :math:`\bar a \cdot V_1` is not zero by
construction, so the rule is the same for both modes and stable under rounding.
Class-agnostic: every target class gets the same map. No backward pass.
"""

from __future__ import annotations

import torch

from camlens.attribution.registry import MethodOutput, register
from camlens.core.engine import ForwardPass


@register(
    "eigencam",
    paper="Muhammad & Yeasin, Eigen-CAM, IJCNN 2020",
    summary="projection of the features on their first principal component (class-agnostic)",
    needs=("features",),
    title="Eigen-CAM",
    aliases=("eigen-cam",),
    volumes=True,
)
def eigencam(ctx: ForwardPass, *, center: bool = False) -> MethodOutput:
    A = ctx.layer_features.detach()
    N, spatial = A.shape[0], tuple(A.shape[2:])  # (h, w), or (d, h, w) for a volume
    M = A.flatten(2).transpose(1, 2).double()  # (N, hw, C)
    mean = M.mean(dim=1, keepdim=True)  # (N, 1, C): the uncentred mean activation vector
    if center:
        M = M - mean
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    v1 = Vh[:, 0, :, None]  # (N, C, 1)
    proj = (M @ v1).view(N, *spatial)
    # orient V1 along the uncentred mean (not zero by construction; see the module docstring)
    sign = torch.where((mean @ v1).view(N) < 0, -1.0, 1.0).to(proj)
    raw = (proj * sign.view(N, *(1,) * len(spatial))).relu().to(A.dtype)
    return MethodOutput(raw[:, None].expand(N, ctx.k, *spatial).contiguous(), extras={"class_agnostic": True})
