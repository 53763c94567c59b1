r"""The pointing game and its energy-based form.

* ``pointing_game`` — Zhang, Lin, Brandt, Shen & Sclaroff, "Top-down Neural Attention by
  Excitation Backprop", ECCV 2016, with TorchRay's protocol (the same definition as
  :mod:`camlens.metrics.loceval`, :func:`camlens.base.localization.pointing_game_hit`): a *hit* when
  :math:`\min_{q \in \mathrm{GT}} \lVert p^\ast - q \rVert_2 < \mathrm{tolerance}` (strictly;
  15 px in the paper) between integer pixels, :math:`p^\ast` the arg-max pixel; ``tolerance=0``:
  the maximum must lie on the object. Tied maxima: a hit when any of them hits (as Quantus); a
  constant map points nowhere (a miss). Accuracy = hits / (hits + misses) = the mean of the
  per-image values (1.0 hit, 0.0 miss). The paper's *centre baseline* always points at the image
  centre: ``maps="centre"`` or :func:`centre_baseline`.
* ``energy_pointing_game`` — Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
  Convolutional Neural Networks", CVPR workshops 2020: the share of the map's energy inside the
  ground truth, :math:`\sum_{p \in \mathrm{GT}} E(p) / \sum_p E(p)` with :math:`E = \max(m, 0)`.
  A map with no positive energy (all zeros) counts as uniform: its value is the area fraction
  of the ground truth (the value of a constant map), never NaN.

Ground truth ``gt``: ``(N, H, W)`` masks (non-zero = object), ``(N, 4)`` boxes, or a list with
one entry per image, each a box ``(4,)``, several boxes ``(M, 4)`` (their union) or a mask.
Boxes are ``(x0, y0, x1, y1)`` in input pixels with exclusive ``x1, y1`` (like
:func:`camlens.localize`); they are clipped to the image.

**Volumes and clips** ``(N, C, D, H, W)`` with maps ``(N, D, H, W)``: the same two games in voxels
(the one :func:`camlens.base.localization.pointing_game_hit`; ``tolerance`` in voxels, the distance
Euclidean over ``(z, y, x)``), with ground truth ``(N, D, H, W)`` masks, ``(N, 6)`` boxes
``(x0, y0, z0, x1, y1, z1)`` or a per-volume list of ``(M, 6)`` boxes or ``(D, H, W)`` masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.api.explainer import ExplainRequest
from camlens.base.errors import InputError
from camlens.base.localization import box_mask, pointing_game_hit
from camlens.metrics._common import MapsLike, baseline_maps, prepare


def _boxes_to_mask(boxes: np.ndarray, size: tuple[int, ...]) -> torch.Tensor:
    width = 2 * len(size)
    for b in np.atleast_2d(boxes):
        if len(b) != width:
            what = "(x0, y0, x1, y1)" if width == 4 else "(x0, y0, z0, x1, y1, z1)"
            raise InputError(f"a box must be {what}; got {list(b)}")
        lo, hi = (float(v) for v in b[: width // 2]), (float(v) for v in b[width // 2 :])
        if not np.isfinite(b.astype(np.float64)).all() or any(h < lo_ for lo_, h in zip(lo, hi, strict=True)):
            raise InputError(f"invalid box {list(b)}: need each start <= its end (exclusive ends)")
    return torch.from_numpy(box_mask(np.atleast_2d(boxes), size))


def gt_masks(gt: Any, n: int, size: tuple[int, ...]) -> torch.Tensor:
    """Ground truth (masks, boxes or a per-image list of them) -> ``(N, H, W)`` bool on the CPU;
    with a ``(D, H, W)`` size, ``(N, D, H, W)`` from 3-D masks or ``(x0, y0, z0, x1, y1, z1)`` boxes."""
    if gt is None:
        raise InputError(
            "the pointing game needs ground truth: pass gt= boxes (N, 4) or masks (N, H, W) "
            "(volumes: boxes (N, 6) or masks (N, D, H, W))"
        )
    size = tuple(int(v) for v in size)
    nd, width = len(size), 2 * len(size)
    if isinstance(gt, torch.Tensor):
        gt = gt.detach().cpu().numpy()
    if isinstance(gt, np.ndarray) and gt.dtype != object:
        if gt.ndim == nd + 1 and gt.shape[1:] == size:
            if gt.shape[0] != n:
                raise InputError(f"{gt.shape[0]} ground-truth masks for {n} images")
            return torch.from_numpy(gt != 0)
        if gt.ndim == nd and gt.shape == size and n == 1:
            return torch.from_numpy(gt != 0)[None]
        if gt.ndim == 2 and gt.shape[1] == width:
            if gt.shape[0] != n:
                raise InputError(
                    f"{gt.shape[0]} ground-truth boxes for {n} images: give one per image, "
                    "or a list with several boxes per image"
                )
            return torch.stack([_boxes_to_mask(b, size) for b in gt])
        raise InputError(
            f"ground truth of shape {gt.shape} fits neither (N, {width}) boxes nor (N, {', '.join(map(str, size))}) "
            "masks at the input resolution"
        )
    items = list(gt)
    if len(items) != n:
        raise InputError(f"{len(items)} ground-truth entries for {n} images")
    out = []
    for k, g in enumerate(items):
        a = g.detach().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        if a.ndim == nd and a.shape == size:
            out.append(torch.from_numpy(a != 0))
        elif a.size and a.shape[-1] == width and a.ndim <= 2:
            out.append(_boxes_to_mask(a.astype(np.float64), size))
        else:
            raise InputError(f"ground truth of image {k} has shape {a.shape}: give boxes (M, {width}) or a {size} mask")
    return torch.stack(out)


def _check_nonempty(masks: torch.Tensor) -> None:
    empty = (~masks.flatten(1).any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(
            f"image(s) {empty} have an empty ground truth (no object pixel inside the image); "
            "drop them from the pointing game"
        )


def _hits(maps: torch.Tensor, masks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``(N,)`` 1.0 / 0.0: :func:`camlens.base.localization.pointing_game_hit` of each map and mask."""
    m = maps.detach().double().cpu().numpy()
    g = masks.numpy()
    return torch.tensor([float(pointing_game_hit(m[i], g[i], tolerance)) for i in range(len(m))])


