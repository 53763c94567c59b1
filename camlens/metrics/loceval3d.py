r"""Evaluate the localization of volume maps ``(D, H, W)`` against 3-D ground truth.

**Ground truth**, per volume, in the maps' voxel frame (a map must lie on its ground truth's grid:
camlens explains a scan on its own voxels, see :mod:`camlens.base.nifti`):

* 3-D boxes ``(x0, y0, z0, x1, y1, z1)``, 0-based, ends exclusive (the order of
  :func:`camlens.localize` with ``spatial_dims=3``: ``x`` indexes ``W``, ``y`` ``H``, ``z`` ``D``),
  read by :func:`read_volume_boxes` from a CSV (header ``path,class,x0,y0,z0,x1,y1,z1``, class
  optional, one box a row) or a JSON file (a list of ``{"path", "class", "box": [6 numbers]}``
  objects, or ``{"path": [[6 numbers], …], …}``);
* masks ``(D, H, W)`` (non-zero = object), read by :func:`read_volume_mask` from ``.npy`` or NIfTI
  (``.nii``, ``.nii.gz``; transposed to ``(D, H, W)`` as :meth:`camlens.base.nifti.Volume.tensor`
  does). For the box metrics a mask proposes the boxes of its 26-connected components
  (:func:`mask_boxes`); the pointing games use the mask itself.

**Metrics** (the 2-D definitions of :mod:`camlens.metrics.loceval` over voxels; ``box(s, τ)`` the
box of the largest 26-connected component of :math:`s > \tau \max s`, as :func:`camlens.localize`):

* **3-D IoU** ``|A ∩ B| / |A ∪ B|`` of boxes (voxel counts); against several ground-truth boxes
  the best; ``mean_iou`` and ``gt_known_loc`` (IoU >= 0.5) at the fixed ``threshold``;
* **pointing game**: the one :func:`camlens.base.localization.pointing_game_hit` — the map's
  maximum, an integer voxel, hits when its Euclidean distance to the object's nearest voxel is
  0 or **strictly** below ``tolerance`` voxels; tied maxima hit when any of them hits; a constant
  map is a miss. Default tolerance **0** (the peak must lie on the object): the paper's 15 px are
  tied to 224-pixel photos, and a voxel tolerance means a different length in every scan;
* **energy pointing game**: the share of :math:`\max(s, 0)` inside the object
  (:func:`camlens.metrics.pointing.energy_share`; no positive energy: the object's volume fraction);
* **MaxBoxAcc** ``max_τ BoxAcc(τ, 0.5)`` and **MaxBoxAccV2**
  ``1/3 Σ_{δ ∈ {.3, .5, .7}} max_τ BoxAcc'(τ, δ)`` (every component proposes a box), over the sweep
  τ = 0, 0.01, …, 0.99 (Choe et al., CVPR 2020), components labelled for every τ in one call
  (:func:`camlens.metrics.loceval.sweep_components`).

**Centre baseline**: an ellipsoidal Gaussian centred in the volume whose 0.3-level box spans half
of each side (the 3-D form of :func:`camlens.metrics.loceval.centre_map`), scored by the same code.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from camlens.api.explainer import explain
from camlens.base.errors import InputError
from camlens.base.localization import (
    DEFAULT_THRESHOLD,
    _check_threshold,
    box_mask,
    box_of_map,
    components,
    iou,
    pointing_game_hit,
)
from camlens.base.nifti import is_nifti, read_nifti
from camlens.metrics.loceval import SWEEP, V2_IOUS, GroundTruthError, LocalizationReport, sweep_components
from camlens.metrics.pointing import energy_share

#: pointing-game tolerance in voxels (0: the peak voxel must lie on the object)
POINTING_TOLERANCE_3D = 0
_COORDS = ("x0", "y0", "z0", "x1", "y1", "z1")


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------
@dataclass
class GTVolume:
    """Ground truth of one volume: ``objects`` ``[(class or None, box (6,))]`` and/or a ``mask``
    ``(D, H, W)`` bool; ``path`` names the scan (or the key of the boxes file)."""

    path: Path
    objects: list[tuple[str | None, np.ndarray]] = field(default_factory=list)
    mask: np.ndarray | None = None

    def boxes(self, cls: str | None = None) -> np.ndarray:
        """``(M, 6)`` boxes (of class ``cls`` only, if given); a mask-only volume: its components' boxes."""
        rows = [b for c, b in self.objects if cls is None or c == cls]
        if not rows and self.mask is not None:
            return mask_boxes(self.mask)
        return np.array(rows, dtype=np.int64).reshape(-1, 6)


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """Boxes ``(M, 6)`` of the 26-connected components of a ``(D, H, W)`` mask, largest first."""
    m = np.asarray(mask) != 0
    if m.ndim != 3:
        raise InputError(f"a volume mask must be (D, H, W); got shape {m.shape}")
    return np.array([c[2] for c in components(m)], dtype=np.int64).reshape(-1, 6)


