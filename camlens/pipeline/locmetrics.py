"""Localization metrics over a stream of images, reduced exactly across ``torchrun`` ranks.

The per-image quantities are those of :func:`camlens.metrics.loceval.evaluate_maps` (see that module for
the definitions and papers): IoU of the box at the threshold, the pointing-game hit, and for every
threshold τ of the sweep whether the largest component's box (MaxBoxAcc) / any component's box
(MaxBoxAccV2) reaches IoU δ ∈ {0.3, 0.5, 0.7}. Instead of keeping every map, an accumulator keeps

* integer counts: images, IoU ≥ 0.5, pointing hits, top-1 known / hits, and the ``(T, 3)`` BoxAcc
  hit counts of both versions — summed across ranks with an ``int64`` all-reduce;
* the IoU sum as an exact rational (:class:`fractions.Fraction`) — summed across ranks exactly.

Every dataset-wide metric is then ``count / n`` (or the exact mean rounded once), so the figures do
not depend on how the images were split between ranks or batches: two ranks give exactly the
single-process numbers. (They equal :func:`~camlens.metrics.loceval.evaluate_maps` for the counts; its
``mean_iou`` is a float ``np.mean``, which may differ from the exact mean in the last bit.)
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from camlens.base.localization import box_of_map, iou, scale_boxes
from camlens.metrics.loceval import (
    POINTING_TOLERANCE,
    SWEEP,
    V2_IOUS,
    LocalizationReport,
    _sweep_ious,
    centre_map,
    map_pointing_hit,
    sweep_components,
)
from camlens.pipeline.dist import DistContext


class _Counts:
    def __init__(self, n_thr: int):
        self.n = 0
        self.iou50 = 0
        self.hits = 0
        self.known = 0
        self.top1 = 0
        self.v1 = np.zeros((n_thr, len(V2_IOUS)), np.int64)
        self.v2 = np.zeros((n_thr, len(V2_IOUS)), np.int64)
        self.iou_sum = Fraction(0)

    def vector(self) -> np.ndarray:
        return np.concatenate(
            [[self.n, self.iou50, self.hits, self.known, self.top1], self.v1.ravel(), self.v2.ravel()]
        )

    def load(self, vec: np.ndarray) -> None:
        t = self.v1.size
        self.n, self.iou50, self.hits, self.known, self.top1 = (int(v) for v in vec[:5])
        self.v1 = vec[5 : 5 + t].reshape(self.v1.shape).copy()
        self.v2 = vec[5 + t :].reshape(self.v2.shape).copy()


class LocalizationAccumulator:
    """Add images one at a time (:meth:`add`), reduce across ranks (:meth:`reduce`), then
    :meth:`report` gives the same :class:`~camlens.metrics.loceval.LocalizationReport` fields as
    :func:`~camlens.metrics.loceval.evaluate_maps` (without per-image IoUs)."""

    def __init__(
        self,
        threshold: float,
        thresholds: np.ndarray | None = None,
        tolerance: float = POINTING_TOLERANCE,
        name: str = "method",
    ):
        self.threshold = float(threshold)
        self.thresholds = SWEEP if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self.tolerance = tolerance
        self.name = name
        self.mine = _Counts(len(self.thresholds))
        self.base = _Counts(len(self.thresholds))
        self._base_maps: dict = {}

    def _score(self, c: _Counts, m: np.ndarray, gt: np.ndarray, size, correct, sweep=None) -> None:
        deltas = np.array(V2_IOUS)
        msize = m.shape
        box = box_of_map(m, self.threshold)
        v = 0.0
        if box[0] >= 0 and len(gt):
            v = float(iou(scale_boxes(box, msize, size)[None], gt).max())
        hit = map_pointing_hit(m, gt, size, self.tolerance)
        b1, b2 = _sweep_ious(
            sweep if sweep is not None else sweep_components(m, self.thresholds), gt, len(self.thresholds), msize, size
        )
        c.n += 1
        c.iou_sum += Fraction(v)
        c.iou50 += int(v >= 0.5)
        c.hits += int(hit)
        c.v1 += b1[:, None] >= deltas[None]
        c.v2 += b2[:, None] >= deltas[None]
        if correct is not None and correct == correct:
            c.known += 1
            c.top1 += int(correct > 0 and v >= 0.5)

    def add(self, m: np.ndarray, gt: np.ndarray, size: tuple[int, int], correct: float | None = None) -> None:
        """One image: its map (the ground-truth class's), ground-truth boxes in the image frame,
        the image size ``(H, W)`` and whether the top-1 class is right (``None``/NaN: unknown)."""
        m = np.asarray(m, dtype=np.float64)
        g = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
        self._score(self.mine, m, g, size, correct)
        if m.shape not in self._base_maps:
            cm = centre_map(m.shape)
            self._base_maps[m.shape] = (cm, sweep_components(cm, self.thresholds))
        cm, sw = self._base_maps[m.shape]
        self._score(self.base, cm, g, size, correct, sweep=sw)

    def reduce(self, ctx: DistContext) -> None:
        """Sum every rank's counts (int64 all-reduce) and IoU sums (exact): afterwards every rank
        holds the dataset-wide state."""
        for c in (self.mine, self.base):
            c.load(ctx.sum_ints(c.vector()))
            c.iou_sum = ctx.sum_exact(c.iou_sum)

    @staticmethod
    def _metrics(c: _Counts) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        n = max(c.n, 1)
        acc1, acc2 = c.v1 / n, c.v2 / n
        d05 = V2_IOUS.index(0.5)
        out = {
            "gt_known_loc": c.iou50 / n,
            "mean_iou": float(c.iou_sum / n),
            "pointing_game": c.hits / n,
            "maxboxacc": float(acc1[:, d05].max()),
            "maxboxacc_v2": float(acc2.max(0).mean()),
            "top1_loc": c.top1 / c.known if c.known else float("nan"),
        }
        return out, acc1, acc2

    def report(self) -> LocalizationReport:
        mine, acc1, acc2 = self._metrics(self.mine)
        base, _, bacc2 = self._metrics(self.base)
        best = float(self.thresholds[int(np.argmax(acc1[:, V2_IOUS.index(0.5)]))])
        return LocalizationReport(
            n=self.mine.n,
            threshold=self.threshold,
            metrics=mine,
            baseline=base,
            best_threshold=best,
            thresholds=self.thresholds,
            curve=acc2,
            baseline_curve=bacc2,
            curve_v1=acc1,
            tolerance=self.tolerance,
            name=self.name,
        )


__all__ = ["LocalizationAccumulator"]
