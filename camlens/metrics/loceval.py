"""Evaluate heatmap localization against ground-truth boxes.

Ground truth is read from a simple CSV (``path,class,x0,y0,x1,y1``, 0-based, ``x1``/``y1``
exclusive — the format :func:`camlens.data.synthetic` writes), Pascal VOC XML (a file or a folder of
them; VOC ``bndbox`` coordinates are 1-based and inclusive, so ``x0 = xmin - 1``, ``x1 = xmax``), or a
COCO JSON file (``bbox = [x, y, w, h]`` in 0-based continuous coordinates; ``x0 = floor(x)``,
``x1 = ceil(x + w)``).

Metrics for ``N`` images, using the map of the ground-truth class (*GT-known*) unless noted; a box
``b`` is the box :func:`camlens.base.localization.localize` gives at the threshold, scaled to the image, and
``IoU(b, B) = max`` over the image's ground-truth boxes ``B`` of that class:

* **top-1 localization accuracy** (ILSVRC, used by CAM and Grad-CAM): the top-1 predicted class is the
  ground-truth class *and* ``IoU(b, B) >= 0.5``;
* **GT-known localization accuracy**: ``IoU(b, B) >= 0.5`` (classification ignored);
* **mean IoU**: the mean of ``IoU(b, B)`` (an empty map counts as 0);
* **pointing game** (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016),
  TorchRay's protocol, the same definition as :func:`camlens.metrics.pointing_game`
  (:func:`camlens.base.localization.pointing_game_hit`): a hit when the map's maximum, an integer image
  pixel, lies *strictly* less than ``tolerance`` pixels (15 in the paper) from a ground-truth box's
  pixels; tied maxima: a hit when any of them hits; a constant map is a miss;
* **MaxBoxAcc** (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right",
  CVPR 2020): ``max_τ BoxAcc(τ, 0.5)`` with
  ``BoxAcc(τ, δ) = 1/N Σ_n 1[IoU(box(s_n, τ), B_n) >= δ]`` and ``box(s, τ)`` the box of the largest
  connected component of the thresholded map — the best score over a sweep of thresholds, so a
  method is not judged by one arbitrary cut;
* **MaxBoxAccV2** (same authors, the extended version of that paper and their evaluation code):
  ``1/3 Σ_{δ ∈ {0.3, 0.5, 0.7}} max_τ BoxAcc'(τ, δ)`` where ``BoxAcc'`` lets *every* connected
  component propose a box (the best match counts), over a finer sweep (we use τ = 0, 0.01, …, 0.99
  for both).

Differences from Choe et al., documented on purpose: they min-max normalize each map and keep
``s >= τ``; camlens keeps ``s > τ · max(s)`` everywhere (the same rule as :func:`camlens.localize`),
so a threshold calibrated here is the one to pass to ``localize(threshold=…)`` / ``--threshold``.
Both agree when a map's minimum is 0 (e.g. after Grad-CAM's ReLU) up to pixels exactly at the cut.

**Centre baseline**: every metric is also computed, by the same code, for a map that ignores the
image: an elliptical Gaussian centred in the frame, ``exp(-((x-cx)²/σx² + (y-cy)²/σy²)/2)`` with
``σ = side · 0.25 / sqrt(-2 ln 0.3)`` per axis, so that at the default threshold 0.3 its box is the
centred box spanning half of each side, and the sweep turns it into the best centred box of any size
(the "center-gaussian baseline" of Choe et al.). Its pointing-game point is the image centre.
"""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import ndimage

from camlens.api.explainer import explain, predict
from camlens.base._util import renamed
from camlens.base.defaults import EXPLAIN_BATCH
from camlens.base.errors import CamlensError, InputError
from camlens.base.io import load_image
from camlens.base.localization import (
    DEFAULT_THRESHOLD,
    _check_threshold,
    box_mask,
    box_of_map,
    iou,
    pointing_game_hit,
    scale_boxes,
)
from camlens.models.zoo import card_of

