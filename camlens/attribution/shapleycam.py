r"""ShapleyCAM — Cai, "CAMs as Shapley Value-based Explainers", arXiv 2501.06261, 2025 (2024 preprint).

The channel weights are a second-order (Shapley value) estimate: the gradient corrected by half the
Hessian-vector product in the direction of the features,

.. math:: w_k^c = \mathrm{mean}_{ij}\Big(G_k - \tfrac12 (H A)_k\Big),\qquad
          G = \frac{\partial s^c}{\partial A},\quad
          H A = \frac{\partial (G \cdot A)}{\partial A}\Big|_{A\ \mathrm{fixed}},\qquad
          M_c = \mathrm{ReLU}\Big(\sum_k w_k^c A_k\Big)

with the **ReST** score (residual softmax target, ``rest=True``, the paper's choice)
:math:`s^c = y^c + \log \mathrm{softmax}(y)_c = y^c - \mathrm{CE}(y, c)`, which uses the logit and
the probability at once; ``rest=False`` explains the logit :math:`y^c`. A head that is piecewise
linear in :math:`A` (ReLU, pooling, linear) has :math:`H = 0` for the logit, so ShapleyCAM of the logit
equals Grad-CAM there; the ReST score's log-sum-exp is curved. One backward with its graph kept and
one Hessian-vector product per class, through the layers above the target only. Classification
targets only (class indices).
"""

from __future__ import annotations

import torch

from camlens.attribution.registry import MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core.engine import ForwardPass


def rest_scores(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` ReST scores :math:`y^c + \\log\\mathrm{softmax}(y)_c` (keeps the graph)."""
    return logits.gather(1, classes) + logits.log_softmax(1).gather(1, classes)


@register(
    "shapleycam",
    paper="Cai, CAMs as Shapley Value-based Explainers (ShapleyCAM), arXiv 2501.06261",
    summary="gradient minus half the Hessian-vector product per channel, of the ReST score",
    needs=("features", "layer_grads:mean"),
    title="ShapleyCAM",
    aliases=("shapley-cam",),
)
def shapleycam(ctx: ForwardPass, *, rest: bool = True, relu: bool = True) -> MethodOutput:
    if ctx.targets.obj is not None or ctx.targets.fn is not None or ctx.logits is None:
        raise MethodError("shapleycam explains class logits: give class indices as targets (or 'topK'), not a callable")
    logits, A = ctx.logits, ctx.layer_features
    if not (logits.requires_grad and A.requires_grad):
        raise MethodError("shapleycam needs the layer gradients of this pass; the score does not depend on the layer")
    classes = ctx.targets.classes.to(logits.device)
    w = torch.empty(A.shape[0], ctx.k, A.shape[1], dtype=A.dtype, device=A.device)
    with torch.enable_grad():
        s = rest_scores(logits, classes) if rest else logits.gather(1, classes)
        for k in range(ctx.k):
            (G,) = torch.autograd.grad(s[:, k].sum(), A, create_graph=True, retain_graph=True)
            if G.requires_grad:
                (hvp,) = torch.autograd.grad(G, A, grad_outputs=A.detach(), retain_graph=True, allow_unused=True)
            else:  # the gradient does not depend on A (a linear head): H = 0
                hvp = None
            hvp = torch.zeros_like(A) if hvp is None else hvp
            w[:, k] = (G.detach() - 0.5 * hvp).mean(dim=(2, 3))
    raw = torch.einsum("nkc,nchw->nkhw", w, A.detach())
    return MethodOutput(raw.relu() if relu else raw, extras={} if relu else {"signed": True})
