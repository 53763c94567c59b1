r"""Black-box methods: maps from the scores of perturbed copies of the input, no gradients at all.
They work on any model whose output a target can score (classifiers, detectors, segmenters,
embedding models), including models whose gradients are unusable.

* ``rise`` — Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
  Black-box Models", BMVC 2018. ``n_masks`` binary grids of ``cell x cell`` cells, each cell on
  with probability ``p``, upsampled bilinearly to ``(cell + 1)`` cells of size
  :math:`\lceil H/\mathrm{cell}\rceil` and cropped at a random shift to ``(H, W)``: soft masks
  :math:`M_i`. With :math:`f_k` the target score of the masked image
  :math:`x \odot M_i + b\,(1 - M_i)` (baseline :math:`b`),

  .. math:: S_k = \frac{1}{N\,p} \sum_{i=1}^{N} f_k(x \odot M_i)\, M_i

  (a Monte-Carlo estimate of :math:`E[f_k \mid \text{pixel kept}]`). Classification targets use
  the softmax probability (``weighting="prob"``, the paper) or the logit; target objects and
  callables their own score. ``center=True`` uses :math:`f_k - \bar f_k` (the mean over the
  masks) in place of :math:`f_k`: the same map less the constant :math:`\bar f_k\,\bar M/p`
  (the paper's estimator carries the mean score everywhere), which leaves only what the masks'
  covariance with the score explains — the form whose energy measures localization.
* ``drise`` — Petsiuk et al., "Black-box Explanation of Object Detectors via Saliency Maps",
  CVPR 2021. The same masks; the weight of mask :math:`i` for target box :math:`d_t` is the best
  similarity between :math:`d_t` and the masked image's detections :math:`d_j`:
  :math:`w_i = \max_j \mathrm{IoU}(L_t, L_j)\cdot \cos(P_t, P_j)\cdot O_j`. With torchvision's
  output (a label and a score per box, no probability vector) :math:`\cos(P_t, P_j)` is
  :math:`[\ell_j = c_t]` and :math:`O_j` the box score; outputs with ``"probs"`` (and
  ``"objectness"``) use the full vectors (see :class:`camlens.targets.Detection`, whose score at
  ``iou=0`` is this similarity). :math:`S = \frac{1}{N p}\sum_i w_i M_i`. Paper defaults:
  ``n_masks=5000``, ``cell=16``.
* ``occlusion`` — Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
  ECCV 2014: a ``window x window`` patch set to the baseline slides with ``stride`` (the last
  position flush with the border); each pixel gets the mean score drop
  :math:`f_k(x) - f_k(x_{\text{occluded}})` over the windows that cover it.

All three run batched masked forwards under ``torch.inference_mode()``: ``batch_size`` perturbed
images per forward (across images; 8 on CPU, 64 on accelerators), masks generated per batch, so
memory is bounded by one batch plus the ``(N, K, H, W)`` sums. Masks come from a
``torch.Generator`` seeded with ``seed`` and do not depend on ``batch_size``: the same seed gives
the same map whatever the batching. A tqdm bar (rate, ETA) shows progress (``progress=None``:
only on a terminal).

Volumes and clips ``(N, C, D, H, W)``: RISE draws ``cell³`` grids upsampled trilinearly and
shifted along the three axes, occlusion slides ``window³`` cubes; the maps are ``(N, K, D, H, W)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from camlens.attribution.registry import DETECTORS, Cost, MethodOutput, register
from camlens.base.defaults import method_batch
from camlens.base.errors import MethodError
from camlens.core.extra import rows as image_rows
from camlens.targets import Detection, take_rows


def _batch_size(batch_size: int | None, x: torch.Tensor) -> int:
    if batch_size is None:
        return method_batch(x.device.type)
    if batch_size < 1:
        raise MethodError("batch_size must be >= 1")
    return int(batch_size)


def _at(row: int, where: tuple[slice, ...]) -> tuple[Any, ...]:
    """The index ``[row, :, *where]`` of an ``(N, C, *spatial)`` tensor."""
    return (row, slice(None), *where)


def rise_masks(
    n_masks: int, size: tuple[int, ...], *, cell: int = 7, p: float = 0.5, seed: int = 0, device=None
) -> Callable[[int, int], torch.Tensor]:
    """RISE's soft masks, lazily: returns ``get(start, stop) -> (stop - start, 1, H, W)``; for a
    volume's ``size = (D, H, W)``, 3-D masks ``(stop - start, 1, D, H, W)`` from ``cell³`` grids
    upsampled trilinearly and shifted along the three axes.

    The grids and shifts of all ``n_masks`` masks are drawn up front (``n_masks * cell**2`` bits);
    upsampling happens per requested slice, so mask ``i`` is the same whatever slices ask for it.
    """
    if n_masks < 1:
        raise MethodError("n_masks must be >= 1")
    if cell < 1:
        raise MethodError("cell must be >= 1")
    if not 0.0 < p <= 1.0:
        raise MethodError(f"p must be in (0, 1], not {p}")
    size = tuple(int(s) for s in size)
    g = torch.Generator().manual_seed(int(seed))
    grids = (torch.rand(n_masks, 1, *(cell,) * len(size), generator=g) < p).float()
    cells = [math.ceil(s / cell) for s in size]
    shifts = [torch.randint(0, c, (n_masks,), generator=g) for c in cells]  # (dz,) dy, dx
    mode = "bilinear" if len(size) == 2 else "trilinear"

    def get(start: int, stop: int) -> torch.Tensor:
        up = F.interpolate(
            grids[start:stop].to(device), size=tuple((cell + 1) * c for c in cells), mode=mode, align_corners=False
        )
        return torch.stack(
            [
                up[_at(i, tuple(slice(int(d[start + i]), int(d[start + i]) + s) for d, s in zip(shifts, size)))]
                for i in range(stop - start)
            ]
        )

    return get


def _class_scores(ctx, out, rows: list[int], weighting: str) -> torch.Tensor:
    """``(B, K)`` target scores of the outputs of perturbed copies of images ``rows``."""
    t = ctx.targets
    if t.obj is not None:
        return take_rows(t.obj, rows)(out)
    logits = ctx.select(out)  # classification targets see the selected logits (camlens.core.outputs)
    if t.fn is not None:
        return t.fn(logits)[:, None]
    cls = t.classes.to(logits.device)[rows]
    src = logits.softmax(dim=1) if weighting == "prob" else logits
    return src.gather(1, cls)


def _check_weighting(weighting: str) -> None:
    if weighting not in ("prob", "logit"):
        raise MethodError(f"weighting must be 'prob' or 'logit', not {weighting!r}")


def _bar(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm  # a dependency; imported here so that importing methods stays light

    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=None if progress is None else not progress)


def _masked_sum(
    ctx, *, n_masks, cell, p, seed, baseline, batch_size, progress, weighting, desc, center=False, target=None
):
    """``sum_i f(x_n * M_i) M_i / (N p)`` for every image ``n``, batched across images and masks
    (``center``: with ``f - mean(f)`` in place of ``f``)."""
    x = ctx.x.detach()
    if not isinstance(x, torch.Tensor):
        raise MethodError(f"{desc} needs a batch of images of one size")
    N, spatial = x.shape[0], tuple(x.shape[2:])  # (H, W), or (D, H, W) for volumes and clips
    ones = (1,) * len(spatial)
    bs = _batch_size(batch_size, x)
    get = rise_masks(n_masks, spatial, cell=cell, p=p, seed=seed, device=x.device)
    acc = torch.zeros(N, ctx.k, *spatial, device=x.device, dtype=torch.float32)
    fsum = torch.zeros(N, ctx.k, device=x.device)
    msum = torch.zeros(spatial, device=x.device)
    jobs = [(n, i) for i in range(n_masks) for n in range(N)]  # mask-major: one mask serves every image
    bar = _bar(len(jobs), desc, progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(jobs), bs):
                chunk = jobs[start : start + bs]
                i0, i1 = chunk[0][1], chunk[-1][1] + 1
                masks = get(i0, i1)  # (M, 1, H, W)
                rows = [n for n, _ in chunk]
                m = masks[[i - i0 for _, i in chunk]]
                imgs = x[rows] * m + baseline * (1 - m)
                with image_rows(rows):
                    out = ctx.model(imgs)
                s = (target(out, rows) if target is not None else _class_scores(ctx, out, rows, weighting)).float()
                idx = torch.tensor(rows, device=x.device)
                acc.index_add_(0, idx, s.view(*s.shape, *ones) * m)
                fsum.index_add_(0, idx, s)
                msum += masks.sum(dim=(0, 1))
                bar.update(len(chunk))
    finally:
        bar.close()
    if center:  # sum_i (f_i - mean f) M_i = sum_i f_i M_i - mean(f) sum_i M_i
        acc = acc - (fsum / n_masks).view(N, -1, *ones) * msum
    return acc / (n_masks * p)


def _n_images(ctx) -> int:
    return len(ctx.x)


def masks_cost(ctx, *, n_masks: int = 4000, **_) -> Cost:
    """RISE and D-RISE: one masked forward per mask and image."""
    return Cost(int(n_masks) * _n_images(ctx), "masked forwards")


def occlusion_cost(ctx, *, window: int = 16, stride: int = 8, **_) -> Cost:
    """One forward per window position and image, and one of each unoccluded image."""
    if window < 1 or stride < 1:
        raise MethodError("window and stride must be >= 1")
    n = len(_spots(tuple(ctx.x.shape[2:]), window, stride)[0])
    return Cost((n + 1) * _n_images(ctx), "occluded forwards")


@register(
    "rise",
    paper="Petsiuk et al., RISE, BMVC 2018",
    summary="score-weighted average of random masks (black-box, no gradients)",
    kind="pixel",
    needs=(),
    blackbox=True,
    title="RISE",
    cost=masks_cost,
    boxes=True,  # smooth maps: the box means something
    volumes=True,
)
def rise(
    ctx,
    *,
    n_masks: int = 4000,
    cell: int = 7,
    p: float = 0.5,
    seed: int = 0,
    baseline: float = 0.0,
    batch_size: int | None = None,
    weighting: str = "prob",
    center: bool = False,
    progress: bool | None = None,
) -> MethodOutput:
    _check_weighting(weighting)
    sal = _masked_sum(
        ctx,
        n_masks=n_masks,
        cell=cell,
        p=p,
        seed=seed,
        baseline=baseline,
        batch_size=batch_size,
        progress=progress,
        weighting=weighting,
        desc="rise",
        center=center,
    )
    return MethodOutput(sal, maps=sal, extras={"forwards": n_masks * sal.shape[0]})


@register(
    "drise",
    paper="Petsiuk et al., Black-box Explanation of Object Detectors (D-RISE), CVPR 2021",
    summary="random masks weighted by box x class x objectness similarity to the target detection",
    kind="pixel",
    needs=(),
    blackbox=True,
    title="D-RISE",
    aliases=("d-rise",),
    applies_to=DETECTORS,
    cost=masks_cost,
    boxes=True,
)
def drise(
    ctx,
    *,
    n_masks: int = 5000,
    cell: int = 16,
    p: float = 0.5,
    seed: int = 0,
    baseline: float = 0.0,
    batch_size: int | None = None,
    center: bool = False,
    progress: bool | None = None,
) -> MethodOutput:
    det = ctx.targets.obj
    if not isinstance(det, Detection):
        raise MethodError(
            "drise explains detections: pass targets=camlens.targets.Detection(...) (a zoo detector "
            "uses its own detections by default), or use 'rise' for other targets"
        )
    sim = det.with_iou(0.0)  # D-RISE's similarity: no IoU threshold

    def score(out, rows):
        return sim.take(rows)(out)

    sal = _masked_sum(
        ctx,
        n_masks=n_masks,
        cell=cell,
        p=p,
        seed=seed,
        baseline=baseline,
        batch_size=batch_size,
        progress=progress,
        weighting="logit",
        desc="drise",
        center=center,
        target=score,
    )
    return MethodOutput(sal, maps=sal, extras={"forwards": n_masks * sal.shape[0]})


def _positions(size: int, window: int, stride: int) -> list[int]:
    pos = list(range(0, max(size - window, 0) + 1, stride))
    if pos[-1] + window < size:
        pos.append(size - window)
    return pos


def _spots(spatial: tuple[int, ...], window: int, stride: int) -> tuple[list[tuple[slice, ...]], tuple[int, ...]]:
    """Every window position over ``spatial`` (``(H, W)``, or ``(D, H, W)``: cubes), in raster
    order, as index slices; and the window's size per axis (``window``, or the axis if shorter)."""
    sizes = tuple(min(window, s) for s in spatial)
    grid = itertools.product(*(_positions(s, w, stride) for s, w in zip(spatial, sizes)))
    return [tuple(slice(a, a + w) for a, w in zip(corner, sizes)) for corner in grid], sizes


