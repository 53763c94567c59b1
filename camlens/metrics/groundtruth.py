r"""Maps against a *known* importance mask (synthetic data where the pixels that decide the class
are known, e.g. :func:`camlens.data.tetromino`; Clark, Wilming & Haufe, "XAI-TRIS: Non-linear image
benchmarks to quantify false positive post-hoc attribution of feature importance", Machine
Learning 2024).

* :func:`top_k_precision` — the share of the map's :math:`k` highest-ranked pixels (by absolute
  value, ties broken at random from ``seed`` as in :mod:`camlens.metrics._common`) that lie in the
  true mask, :math:`k = |\mathrm{GT}|` by default (XAI-TRIS' precision); higher is better, a random
  map scores the mask's area fraction.
* :func:`earth_movers_distance` — the optimal-transport cost of moving the map's absolute mass
  (normalized to 1) onto the mask's (uniform over its pixels, normalized to 1), with the Euclidean
  distance between pixel centres as ground cost, divided by the image diagonal so that it lies in
  [0, 1] (XAI-TRIS reports :math:`1 - ` this); lower is better. The exact transport problem is
  solved as a linear program (SciPy's HiGHS) on the map and the mask sum-pooled to cells of
  ``cell x cell`` pixels (default: the side / 16, so at most a 16 x 16 grid; 4 for a 64 x 64
  image; ``cell=1`` is exact at full resolution but slow); distances are between cell centres, in pixels.
* :func:`mask_iou` — the IoU of the map thresholded like :func:`camlens.localize`
  (:math:`m > \tau \max m`, :math:`\tau = 0.3`) with the true mask.

An all-zero map carries no mass: it counts as uniform (EMD) and as a random pixel order (top-k).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scipy.optimize import linprog

from camlens.base.errors import InputError
from camlens.base.localization import DEFAULT_THRESHOLD
from camlens.metrics._common import pixel_order


def _pair(maps, masks) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(maps).detach().double().cpu()
    g = torch.as_tensor(masks).detach().cpu() != 0
    if m.dim() == 2:
        m, g = m[None], g[None] if g.dim() == 2 else g
    if m.dim() != 3 or g.shape != m.shape:
        raise InputError(
            f"maps {tuple(m.shape)} and masks {tuple(g.shape)} must both be (N, H, W) at the same size; "
            "resize the maps to the mask (camlens.viz.resize_map) first"
        )
    if not torch.isfinite(m).all():
        raise InputError("maps contain NaN or infinite values; clean them first (torch.nan_to_num)")
    empty = (~g.flatten(1).any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"image(s) {empty} have an empty true mask; drop them")
    return m, g


def top_k_precision(maps, masks, k: int | None = None, *, seed: int = 0) -> torch.Tensor:
    """Share of the top-``k`` pixels of ``|map|`` inside the true mask, ``(N,)`` (``k``: the mask's size)."""
    m, g = _pair(maps, masks)
    order = pixel_order(m.abs(), seed)
    flat = g.flatten(1)
    out = torch.empty(m.shape[0])
    for i in range(m.shape[0]):
        kk = int(flat[i].sum()) if k is None else int(k)
        if kk < 1:
            raise InputError(f"k must be >= 1, not {k}")
        out[i] = flat[i][order[i, :kk]].double().mean()
    return out


def _pool(a: torch.Tensor, cell: int) -> torch.Tensor:
    return F.avg_pool2d(a[None, None], cell, ceil_mode=True)[0, 0] * cell * cell if cell > 1 else a


def _emd_one(a: np.ndarray, b: np.ndarray, cell: int) -> float:
    """Exact EMD between two (h, w) mass grids (each summing to 1), cost in pixels."""
    ia, ib = np.flatnonzero(a > 0), np.flatnonzero(b > 0)
    w = a.shape[1]
    ya, xa = np.divmod(ia, w)
    yb, xb = np.divmod(ib, w)
    cost = np.hypot(ya[:, None] - yb[None], xa[:, None] - xb[None]) * cell
    na, nb = len(ia), len(ib)
    rows = sparse.kron(sparse.eye(na), np.ones((1, nb)))
    cols = sparse.kron(np.ones((1, na)), sparse.eye(nb))
    eq = sparse.vstack([rows, cols]).tocsr()
    rhs = np.concatenate([a.flat[ia], b.flat[ib]])
    res = linprog(cost.ravel(), A_eq=eq, b_eq=rhs, bounds=(0, None), method="highs")
    if res.status != 0:  # pragma: no cover - a balanced transport problem is always feasible
        raise InputError(f"earth mover's distance: the transport problem failed ({res.message})")
    return float(res.fun)


def earth_movers_distance(maps, masks, *, cell: int | None = None) -> torch.Tensor:
    """EMD between ``|map|`` and the true mask over the image diagonal, ``(N,)`` in [0, 1]; lower is better."""
    m, g = _pair(maps, masks)
    h, w = m.shape[-2:]
    cell = max(1, -(-max(h, w) // 16)) if cell is None else cell
    if not (isinstance(cell, int) and cell >= 1):
        raise InputError(f"cell must be a positive integer, not {cell!r}")
    diag = float(np.hypot(h - 1, w - 1)) or 1.0
    out = torch.empty(m.shape[0])
    for i in range(m.shape[0]):
        a = _pool(m[i].abs(), cell)
        if float(a.sum()) <= 0:
            a = torch.ones_like(a)
        b = _pool(g[i].double(), cell)
        out[i] = _emd_one((a / a.sum()).numpy(), (b / b.sum()).numpy(), cell) / diag
    return out


def mask_iou(maps, masks, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """IoU of ``map > threshold * max(map)`` with the true mask, ``(N,)`` in [0, 1]; higher is better."""
    m, g = _pair(maps, masks)
    peak = m.flatten(1).amax(dim=1).view(-1, 1, 1)
    pred = (m > threshold * peak) & (peak > 0)
    inter = (pred & g).flatten(1).sum(dim=1).double()
    union = (pred | g).flatten(1).sum(dim=1).double()
    return (inter / union).float()