def pointing_game(
    model: nn.Module | None,
    inputs: Any,
    maps: MapsLike,
    targets: Any = None,
    *,
    gt: Any = None,
    tolerance: float = 15,
    seed: int = 0,
    batch_size: int = 32,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
) -> torch.Tensor:
    """Pointing game hits per image, ``(N,)`` of 1.0 (hit) / 0.0 (miss); the mean is the accuracy.

    ``gt``: ground truth at input resolution (see the module docstring); ``tolerance`` in pixels,
    a hit strictly below it (0: the maximum must fall inside the object); tied maxima: a hit when
    any of them hits. ``model`` may be ``None`` when ``maps`` is a tensor and ``inputs`` the
    preprocessed batch (only its size is used); ``seed`` only reaches methods that draw at random.
    """
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0 pixels, not {tolerance}")
    prep = prepare(
        model,
        inputs,
        maps,
        targets,
        preprocess=preprocess,
        batch_size=batch_size,
        seed=seed,
        explain_options=explain_options,
        need_classes=False,
    )
    masks = gt_masks(gt, prep.n, prep.size)
    _check_nonempty(masks)
    return _hits(prep.maps, masks, tolerance)


def centre_baseline(
    gt: Any, size: tuple[int, ...], n: int | None = None, *, tolerance: float = 15, seed: int = 0
) -> torch.Tensor:
    """Hits ``(N,)`` of the centre baseline (always point at the image centre) for ``gt``; a
    ``(D, H, W)`` size: the volume's centre voxel(s)."""
    if n is None:
        n = len(gt)
    m = baseline_maps("centre", n, size, torch.device("cpu"))
    return pointing_game(None, torch.zeros(n, 1, *size), m, gt=gt, tolerance=tolerance, seed=seed)


def energy_pointing_game(
    model: nn.Module | None,
    inputs: Any,
    maps: MapsLike,
    targets: Any = None,
    *,
    gt: Any = None,
    seed: int = 0,
    batch_size: int = 32,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
) -> torch.Tensor:
    """Share of the map's positive energy inside the ground truth, ``(N,)`` in [0, 1] (higher is
    better). Arguments as :func:`pointing_game`."""
    prep = prepare(
        model,
        inputs,
        maps,
        targets,
        preprocess=preprocess,
        batch_size=batch_size,
        seed=seed,
        explain_options=explain_options,
        need_classes=False,
    )
    masks = gt_masks(gt, prep.n, prep.size)
    _check_nonempty(masks)
    return energy_share(prep.maps, masks)


def energy_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(N,)`` share of each map's positive energy inside its mask (any number of spatial axes);
    a map without positive energy gets the mask's area fraction."""
    e = maps.double().clamp_min(0).flatten(1).cpu()
    inside = masks.flatten(1).double()
    total = e.sum(dim=1)
    share = (e * inside).sum(dim=1) / total.clamp_min(1e-300)
    area = inside.mean(dim=1)
    return torch.where(total > 0, share, area).float()