#: threshold sweep τ = 0, 0.01, …, 0.99 (fractions of each map's max)
SWEEP = np.round(np.arange(0.0, 1.0, 0.01), 2)
#: IoU thresholds averaged by MaxBoxAccV2
V2_IOUS = (0.3, 0.5, 0.7)
#: pointing-game tolerance in image pixels (Zhang et al. 2016)
POINTING_TOLERANCE = 15
#: 8-connected inside each (H, W) slice, no connection between slices (thresholds)
_SLICE_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_SLICE_STRUCTURE[1] = True
#: 26-connected inside each (D, H, W) volume, no connection between volumes (thresholds)
_VOLUME_STRUCTURE = np.zeros((3, 3, 3, 3), dtype=bool)
_VOLUME_STRUCTURE[1] = True


class GroundTruthError(CamlensError, ValueError):
    """A ground-truth boxes file that cannot be read."""


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------
@dataclass
class GTImage:
    """Ground truth of one image: ``objects`` is a list of ``(class name or None, box)``; ``box`` is
    ``(x0, y0, x1, y1)`` in the image's pixel frame with exclusive ends."""

    path: Path
    objects: list[tuple[str | None, np.ndarray]] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (H, W) when the file gives it

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(c for c, _ in self.objects if c is not None))

    def boxes(self, cls: str | None = None) -> np.ndarray:
        """``(M, 4)`` boxes, of class ``cls`` only if given."""
        rows = [b for c, b in self.objects if cls is None or c == cls]
        return np.array(rows, dtype=np.int64).reshape(-1, 4)

    @property
    def main_class(self) -> str | None:
        """The class of the largest box (the GT-known target when an image has several classes)."""
        named = [(c, b) for c, b in self.objects if c is not None]
        if not named:
            return None
        return max(named, key=lambda cb: (cb[1][2] - cb[1][0]) * (cb[1][3] - cb[1][1]))[0]


def _resolve(base: Path, name: str, root: Path | None) -> Path:
    p = Path(name)
    if p.is_absolute():
        return p
    return (root or base) / p


