r"""Recipro-CAM — Byun & Lee, "Recipro-CAM: Fast gradient-free visual explanations for
convolutional neural networks", arXiv 2209.14074, 2022.

For every spatial position :math:`p = (i, j)` of the captured features :math:`A` ``(C, h, w)``, the
features are masked to that position, :math:`A^{p} = A \odot m_p`, and scored by the layers above;
the map at :math:`p` is that score:

.. math:: M_c(i, j) = \mathrm{softmax}\big(f_{\uparrow}(A \odot m_{(i,j)})\big)_c

with :math:`m_p` the one-hot mask of :math:`p` (``gaussian=False``, the paper's Recipro-CAM) or the
3x3 Gaussian kernel :math:`\frac{1}{16}\begin{pmatrix}1&2&1\\2&4&2\\1&2&1\end{pmatrix}` centred at
:math:`p` and cut at the border (``gaussian=True``, the paper's smoothed variant).
``weighting="logit"`` uses the raw logit instead of the softmax probability; callable targets
and target objects use their own score. No gradient: :math:`hw` forwards of the layers above the
target per image (see :mod:`camlens.attribution._head`: the layers below are not re-run), batched, all
``K`` classes from the same forwards. The maps are non-negative with ``"prob"`` and are not passed
through a ReLU (``"logit"`` maps may be signed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from camlens.attribution._head import HeadRunner, default_batch
from camlens.attribution.registry import MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core.engine import ForwardPass

GAUSSIAN = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def spatial_masks(h: int, w: int, gaussian: bool, like: torch.Tensor) -> torch.Tensor:
    """``(h*w, h, w)``: mask ``p`` keeps position ``p`` (row-major), or its Gaussian neighbourhood."""
    eye = torch.eye(h * w, dtype=like.dtype, device=like.device).view(h * w, 1, h, w)
    if gaussian:
        eye = F.conv2d(eye, GAUSSIAN.to(like)[None, None], padding=1)
    return eye[:, 0]


@register(
    "reciprocam",
    paper="Byun & Lee, Recipro-CAM, arXiv 2209.14074, 2022",
    summary="score of the features masked to each spatial position, through the layers above (no gradient)",
    needs=("features",),
    title="Recipro-CAM",
    aliases=("recipro-cam",),
)
def reciprocam(
    ctx: ForwardPass,
    *,
    gaussian: bool = False,
    weighting: str = "prob",
    batch_size: int | None = None,
    skip_below: bool = True,
) -> MethodOutput:
    """``batch_size``: masked feature maps per forward (default 32 on CPU, 256 on accelerators)."""
    if weighting not in ("prob", "logit"):
        raise MethodError(f"weighting must be 'prob' or 'logit', not {weighting!r}")
    A = ctx.layer_features.detach()
    N, _, h, w = A.shape
    batch_size = default_batch(A.device) if batch_size is None else batch_size
    if batch_size < 1:
        raise MethodError(f"batch_size must be >= 1, not {batch_size}")
    runner = HeadRunner(ctx, skip=skip_below)
    masks = spatial_masks(h, w, gaussian, A)  # (hw, h, w)
    raw = torch.empty(N, ctx.k, h * w, dtype=A.dtype, device=A.device)
    prob = weighting == "prob" and ctx.targets.obj is None and ctx.targets.fn is None
    for n in range(N):
        for p0 in range(0, h * w, batch_size):
            m = masks[p0 : p0 + batch_size]
            images = [n] * len(m)
            out = runner.logits(A[n][None] * m[:, None], images)
            raw[n, :, p0 : p0 + len(m)] = runner.target_scores(out.softmax(1) if prob else out, images).T.to(A.dtype)
    extras: dict = {"forwards": N * h * w, "head": runner.mode}
    if weighting == "logit":
        extras["signed"] = True
    return MethodOutput(raw.view(N, ctx.k, h, w), extras=extras)