@register(
    "occlusion",
    paper="Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014",
    summary="score drop when a sliding patch is replaced by a baseline (black-box)",
    kind="pixel",
    needs=(),
    blackbox=True,
    title="Occlusion",
    cost=occlusion_cost,
    boxes=True,
    volumes=True,
)
def occlusion(
    ctx,
    *,
    window: int = 16,
    stride: int = 8,
    baseline: float = 0.0,
    batch_size: int | None = None,
    weighting: str = "logit",
    progress: bool | None = None,
) -> MethodOutput:
    _check_weighting(weighting)
    x = ctx.x.detach()
    if not isinstance(x, torch.Tensor):
        raise MethodError("occlusion needs a batch of images of one size")
    if window < 1 or stride < 1:
        raise MethodError("window and stride must be >= 1")
    N, spatial = x.shape[0], tuple(x.shape[2:])  # (H, W), or (D, H, W): windows are then cubes
    spots, _ = _spots(spatial, window, stride)
    ones = (1,) * len(spatial)
    bs = _batch_size(batch_size, x)
    jobs = [(n, j) for n in range(N) for j in range(len(spots))]
    acc = torch.zeros(N, ctx.k, *spatial, device=x.device)
    cnt = torch.zeros(spatial, device=x.device)
    for where in spots:
        cnt[where] += 1
    bar = _bar(len(jobs) + N, "occlusion", progress)
    try:
        with torch.inference_mode():
            ref = _class_scores(ctx, ctx.model(x), list(range(N)), weighting).float()  # (N, K)
            bar.update(N)
            for start in range(0, len(jobs), bs):
                chunk = jobs[start : start + bs]
                imgs = x[[n for n, _ in chunk]].clone()
                for r, (_, j) in enumerate(chunk):
                    imgs[_at(r, spots[j])] = baseline
                rows = [n for n, _ in chunk]
                with image_rows(rows):
                    out = ctx.model(imgs)
                s = _class_scores(ctx, out, rows, weighting).float()
                for r, (n, j) in enumerate(chunk):
                    acc[_at(n, spots[j])] += (ref[n] - s[r]).view(-1, *ones)
                bar.update(len(chunk))
    finally:
        bar.close()
    sal = acc / cnt.clamp_min(1)
    return MethodOutput(sal, maps=sal, extras={"forwards": len(jobs) + N, "windows": len(spots)})
