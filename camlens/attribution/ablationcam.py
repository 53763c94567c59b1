r"""Ablation-CAM — Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional
Network via Gradient-free Localization", WACV 2020.

With :math:`y^c` the target score and :math:`y^c_k` the score when channel :math:`k` of the
captured features :math:`A` ``(C, h, w)`` is set to zero,

.. math:: w_k^c = \frac{y^c - y^c_k}{y^c},\qquad M_c = \mathrm{ReLU}\Big(\sum_k w_k^c A_k\Big)

(``normalize=False`` keeps the plain drop :math:`y^c - y^c_k`, which differs from the paper's
weights by the factor :math:`1/y^c` per image and class: the same map up to scale and, where
:math:`y^c < 0`, sign; a score of exactly 0 uses the plain drop, ``extras["unnormalized"]``).
For a GAP + linear head :math:`y^c = \sum_k W_{ck}\,\bar A_k + b_c`, zeroing channel :math:`k`
drops the score by :math:`W_{ck}\,\bar A_k` exactly.

No gradient. The ablated copies are scored by the layers *above* the target only, batched
``batch_size`` copies per forward across images and channels (:class:`camlens.attribution._head.HeadRunner`:
the layers below replay their recorded outputs; ``skip_below=False`` runs the whole network, as
pytorch-grad-cam does). A channel that is zero everywhere is not ablated (zeroing it changes
nothing: its weight is exactly 0). All ``K`` target classes come from the same forwards.

**pytorch-grad-cam's convention.** Its ``AblationLayer`` zeroes the channel only when the features'
minimum is 0 (post-ReLU features) and otherwise sets it to ``min(A) - 1e7``; at post-ReLU layers
(the usual ones, e.g. ResNet's ``layer4``) both agree. camlens always zeroes (the paper).
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from camlens.attribution._head import HeadRunner, default_batch
from camlens.attribution.registry import MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core.engine import ForwardPass

PROGRESS_MIN = 2048  # ablated copies above which the progress bar shows by default


@register(
    "ablationcam",
    paper="Desai & Ramaswamy, Ablation-CAM, WACV 2020",
    summary="channels weighted by the relative drop of the score when each is zeroed (no gradient)",
    needs=("features",),
    title="Ablation-CAM",
    aliases=("ablation-cam",),
)
def ablationcam(
    ctx: ForwardPass,
    *,
    batch_size: int | None = None,
    normalize: bool = True,
    relu: bool = True,
    skip_below: bool = True,
    progress: bool | None = None,
) -> MethodOutput:
    """``batch_size``: ablated copies per forward (default 32 on CPU, 256 on accelerators);
    ``skip_below``: run only the layers above the target (checked, see :mod:`camlens.attribution._head`);
    ``progress``: a tqdm bar on stderr (``None``: shown above 2048 ablated copies)."""
    A = ctx.layer_features.detach()
    N, C = A.shape[:2]
    batch_size = default_batch(A.device) if batch_size is None else batch_size
    if batch_size < 1:
        raise MethodError(f"batch_size must be >= 1, not {batch_size}")
    runner = HeadRunner(ctx, skip=skip_below)
    y = runner.base_scores()  # (N, K)
    live = A.flatten(2).ne(0).any(2)  # (N, C): channels worth ablating (zeroing a zero channel changes nothing)
    # chunks of one image each: its replayed lower layers are then views, not copies (see _head)
    jobs = [
        (n, c[i : i + batch_size])
        for n in range(N)
        for c in [live[n].nonzero().flatten()]
        for i in range(0, len(c), batch_size)
    ]
    total = int(live.sum())
    drop = torch.zeros(N, ctx.k, C, dtype=A.dtype, device=A.device)
    show = total > PROGRESS_MIN if progress is None else bool(progress)
    bar = tqdm(total=total, desc="ablationcam", unit="map", disable=not show, file=sys.stderr, leave=False)
    with bar:
        for n, c_idx in jobs:
            b = len(c_idx)
            feats = A[n].repeat(b, 1, 1, 1)
            feats[torch.arange(b, device=A.device), c_idx] = 0
            drop[n, :, c_idx] = (y[n] - runner.scores(feats, [n] * b)).T
            bar.update(b)
    extras: dict = {"forwards": total, "head": runner.mode}
    weights = drop
    if normalize:
        zero = y == 0
        weights = drop / torch.where(zero, torch.ones_like(y), y)[..., None]
        if bool(zero.any()):
            extras["unnormalized"] = zero.nonzero().tolist()
    raw = torch.einsum("nkc,nchw->nkhw", weights, A)
    if not relu:
        extras["signed"] = True
    return MethodOutput(raw.relu() if relu else raw, extras=extras)
