"""Detectors in the dataset pipeline: one table row per image x detection x method.

A detector's run explains, per image, the detections a :class:`~camlens.targets.Detection` target
selects (the model's own above ``score_threshold``, at most ``max_boxes``, best first; or given
boxes). Its images keep their own sizes (batched as lists: the detector resizes and pads them
itself), so its maps share one frame, the largest image's ``(H, W)`` found from the files' headers
before the run: image ``i``'s map of rank ``r`` is ``maps[i, r - 1, :height, :width]``, NaN
elsewhere and in the unused ranks. The table (:data:`camlens.pipeline.store.DETECTION_COLUMNS`) adds
each detection's index in the model's output, its box in the image's pixels and, for an image with
nothing to explain, the reason in ``skipped`` (one row per method, rank 0, no map) — never a zero
map.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from camlens.api.explanation import Explanation
from camlens.base.errors import InputError
from camlens.base.localization import box_of_map
from camlens.pipeline.sources import Batch, image_sizes
from camlens.pipeline.store import ResultStore, columns
from camlens.targets import Detection

_BOX = ("x0", "y0", "x1", "y1")
_DET_BOX = ("det_x0", "det_y0", "det_x1", "det_y1")


def detection_key(target: Detection) -> dict[str, Any]:
    """What a :class:`Detection` target decides in a store's signature (a rerun with another
    threshold or other boxes is another run)."""
    boxes = target.boxes
    return {
        "boxes": "own" if boxes is None else np.asarray(boxes, dtype=np.float64).tolist(),
        "labels": None if target.label_spec is None else np.asarray(target.label_spec).tolist(),
        "iou": target.iou,
        "score_threshold": target.score_threshold,
        "max_boxes": target.max_boxes,
    }


def detection_canvas(dataset: Any) -> list[int]:
    """``[H, W]``: the largest height and width among the dataset's images (the maps' shared frame)."""
    sizes = [s for s in image_sizes(dataset) if s is not None]
    if not sizes:
        raise InputError("no readable image in the dataset: nothing for the detector to explain")
    return [max(h for h, _ in sizes), max(w for _, w in sizes)]


class DetectionSink:
    """A detector's rows and maps of every batch into a :class:`ResultStore` (a pipeline sink).

    Args:
        store: the store (its signature has ``"detections"`` and ``"canvas"``).
        n_images: images in the dataset.
        threshold: the map threshold of the table's ``x0, y0, x1, y1`` (the map's own box).
        methods: the run's methods (an image skipped by every method still gets their rows).
    """

    def __init__(self, store: ResultStore, n_images: int, threshold: float, methods: list[str], rank: int = 0):
        self.store, self.n, self.threshold, self.methods, self.rank = store, n_images, threshold, methods, rank
        sig = store.signature
        self.k = (
            int(sig["detections"]["max_boxes"])
            if sig["detections"]["boxes"] == "own"
            else len(sig["detections"]["boxes"])
        )
        self.canvas = tuple(int(v) for v in sig["canvas"])

    def write(self, res: Any) -> None:
        b: Batch = res.batch
        rows: dict[str, list] = {c: [] for c in columns(detector=True)}
        maps = {}
        skipped_all: dict[int, str] = res.extra.get("skipped", {})
        for m in self.methods:
            exp: Explanation | None = res.explanations.get(m)
            canvas = np.full((len(b), self.k, *self.canvas), np.nan, dtype=np.float32)
            for i in range(len(b)):
                why = skipped_all.get(i) if exp is None else (exp.extras.get("skipped_reasons") or {}).get(i)
                if why is not None:
                    self._skipped_row(rows, b, i, m, why, exp)
                    continue
                assert exp is not None
                self._image_rows(rows, b, i, m, exp, canvas)
            maps[m] = canvas
        render = {m: {"signed": exp.signed} for m, exp in res.explanations.items()}
        self.store.write(self.n, b.indices, rows, maps, self.rank, render)

    def close(self) -> None:
        return None

    @staticmethod
    def _common(rows: dict[str, list], b: Batch, i: int, method: str, exp: Explanation | None) -> None:
        for col, v in (("image_id", b.indices[i]), ("source", b.sources[i]), ("name", b.names[i]),
                       ("label", b.labels[i]), ("height", b.sizes[i][0]), ("width", b.sizes[i][1]),
                       ("method", method), ("layer", exp.layer if exp else None),
                       ("model", exp.model_name if exp else None)):  # fmt: skip
            rows[col].append(v)

    def _skipped_row(
        self, rows: dict[str, list], b: Batch, i: int, method: str, why: str, exp: Explanation | None
    ) -> None:
        self._common(rows, b, i, method, exp)
        for col, v in (("rank", 0), ("class_id", -1), ("class_name", ""), ("score", math.nan),
                       ("prob", math.nan), ("detection", -1), ("skipped", why)):  # fmt: skip
            rows[col].append(v)
        for c in _BOX:
            rows[c].append(-1)
        for c in _DET_BOX:
            rows[c].append(math.nan)

    def _image_rows(
        self, rows: dict[str, list], b: Batch, i: int, method: str, exp: Explanation, canvas: np.ndarray
    ) -> None:
        h, w = b.sizes[i]
        boxes = np.asarray(exp.extras["boxes"])[i]  # (K, 4) original pixels, NaN rows: padding
        index = np.asarray(exp.extras.get("detections", np.full(boxes.shape[:1], -1)))
        index = index[i] if index.ndim == 2 else index
        labels = exp.labels()[i]
        maps = exp.maps[i].numpy()
        for k in range(min(len(boxes), self.k)):
            if not np.isfinite(boxes[k]).all():
                continue  # padding: this image has fewer boxes than the batch's largest
            m = maps[k, :h, :w]
            canvas[i, k, :h, :w] = m
            self._common(rows, b, i, method, exp)
            for col, v in (("rank", k + 1), ("class_id", int(exp.classes[i, k])), ("class_name", labels[k]),
                           ("score", float(exp.scores[i, k])), ("prob", float(exp.probs[i, k])),
                           ("detection", int(index[k])), ("skipped", "")):  # fmt: skip
                rows[col].append(v)
            for c, v in zip(_BOX, box_of_map(m, self.threshold), strict=True):
                rows[c].append(int(v))
            for c, v in zip(_DET_BOX, boxes[k], strict=True):
                rows[c].append(float(v))


__all__ = ["DetectionSink", "detection_canvas", "detection_key"]
