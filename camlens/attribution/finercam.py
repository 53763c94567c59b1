r"""Finer-CAM — Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
Explanation", CVPR 2025.

Grad-CAM of a comparative score: the target logit :math:`y^c` against the ``n_compare`` classes
whose logits are closest to it (the most similar classes, :math:`S_c`, ranked by
:math:`|y^j - y^c|`), each weighted by its softmax probability :math:`p_j`:

.. math:: s^c = \frac{\sum_{j \in S_c} p_j\,(y^c - \alpha\, y^j)}{\sum_{j \in S_c} p_j + 10^{-9}},\qquad
          M_c = \mathrm{ReLU}\Big(\sum_k \mathrm{mean}_{ij}\Big(\frac{\partial s^c}{\partial A^k}\Big) A^k\Big)

(the gradient flows through :math:`p_j` too, as in pytorch-grad-cam's ``FinerWeightedTarget``).
``alpha=0`` gives Grad-CAM of :math:`y^c`. The regions that tell class :math:`c` apart from its
look-alikes stay; what they share cancels. Classification targets only (class indices); the
comparison classes are in ``extras["compared"]`` (per image, per target: ``n_compare`` class indices).
"""

from __future__ import annotations

import torch

from camlens.attribution.registry import MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core.engine import ForwardPass, class_grads


def finer_scores(logits: torch.Tensor, classes: torch.Tensor, n_compare: int, alpha: float):
    """``(N, K)`` comparative scores (keeps the graph) and the ``(N, K, n_compare)`` compared classes."""
    y_c = logits.gather(1, classes)  # (N, K)
    dist = (logits.detach()[:, None, :] - y_c.detach()[..., None]).abs()  # (N, K, classes)
    dist.scatter_(2, classes[..., None], float("inf"))  # never the target itself
    compared = dist.topk(n_compare, dim=2, largest=False).indices  # (N, K, n)
    prob = logits.softmax(1)
    p = prob.gather(1, compared.flatten(1)).view(compared.shape)
    y_j = logits.gather(1, compared.flatten(1)).view(compared.shape)
    s = (p * (y_c[..., None] - alpha * y_j)).sum(2) / (p.sum(2) + 1e-9)
    return s, compared


@register(
    "finercam",
    paper="Zhang et al., Finer-CAM, CVPR 2025",
    summary="Grad-CAM of the target score against its most similar classes (what tells them apart)",
    needs=("features", "layer_grads:mean"),
    title="Finer-CAM",
    aliases=("finer-cam",),
)
def finercam(ctx: ForwardPass, *, alpha: float = 1.0, n_compare: int = 3, relu: bool = True) -> MethodOutput:
    if ctx.targets.obj is not None or ctx.targets.fn is not None or ctx.logits is None:
        raise MethodError("finercam compares class logits: give class indices as targets (or 'topK'), not a callable")
    logits = ctx.logits
    if not 1 <= n_compare < logits.shape[1]:
        raise MethodError(f"n_compare must be between 1 and {logits.shape[1] - 1} (classes - 1), not {n_compare}")
    if not logits.requires_grad:
        raise MethodError(
            "finercam needs the layer gradients of this pass; choose a layer above which the score depends"
        )
    A = ctx.layer_features
    with torch.enable_grad():
        s, compared = finer_scores(logits, ctx.targets.classes.to(logits.device), n_compare, alpha)
    w = torch.empty(A.shape[0], ctx.k, A.shape[1], dtype=A.dtype, device=A.device)
    for k0, G in class_grads(s, A):
        w[:, k0 : k0 + G.shape[1]] = G.mean(dim=(3, 4))
    raw = torch.einsum("nkc,nchw->nkhw", w, A.detach())
    extras: dict = {"compared": compared.tolist()}
    if not relu:
        extras["signed"] = True
    return MethodOutput(raw.relu() if relu else raw, extras=extras)