def _box(values: Sequence[Any], where: str) -> np.ndarray:
    try:
        box = np.array([round(float(v)) for v in values], dtype=np.int64)
    except (TypeError, ValueError):
        raise GroundTruthError(f"{where}: box coordinates must be numbers: {list(values)}") from None
    if box.shape != (6,) or (box[3:] <= box[:3]).any() or (box < 0).any():
        raise GroundTruthError(
            f"{where}: a 3-D box is six numbers (x0, y0, z0, x1, y1, z1) with x1 > x0, y1 > y0, z1 > z0 >= 0; "
            f"got {list(values)}"
        )
    return box


def _read_csv(path: Path) -> dict[str, GTVolume]:
    out: dict[str, GTVolume] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = {f.strip() for f in reader.fieldnames or []}
        if not {"path", *_COORDS} <= fields:
            raise GroundTruthError(
                f"{path}: a 3-D boxes CSV needs the header path,class,x0,y0,z0,x1,y1,z1 (class optional); "
                f"found {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            box = _box([row[k] for k in _COORDS], f"{path}, line {line}")
            gt = out.setdefault(row["path"], GTVolume(Path(row["path"])))
            gt.objects.append((row.get("class") or None, box))
    return out


def _read_json(path: Path) -> dict[str, GTVolume]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GroundTruthError(f"{path}: not valid JSON ({exc})") from None
    rows: list[tuple[str, Any, Any]] = []
    if isinstance(data, dict):
        for key, boxes in data.items():
            rows += [(key, None, b) for b in (boxes if isinstance(boxes, list) else [])]
    elif isinstance(data, list) and all(isinstance(r, dict) and "path" in r and "box" in r for r in data):
        rows = [(r["path"], r.get("class"), r["box"]) for r in data]
    else:
        raise GroundTruthError(
            f'{path}: a 3-D boxes JSON is a list of {{"path", "class", "box": [x0, y0, z0, x1, y1, z1]}} '
            'objects or {"path": [[x0, y0, z0, x1, y1, z1], …]}'
        )
    out: dict[str, GTVolume] = {}
    for k, (key, cls, box) in enumerate(rows):
        values = box if isinstance(box, (list, tuple)) else [box]
        gt = out.setdefault(str(key), GTVolume(Path(str(key))))
        gt.objects.append((None if cls is None else str(cls), _box(values, f"{path}, box {k}")))
    return out


def read_volume_boxes(source: str | Path, *, root: str | Path | None = None) -> list[GTVolume]:
    """3-D ground-truth boxes from a CSV or JSON file (see the module docstring), one
    :class:`GTVolume` per scan in file order; scan paths are resolved against ``root`` (default:
    the file's folder)."""
    p = Path(source)
    if not p.is_file():
        raise GroundTruthError(f"3-D ground-truth boxes not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise GroundTruthError(f"{p}: 3-D boxes are read from .csv (path,class,x0,y0,z0,x1,y1,z1) or .json")
    found = _read_csv(p) if suffix == ".csv" else _read_json(p)
    if not found:
        raise GroundTruthError(f"{p}: no boxes found")
    base = Path(root) if root is not None else p.parent
    for gt in found.values():
        gt.path = gt.path if gt.path.is_absolute() else base / gt.path
    return list(found.values())


def read_volume_mask(path: str | Path) -> np.ndarray:
    """A ``(D, H, W)`` bool mask from ``.npy`` (already ``(D, H, W)``) or NIfTI (file axes
    ``(i, j, k)`` transposed to ``(k, j, i)``, as the scans camlens explains)."""
    p = Path(path)
    if not p.is_file():
        raise GroundTruthError(f"mask not found: {p}")
    if is_nifti(p):
        arr = read_nifti(p).tensor()[0, 0].numpy()
    elif p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise GroundTruthError(f"{p}: not a plain .npy array ({exc})") from None
    else:
        raise GroundTruthError(f"{p}: a 3-D mask is read from .npy or NIfTI (.nii, .nii.gz)")
    if arr.ndim != 3:
        raise GroundTruthError(f"{p}: a volume mask must be 3-D (D, H, W); got shape {arr.shape}")
    if not arr.any():
        raise GroundTruthError(f"{p}: the mask is empty (no object voxel)")
    return arr != 0


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def centre_volume(size: Sequence[int], fraction: float = 0.5, at: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The 3-D centre baseline ``(D, H, W)``: an ellipsoidal Gaussian whose ``at``-level box spans
    ``fraction`` of each side (``σ = side · fraction/2 / sqrt(-2 ln at)`` per axis)."""
    k = math.sqrt(-2.0 * math.log(at))
    grids = np.meshgrid(*(np.arange(s, dtype=np.float64) + 0.5 for s in size), indexing="ij")
    q = sum(((g - s / 2) / (s * fraction / 2 / k)) ** 2 for g, s in zip(grids, size, strict=True))
    return np.exp(-0.5 * q)


@dataclass(frozen=True)
class _Truth:
    """One volume's ground truth as the metrics use it: boxes ``(M, 6)`` and the object mask."""

    boxes: np.ndarray
    mask: np.ndarray


def _truth(gt: Any, size: tuple[int, ...], k: int) -> _Truth:
    if isinstance(gt, GTVolume):
        mask = gt.mask if gt.mask is not None else box_mask(gt.boxes(), size)
        boxes = gt.boxes()
    else:
        a = gt.detach().cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
        if a.ndim == 3:  # a mask, (D, H, W): checked against the map's grid below
            mask, boxes = a != 0, mask_boxes(a)
        elif a.size and a.shape[-1] == 6 and a.ndim <= 2:
            boxes = a.reshape(-1, 6)
            mask = box_mask(boxes, size)
        else:
            raise InputError(f"ground truth of volume {k} has shape {a.shape}: give boxes (M, 6) or a {size} mask")
    if mask.shape != size:
        raise InputError(
            f"volume {k}: its map is {size} but its ground-truth mask is {mask.shape}; evaluate maps on the "
            "ground truth's voxel grid (explain the scan itself, or resample the map to the mask)"
        )
    if not mask.any():
        raise InputError(f"volume {k} has an empty ground truth (no object voxel inside the volume); drop it")
    return _Truth(np.asarray(boxes, dtype=np.float64).reshape(-1, 6), mask)


def _volume_maps(maps: Any) -> list[np.ndarray]:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    if isinstance(maps, np.ndarray):
        if maps.ndim != 4:
            raise InputError(f"maps must be (N, D, H, W), one volume map per scan; got {maps.shape}")
        return list(maps.astype(np.float64))
    out = [np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float64) for m in maps]
    bad = [k for k, m in enumerate(out) if m.ndim != 3]
    if bad:
        raise InputError(f"maps {bad} are not (D, H, W) volume maps")
    return out


def _sweep_ious(sweep, gt: np.ndarray, n_thr: int) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: IoU of the largest component's box (V1) and the best IoU of any box (V2)."""
    boxes, tidx, largest = sweep
    v1, v2 = np.zeros(n_thr), np.zeros(n_thr)
    if len(boxes):
        ious = iou(boxes[:, None], gt[None]).max(1)
        np.maximum.at(v2, tidx, ious)
        v1[tidx[largest]] = ious[largest]
    return v1, v2


@dataclass(frozen=True)
class _Setting:
    threshold: float
    thresholds: np.ndarray
    tolerance: float


def _scores(maps: list[np.ndarray], truths: list[_Truth], correct, setting: _Setting, shared: bool = False):
    n, ts = len(maps), setting.thresholds
    ious, hits = np.zeros(n), np.zeros(n, dtype=bool)
    v1 = np.zeros((n, len(ts), len(V2_IOUS)), dtype=bool)
    v2 = np.zeros_like(v1)
    deltas = np.array(V2_IOUS)
    cache: dict = {}  # the centre baseline: one sweep per volume shape
    for i, (m, tr) in enumerate(zip(maps, truths, strict=True)):
        box = box_of_map(m, setting.threshold)
        if box[0] >= 0 and len(tr.boxes):
            ious[i] = iou(box[None], tr.boxes).max()
        hits[i] = pointing_game_hit(m, tr.mask, setting.tolerance)
        key = m.shape if shared else None
        sweep = cache.get(key) if key is not None else None
        if sweep is None:
            sweep = sweep_components(m, ts)
            if key is not None:
                cache[key] = sweep
        b1, b2 = _sweep_ious(sweep, tr.boxes, len(ts))
        v1[i], v2[i] = b1[:, None] >= deltas[None], b2[:, None] >= deltas[None]
    energy = [
        float(energy_share(torch.from_numpy(m)[None], torch.from_numpy(tr.mask)[None])[0])
        for m, tr in zip(maps, truths, strict=True)
    ]
    acc1, acc2 = v1.mean(0), v2.mean(0)  # (T, 3)
    d05 = V2_IOUS.index(0.5)
    out = {
        "gt_known_loc": float((ious >= 0.5).mean()),
        "mean_iou": float(ious.mean()),
        "pointing_game": float(hits.mean()),
        "energy_pointing": float(np.mean(energy)),
        "maxboxacc": float(acc1[:, d05].max()),
        "maxboxacc_v2": float(acc2.max(0).mean()),
        "top1_loc": float("nan"),
    }
    if correct is not None and not np.isnan(correct).all():
        known = ~np.isnan(correct)
        out["top1_loc"] = float(((correct[known] > 0) & (ious[known] >= 0.5)).mean())
    return out, acc1, acc2, float(ts[int(np.argmax(acc1[:, d05]))]), ious


@dataclass
class VolumeLocalizationReport(LocalizationReport):
    """:class:`~camlens.metrics.loceval.LocalizationReport` of volume maps: the same fields, plus
    ``energy_pointing`` in ``metrics`` / ``baseline``; the tolerance is in voxels."""

    ITEMS: ClassVar[str] = "volumes"
    UNIT: ClassVar[str] = "voxels"
    LABELS: ClassVar[dict[str, str]] = {
        "top1_loc": "top-1 loc. acc. (class & 3-D IoU>=0.5)",
        "gt_known_loc": "GT-known loc. acc. (3-D IoU>=0.5)",
        "mean_iou": "mean 3-D IoU",
        "pointing_game": "pointing game",
        "energy_pointing": "energy pointing game",
        "maxboxacc": "MaxBoxAcc (IoU>=0.5)",
        "maxboxacc_v2": "MaxBoxAccV2 (IoU .3/.5/.7)",
    }

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "spatial_dims": 3}


def evaluate_volumes(
    maps: Any,
    ground_truth: Sequence[Any],
    *,
    correct: Sequence[bool | float | None] | np.ndarray | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    thresholds: Sequence[float] | None = None,
    tolerance: float = POINTING_TOLERANCE_3D,
    name: str = "method",
) -> VolumeLocalizationReport:
    """3-D localization metrics of one map per volume against its ground truth (see the module doc).

    Args:
        maps: ``(N, D, H, W)`` array/tensor or a list of ``(D, H, W)`` maps (the ground-truth class's).
        ground_truth: per volume, boxes ``(M, 6)`` / ``(6,)``, a ``(D, H, W)`` mask (bool, or any
            array of that shape), or a :class:`GTVolume`.
        correct: per volume whether the top-1 class is the ground-truth class (for top-1 loc.).
        threshold: fraction of the max for the fixed-threshold metrics.
        thresholds: the MaxBoxAcc sweep (default τ = 0, 0.01, …, 0.99).
        tolerance: pointing-game tolerance in voxels (strictly below; 0: on the object).
    """
    ms = _volume_maps(maps)
    if not ms:
        raise InputError("no maps to evaluate")
    if len(ground_truth) != len(ms):
        raise InputError(f"{len(ms)} maps but {len(ground_truth)} ground-truth entries; give one per volume")
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0 voxels, not {tolerance}")
    truths = [_truth(g, m.shape, k) for k, (g, m) in enumerate(zip(ground_truth, ms, strict=True))]
    ts = SWEEP if thresholds is None else np.asarray([_check_threshold(x) for x in thresholds])
    setting = _Setting(_check_threshold(threshold), ts, float(tolerance))
    c = None
    if correct is not None:
        c = np.array([np.nan if v is None else float(v) for v in correct], dtype=float)
        if len(c) != len(ms):
            raise InputError(f"{len(ms)} maps but {len(c)} entries in correct")
    mine, acc1, acc2, best, ious = _scores(ms, truths, c, setting)
    by_shape: dict = {}
    base_maps = [by_shape.setdefault(m.shape, centre_volume(m.shape)) for m in ms]
    base, _, bacc2, _, _ = _scores(base_maps, truths, c, setting, shared=True)
    note = "" if c is not None else "no top-1 correctness was given (correct=None); the GT-known figures do not need it"
    return VolumeLocalizationReport(
        n=len(ms),
        threshold=setting.threshold,
        metrics=mine,
        baseline=base,
        best_threshold=best,
        thresholds=ts,
        curve=acc2,
        baseline_curve=bacc2,
        curve_v1=acc1,
        tolerance=setting.tolerance,
        name=name,
        per_image_iou=ious,
        top1_note=note,
    )


# --------------------------------------------------------------------------------------------
# End to end: a 3-D model, a method and a ground-truth file
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeEvalConfig:
    """How :func:`evaluate_volume_model` explains and scores: the method (and its layer and
    options), the CT ``window`` applied to NIfTI scans, and the metrics' threshold, sweep and
    pointing tolerance (voxels)."""

    method: str = "gradcam"
    layer: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    window: str | tuple[float, float] | None = None
    threshold: float = DEFAULT_THRESHOLD
    thresholds: Sequence[float] | None = None
    tolerance: float = POINTING_TOLERANCE_3D


def load_scan(path: str | Path, channels: int = 1, window: str | tuple[float, float] | None = None) -> torch.Tensor:
    """A scan as the ``(1, C, D, H, W)`` batch a 3-D model takes: NIfTI (through ``window``, axes as
    :meth:`camlens.base.nifti.Volume.tensor`) or ``.npy`` ``(D, H, W)``, its one channel repeated to
    ``channels`` (the model's first convolution's)."""
    p = Path(path)
    if is_nifti(p):
        x = read_nifti(p).tensor(window)
    elif p.suffix.lower() == ".npy" and p.is_file():
        arr = np.load(p, allow_pickle=False)
        if arr.ndim != 3:
            raise InputError(f"{p}: a .npy scan must be (D, H, W); got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    else:
        raise InputError(f"{p}: not a NIfTI (.nii, .nii.gz) or .npy scan, or no such file")
    return x.expand(-1, channels, -1, -1, -1)


def _in_channels(model: torch.nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 1


def _target(name: str | None, class_names: Sequence[str] | None) -> int | None:
    if name is None:
        return None
    low = [c.lower() for c in class_names or []]
    if name.lower() in low:
        return low.index(name.lower())
    return int(name) if name.isdigit() else None


def evaluate_volume_model(
    model: torch.nn.Module,
    ground_truth: Sequence[GTVolume],
    config: VolumeEvalConfig | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> VolumeLocalizationReport:
    """Explain every ground-truth scan (:func:`read_volume_boxes`, or :class:`GTVolume` objects with
    masks) and evaluate its map (see the module doc), one scan at a time.

    The map explained is the ground-truth class's (the first box's class, matched to
    ``class_names`` case-insensitively or given as an id); a scan without a known class is explained
    for the model's top-1 class and left out of top-1 localization accuracy.
    """
    cfg = config or VolumeEvalConfig()
    channels = _in_channels(model)
    device = next(model.parameters()).device
    maps, truths, correct = [], [], []
    for g in ground_truth:
        x = load_scan(g.path, channels, cfg.window).to(device)
        cls = next((c for c, _ in g.objects if c is not None), None)
        cid = _target(cls, class_names)
        exp = explain(model, x, cfg.method, targets=cid, layer=cfg.layer, class_names=class_names, **cfg.options)
        top1 = int(exp.logits.argmax(1)[0]) if exp.logits is not None else None
        correct.append(np.nan if cid is None or top1 is None else float(cid == top1))
        maps.append(exp.map(0, 0).float().cpu().numpy())
        truths.append(GTVolume(g.path, [o for o in g.objects if cls is None or o[0] == cls], g.mask))
    return evaluate_volumes(
        maps,
        truths,
        correct=correct,
        threshold=cfg.threshold,
        thresholds=cfg.thresholds,
        tolerance=cfg.tolerance,
        name=cfg.method,
    )


__all__ = [
    "POINTING_TOLERANCE_3D",
    "GTVolume",
    "VolumeEvalConfig",
    "VolumeLocalizationReport",
    "centre_volume",
    "evaluate_volume_model",
    "evaluate_volumes",
    "load_scan",
    "mask_boxes",
    "read_volume_boxes",
    "read_volume_mask",
]
