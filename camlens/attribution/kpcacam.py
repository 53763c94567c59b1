r"""KPCA-CAM — Karmani et al., "KPCA-CAM: Visual Explainability of Deep Computer Vision Models
using Kernel PCA", MMSP 2024: Eigen-CAM with kernel PCA instead of PCA.

The features :math:`A` ``(C, h, w)`` are read as :math:`hw` points :math:`a_p \in \mathbb{R}^C`, centred
(:math:`\tilde a_p = a_p - \bar a`, as pytorch-grad-cam does); with the kernel matrix
:math:`K_{pq} = k(\tilde a_p, \tilde a_q)`, centred in feature space
(:math:`K_c = K - \mathbf{1}K - K\mathbf{1} + \mathbf{1}K\mathbf{1}`, :math:`\mathbf{1} = \frac{1}{hw}` everywhere)
and its leading eigenpair :math:`(\lambda_1, u_1)`,

.. math:: M = \mathrm{ReLU}(\pm \sqrt{\lambda_1}\, u_1)

(the first kernel principal component of each point, as scikit-learn's ``KernelPCA.fit_transform``).
Kernels: ``"sigmoid"`` :math:`\tanh(\gamma\, x \cdot y + c_0)` (pytorch-grad-cam's default),
``"rbf"`` :math:`\exp(-\gamma \lVert x - y \rVert^2)`, ``"linear"`` (= Eigen-CAM, centred);
``gamma=None`` is :math:`1/C`, ``coef0=1``. **The sign** of :math:`u_1` is arbitrary; it is oriented
so that the map correlates non-negatively with the mean activation per position
:math:`\frac{1}{C}\sum_k A_k(p)` (the component points where the features are active).
pytorch-grad-cam keeps scikit-learn's sign: the maps agree up to that choice. Class-agnostic; no
backward pass. Cost: one :math:`hw \times hw` eigendecomposition per image (float64).
"""

from __future__ import annotations

import torch

from camlens.attribution.registry import MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core.engine import ForwardPass

KERNELS = ("sigmoid", "rbf", "linear")


def kernel_matrix(X: torch.Tensor, kernel: str, gamma: float, coef0: float) -> torch.Tensor:
    """``(B, n, n)`` kernel matrix of the rows of ``X`` ``(B, n, C)``."""
    dot = X @ X.transpose(1, 2)
    if kernel == "sigmoid":
        return torch.tanh(gamma * dot + coef0)
    if kernel == "rbf":
        sq = X.pow(2).sum(2)
        return torch.exp(-gamma * (sq[:, :, None] + sq[:, None, :] - 2 * dot).clamp_min(0))
    return dot


@register(
    "kpcacam",
    paper="Karmani et al., KPCA-CAM, MMSP 2024",
    summary="first kernel principal component of the features (class-agnostic)",
    needs=("features",),
    title="KPCA-CAM",
    aliases=("kpca-cam", "kpca_cam"),
)
def kpcacam(
    ctx: ForwardPass, *, kernel: str = "sigmoid", gamma: float | None = None, coef0: float = 1.0
) -> MethodOutput:
    if kernel not in KERNELS:
        raise MethodError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    A = ctx.layer_features.detach()
    N, C, h, w = A.shape
    X = A.flatten(2).transpose(1, 2).double()  # (N, hw, C)
    X = X - X.mean(dim=1, keepdim=True)
    K = kernel_matrix(X, kernel, 1.0 / C if gamma is None else float(gamma), coef0)
    Kc = K - K.mean(1, keepdim=True) - K.mean(2, keepdim=True) + K.mean((1, 2), keepdim=True)
    evals, evecs = torch.linalg.eigh(Kc)  # ascending
    proj = evecs[:, :, -1] * evals[:, -1:].clamp_min(0).sqrt()  # (N, hw)
    act = A.double().mean(1).flatten(1)  # (N, hw) mean activation per position
    corr = ((proj - proj.mean(1, keepdim=True)) * (act - act.mean(1, keepdim=True))).sum(1)
    proj = proj * torch.where(corr < 0, -1.0, 1.0).to(proj)[:, None]
    raw = proj.view(N, 1, h, w).relu().to(A.dtype)
    return MethodOutput(raw.expand(N, ctx.k, h, w).contiguous(), extras={"class_agnostic": True})
