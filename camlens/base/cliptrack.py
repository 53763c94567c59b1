r"""Localization in time: a clip's map ``(T, H, W)`` as a per-frame box track and a temporal extent.

For a clip map :math:`s(t, y, x)` and a threshold :math:`\tau` (a fraction, as in
:func:`camlens.localize`), the kept region is cut **once for the whole clip**:

.. math:: M = \{(t, y, x) : s(t, y, x) > \tau \max_{t', y', x'} s(t', y', x')\}

(strict ``>``; non-positive values are never kept), so a frame whose evidence is weak against the
clip's strongest frame keeps nothing — the point of a track. Then

* **box track**: per frame :math:`t`, the box ``(x0, y0, x1, y1)`` (ends exclusive) of the largest
  8-connected component of :math:`M_t` (ties as :func:`camlens.localize`: more mass, then raster
  order), or ``(-1, -1, -1, -1)`` when the frame keeps nothing;
* **temporal extent**: the first and the last frame (both inclusive) that keep anything, with their
  timestamps in seconds when the clip has them (:attr:`camlens.base.video.Clip.timestamps`); ``None``
  when no frame does (a map whose maximum is ``<= 0`` or that is not finite).

The extent counts every region of every frame; the 3-D box of :func:`camlens.localize` with
``spatial_dims=3`` is that of the largest 26-connected region only, so its ``t`` range can be shorter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from camlens.base.errors import InputError
from camlens.base.localization import DEFAULT_THRESHOLD, EMPTY_BOX, _check_threshold, components


@dataclass(frozen=True)
class TemporalExtent:
    """The first and last frame (inclusive) above the threshold, and their times (``None``: unknown)."""

    first: int
    last: int
    start_s: float | None = None
    end_s: float | None = None

    @property
    def frames(self) -> int:
        """Number of frames from ``first`` to ``last``, both included."""
        return self.last - self.first + 1

    def to_dict(self) -> dict[str, Any]:
        return {"first_frame": self.first, "last_frame": self.last, "start_s": self.start_s, "end_s": self.end_s}


@dataclass(frozen=True)
class ClipTrack:
    """A clip's per-frame boxes ``(T, 4)`` (``-1`` rows: nothing kept), its temporal extent and the
    threshold used."""

    boxes: np.ndarray
    extent: TemporalExtent | None
    threshold: float
    timestamps: np.ndarray | None = None

    @property
    def present(self) -> np.ndarray:
        """``(T,)`` bool: the frames that keep a region."""
        return self.boxes[:, 0] >= 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: one row per frame (``box_xyxy`` ``None`` when the frame keeps nothing)."""
        rows = []
        for t, b in enumerate(self.boxes):
            row: dict[str, Any] = {"frame": t, "box_xyxy": [int(v) for v in b] if b[0] >= 0 else None}
            if self.timestamps is not None:
                row["time_s"] = float(self.timestamps[t])
            rows.append(row)
        return {
            "threshold": self.threshold,
            "temporal_extent": self.extent.to_dict() if self.extent is not None else None,
            "frames": rows,
        }


def _clip_map(m: Any) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().float().cpu().numpy()
    arr = np.asarray(m)
    if arr.ndim != 3 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputError(
            f"a clip map must be a numeric (T, H, W) array; got {arr.dtype} {arr.shape} "
            "(take one image and target of the explanation: exp.map(i, k))"
        )
    return arr.astype(np.float64)


def _timestamps(timestamps: Sequence[float] | np.ndarray | None, frames: int) -> np.ndarray | None:
    if timestamps is None:
        return None
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if len(ts) != frames:
        raise InputError(f"{len(ts)} timestamps for a clip map of {frames} frames: give one per frame")
    return ts


def clip_track(
    m: Any, threshold: float = DEFAULT_THRESHOLD, *, timestamps: Sequence[float] | np.ndarray | None = None
) -> ClipTrack:
    """The box track and temporal extent of one clip map ``(T, H, W)`` (see the module docstring).

    Args:
        m: the map of one clip and target, ``(T, H, W)`` (array or tensor, any device).
        threshold: keep ``s > threshold * max(s)`` over the whole clip; in ``[0, 1)``.
        timestamps: ``(T,)`` seconds of the frames (e.g. ``Clip.timestamps``), for the extent's times.
    """
    t = _check_threshold(threshold)
    arr = _clip_map(m)
    ts = _timestamps(timestamps, arr.shape[0])
    boxes = np.tile(np.array(EMPTY_BOX, dtype=np.int64), (arr.shape[0], 1))
    peak = arr.max() if arr.size else 0.0
    if arr.size == 0 or not np.isfinite(arr).all() or peak <= 0:
        return ClipTrack(boxes, None, t, ts)
    kept = arr > t * peak
    for f in np.flatnonzero(kept.reshape(arr.shape[0], -1).any(axis=1)):
        boxes[f] = components(kept[f], arr[f])[0][2]
    on = np.flatnonzero(boxes[:, 0] >= 0)
    first, last = int(on[0]), int(on[-1])
    extent = TemporalExtent(
        first, last, float(ts[first]) if ts is not None else None, float(ts[last]) if ts is not None else None
    )
    return ClipTrack(boxes, extent, t, ts)


def box_track(m: Any, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per-frame boxes ``(T, 4)`` of a clip map ``(T, H, W)`` (``-1`` rows: the frame keeps nothing)."""
    return clip_track(m, threshold).boxes


def temporal_extent(
    m: Any, threshold: float = DEFAULT_THRESHOLD, *, timestamps: Sequence[float] | np.ndarray | None = None
) -> TemporalExtent | None:
    """First and last frame of a clip map ``(T, H, W)`` above the threshold (``None``: no frame is)."""
    return clip_track(m, threshold, timestamps=timestamps).extent


__all__ = ["ClipTrack", "TemporalExtent", "box_track", "clip_track", "temporal_extent"]