def _read_csv(path: Path, root: Path | None) -> list[GTImage]:
    out: dict[str, GTImage] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"path", "x0", "y0", "x1", "y1"}
        if not reader.fieldnames or not need <= {f.strip() for f in reader.fieldnames}:
            raise GroundTruthError(
                f"{path}: a boxes CSV needs the header path,class,x0,y0,x1,y1 (class optional); "
                f"found {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            try:
                box = np.array([round(float(row[k])) for k in ("x0", "y0", "x1", "y1")], dtype=np.int64)
            except ValueError:
                raise GroundTruthError(f"{path}, line {line}: box coordinates must be numbers: {row}") from None
            if box[2] <= box[0] or box[3] <= box[1]:
                raise GroundTruthError(f"{path}, line {line}: empty box {box.tolist()} (need x1 > x0, y1 > y0)")
            key = row["path"]
            gt = out.setdefault(key, GTImage(_resolve(path.parent, key, root)))
            gt.objects.append((row.get("class") or None, box))
    return list(out.values())


def _read_voc_file(path: Path, root: Path | None) -> GTImage:
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise GroundTruthError(f"{path}: not valid Pascal VOC XML ({exc})") from None
    ann = tree.getroot()
    fname = (ann.findtext("filename") or "").strip()
    if not fname:
        raise GroundTruthError(f"{path}: Pascal VOC annotation without <filename>")
    if root is not None:
        img = root / fname
    else:
        cands = [path.parent / fname, path.parent.parent / "JPEGImages" / fname]
        img = next((c for c in cands if c.exists()), cands[0])
    size = None
    w, h = ann.findtext("size/width"), ann.findtext("size/height")
    if w and h:
        size = (int(float(h)), int(float(w)))
    gt = GTImage(img, size=size)
    for obj in ann.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise GroundTruthError(f"{path}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from None
        box = np.array([math.floor(xmin) - 1, math.floor(ymin) - 1, math.ceil(xmax), math.ceil(ymax)])
        gt.objects.append(((obj.findtext("name") or "").strip() or None, box.clip(0).astype(np.int64)))
    return gt


def _read_coco(path: Path, root: Path | None) -> list[GTImage]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GroundTruthError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise GroundTruthError(f"{path}: a COCO file needs 'images' and 'annotations' lists")
    cats = {c["id"]: c.get("name") for c in data.get("categories", [])}
    images: dict[Any, GTImage] = {}
    for im in data["images"]:
        size = (int(im["height"]), int(im["width"])) if "height" in im and "width" in im else None
        images[im["id"]] = GTImage(_resolve(path.parent, im["file_name"], root), size=size)
    for a in data["annotations"]:
        if a.get("iscrowd"):
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        box = np.array([math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h)], dtype=np.int64)
        if a["image_id"] not in images:
            raise GroundTruthError(f"{path}: annotation for unknown image_id {a['image_id']}")
        images[a["image_id"]].objects.append((cats.get(a.get("category_id")), box))
    return [g for g in images.values() if g.objects]


def read_boxes(source: str | Path, *, root: str | Path | None = None) -> list[GTImage]:
    """Read ground-truth boxes from a CSV file, a COCO JSON file, a Pascal VOC XML file, or a folder
    of VOC XML files (``folder/*.xml`` or ``folder/Annotations/*.xml``).

    Image paths are resolved relative to ``root`` if given, else to the boxes file's folder (VOC:
    the XML's folder, then ``../JPEGImages``).
    """
    p = Path(source)
    r = Path(root) if root is not None else None
    if not p.exists():
        raise GroundTruthError(f"ground-truth boxes not found: {p}")
    if p.is_dir():
        xmls = sorted(p.glob("*.xml")) or sorted((p / "Annotations").glob("*.xml"))
        if not xmls:
            raise GroundTruthError(f"{p}: no Pascal VOC .xml files in this folder (or its Annotations/)")
        out = [_read_voc_file(x, r) for x in xmls]
    elif p.suffix.lower() == ".csv":
        out = _read_csv(p, r)
    elif p.suffix.lower() == ".json":
        out = _read_coco(p, r)
    elif p.suffix.lower() == ".xml":
        out = [_read_voc_file(p, r)]
    else:
        raise GroundTruthError(
            f"{p}: unknown boxes format; use a .csv (path,class,x0,y0,x1,y1), a COCO .json, "
            "a Pascal VOC .xml or a folder of them"
        )
    if not out:
        raise GroundTruthError(f"{p}: no boxes found")
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def centre_map(size: Sequence[int], fraction: float = 0.5, at: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The centre baseline map: an elliptical Gaussian whose ``at``-level box spans ``fraction`` of
    each side (``σ = side · fraction/2 / sqrt(-2 ln at)``)."""
    h, w = size
    k = math.sqrt(-2.0 * math.log(at))
    sx, sy = w * fraction / 2 / k, h * fraction / 2 / k
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    return np.exp(-0.5 * (((xx - w / 2) / sx) ** 2 + ((yy - h / 2) / sy) ** 2))


def _peak(m: np.ndarray, from_size, to_size) -> tuple[float, float]:
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    (h0, w0), (h1, w1) = from_size, to_size
    return (x + 0.5) * w1 / w0, (y + 0.5) * h1 / h0


def pointing_hit(point: tuple[float, float], boxes: np.ndarray, tolerance: float = POINTING_TOLERANCE) -> bool:
    """Whether the image pixel holding ``(x, y)`` (``floor`` of each) is a pointing-game hit for boxes
    ``(x0, y0, x1, y1)`` (exclusive ends): its distance to the boxes' nearest pixel is 0 or strictly
    below ``tolerance`` (:func:`camlens.base.localization.pointing_game_hit` for one point)."""
    px, py = math.floor(point[0]), math.floor(point[1])
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, c1 = math.floor(x0), math.ceil(x1) - 1
        r0, r1 = math.floor(y0), math.ceil(y1) - 1
        if c1 < c0 or r1 < r0:
            continue
        d2 = max(c0 - px, 0, px - c1) ** 2 + max(r0 - py, 0, py - r1) ** 2
        if d2 == 0 or d2 < tolerance**2:
            return True
    return False


def map_pointing_hit(m: np.ndarray, boxes: np.ndarray, size, tolerance: float = POINTING_TOLERANCE) -> bool:
    """The pointing game of map ``m`` against ground-truth ``boxes`` in an image of ``size`` ``(H, W)``
    (:func:`camlens.base.localization.pointing_game_hit`: strict tolerance, any tied maximum)."""
    return bool(len(boxes)) and pointing_game_hit(m, box_mask(boxes, size), tolerance)


def sweep_components(m: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of ``m > τ · max(m)`` for every τ at once.

    The ``T`` binary masks are stacked into a ``(T, H, W)`` volume labelled with a structuring
    element that is 8-connected inside a slice and does not connect slices, so one C call labels
    every threshold. Returns ``(boxes (L, 4), threshold index (L,), largest (L,) bool)`` where
    ``largest`` marks each threshold's largest component (ties: more mass, then raster order), the
    same choice as :func:`camlens.base.localization.localize`. A volume map ``(D, H, W)`` gives
    the 26-connected components of each threshold and boxes ``(L, 6)`` ``(x0, y0, z0, x1, y1, z1)``.
    """
    nd = m.ndim
    empty = np.zeros((0, 2 * nd), np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    peak = m.max() if m.size else 0.0
    if not np.isfinite(m).all() or peak <= 0:
        return empty
    cuts = np.asarray(thresholds, dtype=np.float64) * peak
    # thresholds that keep the same number of pixels keep the same (nested) mask: label it once
    vals = np.sort(m, axis=None)
    kept = vals.size - np.searchsorted(vals, cuts, side="right")
    uniq, first_t, inverse = np.unique(kept, return_index=True, return_inverse=True)
    nz = uniq > 0
    if not nz.any():
        return empty
    vol = m[None] > cuts[first_t[nz]].reshape(-1, *(1,) * nd)
    labels, n = ndimage.label(vol, structure=_SLICE_STRUCTURE if nd == 2 else _VOLUME_STRUCTURE)
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=n + 1)[1:]
    mass = np.bincount(flat, weights=np.broadcast_to(m, vol.shape).ravel(), minlength=n + 1)[1:]
    sl = ndimage.find_objects(labels)
    boxes = np.array([(*(a.start for a in s[:0:-1]), *(a.stop for a in s[:0:-1])) for s in sl], dtype=np.int64).reshape(
        -1, 2 * nd
    )  # x first: (x0, y0, x1, y1) or (x0, y0, z0, x1, y1, z1)
    uidx = np.array([s[0].start for s in sl], dtype=np.int64)  # index among the distinct masks
    order = np.lexsort((np.arange(n), -mass, -areas, uidx))  # by mask, then area, mass, label
    first = np.ones(n, dtype=bool)
    first[1:] = uidx[order][1:] != uidx[order][:-1]
    largest = np.zeros(n, dtype=bool)
    largest[order[first]] = True
    # expand back to every threshold that shares a mask
    slot = np.full(len(uniq), -1)
    slot[np.flatnonzero(nz)] = np.arange(int(nz.sum()))
    t_slot = slot[inverse.ravel()]  # (T,) distinct-mask index of each threshold, -1 if empty
    ts = [np.flatnonzero(t_slot == k) for k in range(int(nz.sum()))]
    rep = np.array([len(ts[u]) for u in uidx])
    tidx = np.concatenate([ts[u] for u in uidx]) if n else np.zeros(0, np.int64)
    boxes, largest = np.repeat(boxes, rep, axis=0), np.repeat(largest, rep)
    return boxes, tidx, largest


def _sweep_ious(sweep, gt: np.ndarray, n_thr: int, from_size, to_size) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: IoU of the largest component's box (V1) and the best IoU of any box (V2)."""
    boxes, tidx, largest = sweep
    v1, v2 = np.zeros(n_thr), np.zeros(n_thr)
    if len(boxes) == 0 or len(gt) == 0:
        return v1, v2
    ious = iou(scale_boxes(boxes, from_size, to_size)[:, None], gt[None]).max(1)
    np.maximum.at(v2, tidx, ious)
    v1[tidx[largest]] = ious[largest]
    return v1, v2


@dataclass
class LocalizationReport:
    """Localization metrics of a method and of the centre baseline (fractions in [0, 1]).

    ``metrics`` / ``baseline`` keys: ``top1_loc``, ``gt_known_loc``, ``mean_iou``, ``pointing_game``,
    ``maxboxacc``, ``maxboxacc_v2`` (``top1_loc`` is NaN when classification was not given).
    ``best_threshold``: the τ reaching MaxBoxAcc (the calibrated threshold).
    ``curve`` / ``baseline_curve``: BoxAcc ``(T, 3)`` over ``thresholds`` x IoU ``(0.3, 0.5, 0.7)``,
    V2 (all components).
    """

    n: int
    threshold: float
    metrics: dict[str, float]
    baseline: dict[str, float]
    best_threshold: float
    thresholds: np.ndarray
    curve: np.ndarray
    baseline_curve: np.ndarray
    curve_v1: np.ndarray
    tolerance: float = POINTING_TOLERANCE
    name: str = "method"
    per_image_iou: np.ndarray | None = None
    top1_note: str = ""  # why top-1 loc. is n/a, when it is

    #: what the table counts and the pointing tolerance's unit (volumes: "volumes", "voxels")
    ITEMS: ClassVar[str] = "images"
    UNIT: ClassVar[str] = "px"

    LABELS: ClassVar[dict[str, str]] = {
        "top1_loc": "top-1 loc. acc. (class & IoU>=0.5)",
        "gt_known_loc": "GT-known loc. acc. (IoU>=0.5)",
        "mean_iou": "mean IoU",
        "pointing_game": "pointing game",
        "maxboxacc": "MaxBoxAcc (IoU>=0.5)",
        "maxboxacc_v2": "MaxBoxAccV2 (IoU .3/.5/.7)",
    }

    def table(self) -> str:
        """A plain-text table: metric | method | centre baseline."""
        rows = []
        for k, label in self.LABELS.items():
            if k == "pointing_game":
                label = f"pointing game (tol. {self.tolerance:g} {self.UNIT})"
            a, b = self.metrics[k], self.baseline[k]
            fmt = (
                (lambda v: "n/a" if v != v else f"{v:.3f}")
                if k == "mean_iou"
                else (lambda v: "n/a" if v != v else f"{100 * v:.1f}%")
            )
            rows.append((label, fmt(a), fmt(b)))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(self.name), 8)
        head = f"{'metric':<{w0}}  {self.name:>{w1}}  {'centre baseline':>15}"
        lines = [
            f"{self.n} {self.ITEMS}, threshold {self.threshold:g} of the max "
            f"(best for MaxBoxAcc: {self.best_threshold:g})",
            head,
            "-" * len(head),
        ]
        lines += [f"{a:<{w0}}  {b:>{w1}}  {c:>15}" for a, b, c in rows]
        if self.metrics["top1_loc"] != self.metrics["top1_loc"] and self.top1_note:
            lines.append(f"top-1 loc. n/a: {self.top1_note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        def clean(d):
            return {k: (None if v != v else float(v)) for k, v in d.items()}

        return {
            "n": self.n,
            "name": self.name,
            "threshold": self.threshold,
            "best_threshold": self.best_threshold,
            "pointing_tolerance": self.tolerance,
            "metrics": clean(self.metrics),
            "centre_baseline": clean(self.baseline),
            "iou_thresholds_v2": list(V2_IOUS),
            "thresholds": [float(t) for t in self.thresholds],
            "boxacc_v1_iou0.5": [float(v) for v in self.curve_v1[:, 1]],
            "boxacc_v2": self.curve.tolist(),
            "baseline_boxacc_v2": self.baseline_curve.tolist(),
        }


def _to_list_of_maps(maps) -> list[np.ndarray]:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    if isinstance(maps, np.ndarray):
        if maps.ndim != 3:
            raise InputError(f"maps must be (N, H, W), one map per image; got {maps.shape}")
        return list(maps.astype(np.float64))
    return [np.asarray(m, dtype=np.float64) for m in maps]


def _scores(maps, gts, sizes, correct, threshold, thresholds, tolerance, shared=False):
    n = len(maps)
    ious = np.zeros(n)
    hits = np.zeros(n, dtype=bool)
    v1 = np.zeros((n, len(thresholds), len(V2_IOUS)), dtype=bool)
    v2 = np.zeros_like(v1)
    deltas = np.array(V2_IOUS)
    cache: dict = {}  # identical maps (the centre baseline) share their sweep
    for i, (m, gt, size) in enumerate(zip(maps, gts, sizes, strict=True)):
        msize = m.shape
        box = box_of_map(m, threshold)
        if box[0] >= 0 and len(gt):
            ious[i] = iou(scale_boxes(box, msize, size)[None], gt).max()
        hits[i] = map_pointing_hit(m, gt, size, tolerance)
        key = (msize, id(m)) if shared else None
        if key is None or key not in cache:
            sweep = sweep_components(m, thresholds)
            if key is not None:
                cache[key] = sweep
        else:
            sweep = cache[key]
        b1, b2 = _sweep_ious(sweep, gt, len(thresholds), msize, size)
        v1[i] = b1[:, None] >= deltas[None]
        v2[i] = b2[:, None] >= deltas[None]
    acc1, acc2 = v1.mean(0), v2.mean(0)  # (T, 3)
    d05 = V2_IOUS.index(0.5)
    out = {
        "gt_known_loc": float((ious >= 0.5).mean()),
        "mean_iou": float(ious.mean()),
        "pointing_game": float(hits.mean()),
        "maxboxacc": float(acc1[:, d05].max()),
        "maxboxacc_v2": float(acc2.max(0).mean()),
    }
    if correct is None:
        out["top1_loc"] = float("nan")
    else:
        c = np.asarray(correct, dtype=float)
        known = ~np.isnan(c)
        hit = (c[known] > 0) & (ious[known] >= 0.5)
        out["top1_loc"] = float(hit.mean()) if known.any() else float("nan")
    best = float(thresholds[int(np.argmax(acc1[:, d05]))])
    return out, acc1, acc2, best, ious


def evaluate_maps(
    maps,
    gt_boxes: Sequence[np.ndarray],
    *,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    correct: Sequence[bool | float | None] | np.ndarray | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    thresholds: Sequence[float] | None = None,
    tolerance: float = POINTING_TOLERANCE,
    name: str = "method",
) -> LocalizationReport:
    """Localization metrics of one map per image against its ground-truth boxes (see module doc).

    Args:
        maps: ``(N, H, W)`` array/tensor, or a list of 2-D maps: the map of each image's
            ground-truth class (GT-known).
        gt_boxes: per image an ``(M, 4)`` array of ground-truth boxes in the *image* frame.
        image_sizes: per image ``(H, W)`` of the original image; boxes from the maps are scaled to
            it (default: the maps' own size).
        correct: per image whether the top-1 predicted class is the ground-truth class (``NaN`` or
            ``None`` entries: unknown); needed for top-1 localization accuracy.
        threshold: fraction of the max for the fixed-threshold metrics.
        thresholds: the sweep for MaxBoxAcc (default τ = 0, 0.01, …, 0.99).
        tolerance: pointing-game tolerance in image pixels.
    """
    ms = _to_list_of_maps(maps)
    n = len(ms)
    if n == 0:
        raise InputError("no maps to evaluate")
    if len(gt_boxes) != n:
        raise InputError(f"{n} maps but {len(gt_boxes)} ground-truth entries; give one per image")
    gts = [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in gt_boxes]
    sizes = [tuple(s) for s in image_sizes] if image_sizes is not None else [m.shape for m in ms]
    if len(sizes) != n:
        raise InputError(f"{n} maps but {len(sizes)} image sizes")
    t = _check_threshold(threshold)
    ts = SWEEP if thresholds is None else np.asarray([_check_threshold(x) for x in thresholds])
    if correct is not None:
        correct = np.array([np.nan if c is None else float(c) for c in correct], dtype=float)
        if len(correct) != n:
            raise InputError(f"{n} maps but {len(correct)} entries in correct")
    note = ""
    if correct is None:
        note = "no top-1 correctness was given (correct=None); the GT-known figures do not need it"
    elif np.isnan(correct).all():
        note = (
            "no ground-truth class is one of the model's classes, so its top-1 prediction cannot be "
            "judged right or wrong (the GT-known figures do not need it); fine-tune on these classes "
            "(camlens finetune) for a model that names them"
        )
    mine, acc1, acc2, best, ious = _scores(ms, gts, sizes, correct, t, ts, tolerance)
    by_shape: dict = {}
    base_maps = [by_shape.setdefault(m.shape, centre_map(m.shape)) for m in ms]
    base, _, bacc2, _, _ = _scores(base_maps, gts, sizes, correct, t, ts, tolerance, shared=True)
    return LocalizationReport(
        n=n,
        threshold=t,
        metrics=mine,
        baseline=base,
        best_threshold=best,
        thresholds=ts,
        curve=acc2,
        baseline_curve=bacc2,
        curve_v1=acc1,
        tolerance=tolerance,
        name=name,
        per_image_iou=ious,
        top1_note=note,
    )


def calibrate_threshold(
    maps,
    gt_boxes: Sequence[np.ndarray],
    *,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    thresholds: Sequence[float] | None = None,
) -> float:
    """The threshold τ maximizing ``BoxAcc(τ, 0.5)`` on a validation set (MaxBoxAcc's argmax;
    the smallest such τ on ties)."""
    return evaluate_maps(maps, gt_boxes, image_sizes=image_sizes, thresholds=thresholds).best_threshold


def save_threshold(path: str | Path, threshold: float, *, overwrite: bool = False, **info: Any) -> Path:
    """Write a calibrated threshold as JSON ``{"threshold": τ, …info}`` (method, model, metrics…)."""
    from camlens.base.fsio import atomic_write, check_target, safe_out_dir

    p = check_target(path, overwrite)  # a file or a link (even dangling) is in the way without overwrite
    safe_out_dir(p.parent)
    payload = {"threshold": float(_check_threshold(threshold)), **info}
    return atomic_write(p, json.dumps(payload, indent=2, default=_json_default) + "\n", overwrite=overwrite)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def load_threshold(source: str | Path | float) -> float:
    """A threshold from a number, a numeric string, or a JSON file written by :func:`save_threshold`
    (or any JSON with a top-level ``"threshold"`` / ``"best_threshold"``)."""
    if isinstance(source, (int, float)):
        return _check_threshold(source)
    s = str(source)
    try:
        return _check_threshold(float(s))
    except ValueError:
        pass
    p = Path(s)
    if not p.exists():
        raise InputError(f"threshold {s!r} is neither a number in [0, 1) nor an existing JSON file")
    try:
        data = json.loads(p.read_text())
        return _check_threshold(data["threshold"] if "threshold" in data else data["best_threshold"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise InputError(f'{p}: not a calibrated-threshold JSON (needs a top-level "threshold")') from None


# --------------------------------------------------------------------------------------------
# End to end: a model, a method and a ground-truth file
# --------------------------------------------------------------------------------------------
def _class_id(name: str | None, class_names: Sequence[str] | None) -> int | None:
    if name is None:
        return None
    if class_names:
        low = [c.lower() for c in class_names]
        if name.lower() in low:
            return low.index(name.lower())
    if name.isdigit():
        return int(name)
    return None


def evaluate_model(
    model,
    gt: Sequence[GTImage] | None = None,
    *,
    method: str = "gradcam",
    layer=None,
    threshold: float = DEFAULT_THRESHOLD,
    thresholds: Sequence[float] | None = None,
    tolerance: float = POINTING_TOLERANCE,
    batch_size: int = EXPLAIN_BATCH,
    class_names: Sequence[str] | None = None,
    on_error: Callable[[GTImage, Exception], None] | None = None,
    progress: bool = False,
    **options: Any,
) -> LocalizationReport:
    """Explain every ground-truth image with ``method`` and evaluate the boxes (see module doc).

    The map explained is the ground-truth class's (the class of the largest box when an image has
    several; matched to the model's class names case-insensitively, or given as an id). Images whose
    class the model does not know are explained for their top-1 class and left out of top-1
    localization accuracy. Unreadable images are passed to ``on_error`` (default: raise).

    ``gt``: the ground-truth images with their boxes (:func:`read_boxes`), under the name
    every camlens function uses for ground truth (``ground_truth=`` is its 0.2 spelling: a
    ``DeprecationWarning``).
    """
    ground_truth = renamed(options, "ground_truth", "gt", gt, "camlens.metrics.evaluate_model")
    if ground_truth is None:
        raise InputError("evaluate_model needs the ground truth: evaluate_model(model, gt) (see read_boxes)")
    card = card_of(model)
    names = list(class_names) if class_names is not None else (card.class_names if card else None)
    maps, gts, sizes, correct = [], [], [], []
    items = []
    for g in ground_truth:
        try:
            items.append((g, load_image(g.path)))
        except CamlensError as exc:
            if on_error is None:
                raise
            on_error(g, exc)
    if not items:
        raise InputError("none of the ground-truth images could be read")
    batches = range(0, len(items), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch")
    for s in batches:
        chunk = items[s : s + batch_size]
        imgs = [im for _, im in chunk]
        cids = [_class_id(g.main_class, names) for g, _ in chunk]
        cls_names = [g.main_class if cid is not None else None for (g, _), cid in zip(chunk, cids, strict=True)]
        if all(c is not None for c in cids):  # top-1 correctness from the explaining forward's own logits
            exp = explain(model, imgs, method=method, targets=cids, layer=layer, class_names=names, **options)
            top1 = exp.logits.argmax(1).tolist() if exp.logits is not None else None
        else:  # an unknown class: that image's top-1 class is explained, found by a forward first
            top1 = [p[0][0] for p in predict(model, imgs, topk=1, class_names=names)]
            targets = [c if c is not None else t1 for c, t1 in zip(cids, top1, strict=True)]
            exp = explain(model, imgs, method=method, targets=targets, layer=layer, class_names=names, **options)
        if top1 is None:
            raise InputError(f"{method} gives no class logits, so top-1 localization cannot be measured")
        correct += [np.nan if c is None else float(c == t1) for c, t1 in zip(cids, top1, strict=True)]
        for j, ((g, im), cname) in enumerate(zip(chunk, cls_names, strict=True)):
            maps.append(exp.map(j, 0).float().cpu().numpy())
            gts.append(g.boxes(cname))
            sizes.append(im.shape[:2])
    return evaluate_maps(
        maps,
        gts,
        image_sizes=sizes,
        correct=correct,
        threshold=threshold,
        thresholds=thresholds,
        tolerance=tolerance,
        name=method,
    )


__all__ = [
    "POINTING_TOLERANCE",
    "SWEEP",
    "V2_IOUS",
    "GTImage",
    "GroundTruthError",
    "LocalizationReport",
    "calibrate_threshold",
    "centre_map",
    "evaluate_maps",
    "evaluate_model",
    "load_threshold",
    "map_pointing_hit",
    "pointing_hit",
    "read_boxes",
    "save_threshold",
]
