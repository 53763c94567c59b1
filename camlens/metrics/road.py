r"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient
Evaluation Strategy for Attribution Methods", ICML 2022).

Removing pixels by setting them to a constant leaks the shape of the removed region to the
model (the mask itself becomes evidence). ROAD instead *imputes* the removed pixels with the
**noisy linear imputation**: every removed pixel :math:`i` is the weighted average of its eight
neighbours :math:`N(i)` inside the image (direct neighbours weight :math:`1/6`, diagonal
neighbours :math:`1/12`), removed neighbours being unknowns too:

.. math:: \sum_{j \in N(i)} w_{ij}\,(v_i - v_j) = 0 \quad \text{for every removed } i,

a sparse symmetric, strictly diagonally dominant linear system (one right-hand side per channel)
solved with SciPy's sparse LU (SuperLU, symmetric mode); Gaussian noise of standard deviation
``noise`` (in the model's input space) is then added to the imputed pixels. A tiny ridge
:math:`\varepsilon (v_i - \mu)` (:math:`\varepsilon = 10^{-8}`, :math:`\mu` the mean of the kept
pixels, 0 if none) keeps the system solvable when a removed region touches no kept pixel (e.g.
100 % removal) and is otherwise negligible.

For each percentage :math:`p`, **MoRF** (most relevant first) removes the :math:`p` most relevant
pixels and **LeRF** (least relevant first) the :math:`p` least relevant, ranked by the map (ties
broken at random, see :mod:`camlens.metrics._common`). The score is the softmax probability of
the target class on the imputed image. A faithful map gives a *low* MoRF curve (removing what it
points at hurts) and a *high* LeRF curve (removing what it ignores does not). :func:`road`
averages a curve over the percentages; ``order="combined"`` gives :math:`(\mathrm{LeRF} -
\mathrm{MoRF})/2`, higher is better.

**Volumes and clips** ``(N, C, D, H, W)`` (maps ``(N, D, H, W)``): the same system over voxels. The
2-D weights are :math:`1 / (6 \lVert d \rVert^2)` for a neighbour at offset :math:`d`; camlens keeps
that rule in 3-D (ROAD defines no volume version): with ``neighbourhood=26`` (default) a removed voxel
is tied to its 6 face neighbours (weight :math:`1/6`), 12 edge neighbours (:math:`1/12`) and 8
corner neighbours (:math:`1/18`); with ``neighbourhood=6`` to its 6 face neighbours only
(:math:`1/6` each). A single removed voxel with every neighbour kept is thus their weighted mean
(the plain mean with 6). On a volume of depth 1 the 26-neighbourhood system is the 2-D one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import nn

from camlens.api.explainer import ExplainRequest
from camlens.base.errors import InputError
from camlens.metrics._common import MapsLike, pixel_rank, prepare, removed_counts, scored_batches

#: (dy, dx, weight) of the eight neighbours: direct 1/6, diagonal 1/12 (they sum to 1)
NEIGHBOURS = (
    (-1, 0, 1 / 6),
    (1, 0, 1 / 6),
    (0, -1, 1 / 6),
    (0, 1, 1 / 6),
    (-1, -1, 1 / 12),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (1, 1, 1 / 12),
)


def _offsets_3d(neighbourhood: int) -> tuple[tuple[int, int, int, float], ...]:
    """``(dz, dy, dx, weight)`` of a voxel's neighbours: the in-plane ones first, in the order and with
    the weights of :data:`NEIGHBOURS`, then the slices above and below; weight ``1 / (6 |d|^2)``."""
    if neighbourhood == 6:
        return (*tuple((0, dy, dx, w) for dy, dx, w in NEIGHBOURS[:4]), (-1, 0, 0, 1 / 6), (1, 0, 0, 1 / 6))
    ring = [(0, 0)] + [(dy, dx) for dy, dx, _ in NEIGHBOURS]
    out = [(0, dy, dx, w) for dy, dx, w in NEIGHBOURS]
    out += [(dz, dy, dx, 1 / (6 * (1 + dy * dy + dx * dx))) for dz in (-1, 1) for dy, dx in ring]
    return tuple(out)


#: ``(dz, dy, dx, weight)`` of the 26 neighbours of a voxel (faces 1/6, edges 1/12, corners 1/18)
NEIGHBOURS_26 = _offsets_3d(26)
#: the 6 face neighbours of a voxel, 1/6 each
NEIGHBOURS_6 = _offsets_3d(6)
RIDGE = 1e-8
DEFAULT_PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _impute_one(img: np.ndarray, removed: np.ndarray, offsets=None) -> np.ndarray:
    """Linear imputation of one ``(C, H, W)`` float64 image; ``removed`` ``(H, W)`` bool. A volume
    ``(C, D, H, W)`` with ``removed`` ``(D, H, W)`` and ``offsets`` ``(dz, dy, dx, weight)`` rows."""
    offsets = tuple((dy, dx, w) for dy, dx, w in NEIGHBOURS) if offsets is None else offsets
    c, shape = img.shape[0], removed.shape
    miss = removed.reshape(-1)
    n = int(miss.sum())
    out = img.reshape(c, -1).copy()
    if n == 0:
        return out.reshape(img.shape)
    unknown = np.nonzero(miss)[0]
    index = np.full(miss.size, -1, dtype=np.int64)
    index[unknown] = np.arange(n)
    coords = np.unravel_index(unknown, shape)
    known = ~miss
    mu = out[:, known].mean(axis=1) if known.any() else np.zeros(c)
    diag = np.full(n, RIDGE)
    rhs = np.tile(RIDGE * mu, (n, 1))  # (n, C)
    rows, cols, vals = [], [], []
    for *step, wt in offsets:
        moved = [p + d for p, d in zip(coords, step, strict=True)]
        ok = np.logical_and.reduce([(q >= 0) & (q < size) for q, size in zip(moved, shape, strict=True)])
        i = np.nonzero(ok)[0]
        j = np.ravel_multi_index(tuple(q[ok] for q in moved), shape)
        diag[i] += wt
        unk = miss[j]
        rows.append(i[unk])
        cols.append(index[j[unk]])
        vals.append(np.full(int(unk.sum()), -wt))
        kn = ~unk
        np.add.at(rhs, i[kn], wt * out[:, j[kn]].T)
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    a = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    # symmetric and strictly diagonally dominant: no pivoting needed, so SuperLU may keep the
    # symmetric minimum-degree ordering of A + A^T (1.4x faster than its default column ordering)
    lu = spla.splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    sol = lu.solve(np.ascontiguousarray(rhs))
    out[:, unknown] = sol.T
    return out.reshape(img.shape)


def _neighbourhood(spatial_dims: int, neighbourhood: int | None):
    """The offsets for images (8 neighbours) or volumes (26 by default, or 6)."""
    if spatial_dims == 2:
        if neighbourhood not in (None, 8):
            raise InputError(
                f"images are imputed from their 8 neighbours; neighbourhood={neighbourhood} is for volumes"
            )
        return None
    if neighbourhood not in (None, 6, 26):
        raise InputError(f"a voxel is imputed from its 26 (default) or 6 neighbours, not {neighbourhood!r}")
    return NEIGHBOURS_6 if neighbourhood == 6 else NEIGHBOURS_26


def noisy_linear_imputation(
    x: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise: float = 0.01,
    seed: int | torch.Generator = 0,
    neighbourhood: int | None = None,
) -> torch.Tensor:
    """Impute the ``removed`` pixels of ``x`` (see the module docstring).

    Args:
        x: ``(N, C, H, W)`` (or ``(C, H, W)``) images in the model's input space; volumes or clips
            ``(N, C, D, H, W)``.
        removed: ``(N, H, W)`` (or ``(H, W)``) bool, True where a pixel is removed (all channels);
            ``(N, D, H, W)`` for volumes.
        noise: standard deviation of the Gaussian noise added to the imputed pixels (0: none).
        seed: seed or CPU generator of that noise.
        neighbourhood: volumes only: impute a voxel from its 26 neighbours (default) or its 6 face
            neighbours (see the module docstring); images always use their 8.

    Returns:
        A new tensor like ``x``: kept pixels unchanged, removed ones imputed.
    """
    single = x.dim() == 3
    xb = x[None] if single else x
    rb = removed[None] if removed.dim() == xb.dim() - 2 else removed
    nd = xb.dim() - 2
    if xb.dim() not in (4, 5) or rb.shape != (xb.shape[0], *xb.shape[2:]):
        raise InputError(f"removed mask {tuple(removed.shape)} does not match images {tuple(x.shape)}")
    offsets = _neighbourhood(nd, neighbourhood)
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    imgs = xb.detach().double().cpu().numpy()
    masks = rb.detach().bool().cpu().numpy()
    out = np.stack([_impute_one(im, m, offsets) for im, m in zip(imgs, masks, strict=True)])
    res = torch.from_numpy(out)
    if noise:
        eps = torch.randn(res.shape, generator=g, dtype=torch.float64) * float(noise)
        res = res + eps * torch.from_numpy(masks)[:, None]
    res = res.to(device=x.device, dtype=x.dtype)
    return res[0] if single else res


@dataclass
class RoadResult:
    """ROAD curves of ``N`` images.

    Attributes:
        percentages: ``(P,)`` fractions of pixels removed.
        morf: ``(N, P)`` target probability after removing the most relevant pixels.
        lerf: ``(N, P)`` after removing the least relevant pixels.
        classes: ``(N,)`` target classes.
    """

    percentages: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor
    classes: torch.Tensor

    def score(self, order: str = "morf") -> torch.Tensor:
        """Per-image mean over the percentages of ``"morf"`` (lower is better), ``"lerf"`` (higher is
        better) or ``"combined"`` = (LeRF - MoRF) / 2 (higher is better), ``(N,)``."""
        key = order.strip().lower()
        if key == "morf":
            return self.morf.mean(dim=1)
        if key == "lerf":
            return self.lerf.mean(dim=1)
        if key == "combined":
            return ((self.lerf - self.morf) / 2).mean(dim=1)
        raise InputError(f"unknown ROAD order {order!r}; use 'morf', 'lerf' or 'combined'")

    def plot(self, ax=None, label: str | None = None):
        """MoRF (solid) and LeRF (dashed) mean curves on ``ax``; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4))
        p = self.percentages.numpy() * 100
        (line,) = ax.plot(p, self.morf.mean(0).numpy(), "-o", ms=3, label=f"{label or ''} MoRF".strip())
        ax.plot(p, self.lerf.mean(0).numpy(), "--o", ms=3, color=line.get_color(), label=f"{label or ''} LeRF".strip())
        ax.set_xlabel("% of pixels removed (noisy linear imputation)")
        ax.set_ylabel("probability of the target class")
        ax.set_ylim(0, 1.02)
        ax.set_title("ROAD")
        ax.legend(fontsize=8)
        return ax


def _check_percentages(percentages) -> torch.Tensor:
    p = torch.as_tensor(list(percentages), dtype=torch.float64)
    if p.dim() != 1 or p.numel() == 0 or not torch.all((p >= 0) & (p <= 1)):
        raise InputError(f"percentages must be fractions in [0, 1], e.g. (0.1, 0.2, ..., 0.9); got {percentages}")
    return p


def road_curves(
    model: nn.Module,
    inputs: Any,
    maps: MapsLike,
    targets: Any = None,
    *,
    percentages=DEFAULT_PERCENTAGES,
    orders: tuple[str, ...] = ("morf", "lerf"),
    noise: float = 0.01,
    batch_size: int | None = None,
    seed: int = 0,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
    neighbourhood: int | None = None,
) -> RoadResult:
    """MoRF and LeRF curves with noisy linear imputation, ``percentages`` as fractions in [0, 1].

    ``orders`` may restrict the work to ``("morf",)`` or ``("lerf",)`` (the other curve then has
    shape ``(N, 0)``). ``neighbourhood``: for volumes, 26 (default) or 6 neighbours per voxel.
    Other arguments as :func:`camlens.metrics.deletion_curve`.
    """
    if model is None:
        raise InputError("ROAD needs the model to score the imputed images")
    pct = _check_percentages(percentages)
    orders = tuple(o.strip().lower() for o in orders)
    if not orders or set(orders) - {"morf", "lerf"}:
        raise InputError(f"orders must be a subset of ('morf', 'lerf'), not {orders}")
    prep = prepare(
        model,
        inputs,
        maps,
        targets,
        preprocess=preprocess,
        batch_size=batch_size,
        seed=seed,
        explain_options=explain_options,
    )
    x, classes = prep.x, prep.classes
    n, size = x.shape[0], prep.size  # (H, W), or (D, H, W) for volumes and clips
    total = prep.maps[0].numel()
    counts = removed_counts(total, pct)
    rank = pixel_rank(prep.maps, seed).view(n, *size).cpu()
    offsets = _neighbourhood(len(size), neighbourhood)  # checked before any forward
    items = [(i, (o, j)) for i in range(n) for o in orders for j in range(len(pct))]

    def make(chunk):
        out = []
        for i, (o, j) in chunk:
            k = int(counts[j])
            removed = rank[i] < k if o == "morf" else rank[i] >= total - k
            # the noise depends on (seed, order, percentage), not on the image's place in the batch
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + (o == "lerf") * 104_729 + j)
            if offsets is None:
                out.append(noisy_linear_imputation(x[i], removed, noise=noise, seed=g))
            else:  # a volume: batch of one (a (C, D, H, W) tensor alone would read as four images)
                vol = x[i : i + 1]
                out.append(
                    noisy_linear_imputation(vol, removed[None], noise=noise, seed=g, neighbourhood=neighbourhood)[0]
                )
        return torch.stack(out)

    probs = scored_batches(model, items, make, classes, batch_size)
    probs = probs.view(n, len(orders), len(pct))
    empty = torch.zeros(n, 0)
    morf = probs[:, orders.index("morf")] if "morf" in orders else empty
    lerf = probs[:, orders.index("lerf")] if "lerf" in orders else empty
    return RoadResult(pct.float(), morf, lerf, classes)


def road(
    model: nn.Module, inputs: Any, maps: MapsLike, targets: Any = None, *, order: str = "morf", **options: Any
) -> torch.Tensor:
    """ROAD score per image, ``(N,)``: the mean target probability over the percentages for
    ``order="morf"`` (lower is better) or ``"lerf"`` (higher is better), or ``"combined"``
    (LeRF - MoRF) / 2 (higher is better). Options: :func:`road_curves`."""
    key = order.strip().lower()
    orders = ("morf", "lerf") if key == "combined" else (key,)
    if key not in ("morf", "lerf", "combined"):
        raise InputError(f"unknown ROAD order {order!r}; use 'morf', 'lerf' or 'combined'")
    return road_curves(model, inputs, maps, targets, orders=orders, **options).score(key)
