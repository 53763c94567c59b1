"""Heatmap -> bounding box: weakly supervised localization as in the CAM paper.

For each map ``s`` of shape ``(H, W)``:

1. threshold at a fraction ``t`` of the map's maximum: ``M = {p : s(p) > t * max(s)}``
   (strict ``>``, like OpenCV's ``THRESH_BINARY`` in the notebooks; pixels with ``s <= 0`` are
   never selected, so negative evidence does not count);
2. split ``M`` into connected components with **8-connectivity** (a pixel touches its 8 neighbours,
   as OpenCV's outer contours do);
3. keep the largest component (pixel count) — or, with ``mode="all"``, every component of at least
   ``min_area`` pixels — and return its bounding rectangle ``(x0, y0, x1, y1)``, ``x1``/``y1``
   **exclusive** (``M[y0:y1, x0:x1]`` holds the component).

A map whose maximum is ``<= 0`` (empty, all zeros, all negative) or that is not finite gives
``(-1, -1, -1, -1)``.

Default threshold: :data:`DEFAULT_THRESHOLD` = 0.3 of the max, the tutorial notebooks' value. The CAM
paper (Zhou et al., CVPR 2016) used 0.2 and Grad-CAM (Selvaraju et al., ICCV 2017) 0.15; on maps
upsampled from coarse (7x7) features those lower cuts tend to box most of the image (on the bundled cat
photo EfficientNet-Lite0's Grad-CAM box covers 92% of the width at 0.2 and hugs the cat at 0.3), and
on synthetic shapes with a small CNN 0.3 gives about twice the IoU>=0.5 rate of 0.2. No single value
is right everywhere (Choe et al., CVPR 2020): calibrate one on your validation set with
:func:`camlens.metrics.loceval.calibrate_threshold` (``camlens localize --gt BOXES --calibrate FILE``).

Ties between components of equal area are broken by the larger sum of map values inside them,
then by raster order (the component whose first pixel comes first row by row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from camlens.base.errors import InputError

#: fraction of each map's maximum used to binarize it (the notebooks' 30%; CAM paper 20%, Grad-CAM 15%)
DEFAULT_THRESHOLD = 0.3
#: 8-connectivity structuring element
_STRUCTURE = np.ones((3, 3), dtype=bool)
#: 26-connectivity for volumes: a voxel touches the 26 voxels of its 3x3x3 neighbourhood
_STRUCTURE_3D = np.ones((3, 3, 3), dtype=bool)
EMPTY_BOX = (-1, -1, -1, -1)
EMPTY_BOX_3D = (-1, -1, -1, -1, -1, -1)


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise InputError(
            f"spatial_dims must be 2 (maps (..., H, W)) or 3 (volumes (..., D, H, W)), not {spatial_dims!r}"
        )
    return int(spatial_dims)


def _as_numpy(maps, spatial_dims: int = 2) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    arr = np.asarray(maps)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"maps must be a numeric array or tensor, not {arr.dtype}")
    if arr.ndim < spatial_dims:
        axes = "(..., H, W)" if spatial_dims == 2 else "(..., D, H, W)"
        raise InputError(f"maps must have shape {axes}; got {arr.shape}")
    return arr


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 <= t < 1.0:
        raise InputError(
            f"threshold={threshold} is not a fraction of the map's maximum in [0, 1); try 0.3 (the default)"
        )
    return t


def components(mask: np.ndarray, weights: np.ndarray | None = None) -> list[tuple[int, float, tuple]]:
    """8-connected components of a 2-D boolean mask (26-connected of a 3-D one), largest first.

    Returns ``[(area, mass, (x0, y0, x1, y1)), …]`` (3-D: ``(x0, y0, z0, x1, y1, z1)``, ``z`` the
    first axis) sorted by area, then mass (sum of ``weights``), then raster order.
    """
    labels, n = ndimage.label(mask, structure=_STRUCTURE if mask.ndim == 2 else _STRUCTURE_3D)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    if weights is not None:
        mass = np.bincount(labels.ravel(), weights=weights.ravel().astype(np.float64), minlength=n + 1)[1:]
    else:
        mass = areas.astype(np.float64)
    slices = ndimage.find_objects(labels)
    out = []
    for i, a, m, sl in zip(idx, areas, mass, slices, strict=True):
        axes = sl[::-1]  # x first: (xs, ys) or (xs, ys, zs)
        out.append((int(a), float(m), (*(s.start for s in axes), *(s.stop for s in axes)), int(i)))
    out.sort(key=lambda r: (-r[0], -r[1], r[3]))  # label order == raster order of first pixels
    return [r[:3] for r in out]


def box_of_map(
    m: np.ndarray, threshold: float = DEFAULT_THRESHOLD, *, mode: str = "largest", min_area: int = 1
) -> np.ndarray:
    """Boxes of one ``(H, W)`` map: ``(4,)`` for ``mode="largest"``, ``(M, 4)`` for ``mode="all"``;
    of one ``(D, H, W)`` volume: ``(6,)`` / ``(M, 6)`` as ``(x0, y0, z0, x1, y1, z1)``."""
    m = np.asarray(m, dtype=np.float64)
    empty = EMPTY_BOX if m.ndim == 2 else EMPTY_BOX_3D
    peak = m.max() if m.size else 0.0
    if not np.isfinite(m).all() or peak <= 0:
        comps = []
    else:
        comps = components(m > threshold * peak, m)
        comps = [c for c in comps if c[0] >= min_area]
    if mode == "largest":
        return np.array(comps[0][2] if comps else empty, dtype=np.int64)
    return np.array([c[2] for c in comps], dtype=np.int64).reshape(-1, len(empty))


def localize(
    maps,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    mode: str = "largest",
    min_area: int = 1,
    spatial_dims: int = 2,
) -> np.ndarray:
    """Bounding boxes of heatmaps: ``(..., H, W)`` -> int64 ``(..., 4)`` as ``(x0, y0, x1, y1)``;
    with ``spatial_dims=3``, of volumes ``(..., D, H, W)`` -> ``(..., 6)`` as
    ``(x0, y0, z0, x1, y1, z1)`` (``z`` indexes ``D``; ends exclusive; 26-connected components).

    Args:
        maps: array or tensor ``(..., H, W)`` (any device; un-normalized maps are fine, only the
            ratio to each map's own maximum matters).
        threshold: keep pixels ``> threshold * max`` of their map; in ``[0, 1)``. Default
            :data:`DEFAULT_THRESHOLD` (0.3).
        mode: ``"largest"``: the largest 8-connected component's box, shape ``(..., 4)``;
            ``"all"``: the boxes of every component with at least ``min_area`` pixels, largest
            first, shape ``(..., M, 4)`` where ``M`` is the most any map has (at least 1) and
            missing rows are ``-1``.
        min_area: components smaller than this (pixels) are ignored; a map with none left gives -1.
        spatial_dims: 2 (maps ``(..., H, W)``) or 3 (volumes and clips ``(..., D, H, W)``, the maps
            of :func:`camlens.explain` on ``(N, C, D, H, W)`` inputs; ``Explanation.boxes()`` passes it).

    Returns:
        int64 numpy array; empty or non-positive maps give ``(-1, -1, -1, -1)``.
        Coordinates are in the maps' pixel frame: use :func:`scale_boxes` for the original image.
    """
    if mode not in ("largest", "all"):
        raise InputError(f"mode must be 'largest' or 'all', not {mode!r}")
    if int(min_area) < 1:
        raise InputError(f"min_area must be at least 1 pixel, got {min_area}")
    t = _check_threshold(threshold)
    nd = _check_spatial_dims(spatial_dims)
    arr = _as_numpy(maps, nd)
    lead = arr.shape[:-nd]
    flat = arr.reshape(-1, *arr.shape[-nd:])
    per = [box_of_map(m, t, mode=mode, min_area=int(min_area)) for m in flat]
    width = 2 * nd  # (x0, y0, x1, y1) or (x0, y0, z0, x1, y1, z1)
    if mode == "largest":
        return np.stack(per).reshape(*lead, width) if per else np.zeros((*lead, width), dtype=np.int64)
    most = max([len(b) for b in per] + [1])
    out = np.full((len(per), most, width), -1, dtype=np.int64)
    for i, b in enumerate(per):
        out[i, : len(b)] = b
    return out.reshape(*lead, most, width)


def box_area(boxes) -> np.ndarray:
    """Areas of ``(..., 4)`` boxes (exclusive ends); empty (-1) boxes have area 0. Volumes of
    ``(..., 6)`` 3-D boxes ``(x0, y0, z0, x1, y1, z1)``."""
    b = np.asarray(boxes, dtype=np.float64)
    nd = b.shape[-1] // 2
    out = np.ones(b.shape[:-1])
    for a in range(nd):
        out = out * np.clip(b[..., nd + a] - b[..., a], 0, None)
    valid = (b >= 0).all(-1)
    return np.where(valid, out, 0.0)


def iou(a, b) -> np.ndarray:
    """Intersection over union of boxes ``(..., 4)`` (or 3-D boxes ``(..., 6)``), broadcasting over
    the leading dimensions.

    ``IoU = |A ∩ B| / |A ∪ B|`` with exclusive ends; any empty box (``-1``) gives 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[-1:] != b.shape[-1:] or a.shape[-1:] not in ((4,), (6,)):
        raise InputError(f"boxes must have shape (..., 4) (or (..., 6) in 3-D); got {a.shape} and {b.shape}")
    nd = a.shape[-1] // 2
    overlap = np.ones(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]))
    for ax in range(nd):
        hi = np.minimum(a[..., nd + ax], b[..., nd + ax])
        overlap = overlap * np.clip(hi - np.maximum(a[..., ax], b[..., ax]), 0, None)
    valid = (a >= 0).all(-1) & (b >= 0).all(-1)
    inter = np.where(valid, overlap, 0.0)
    union = box_area(a) + box_area(b) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def scale_boxes(boxes, from_size: Sequence[int], to_size: Sequence[int]) -> np.ndarray:
    """Map boxes from a ``(H, W)`` frame (the model input / maps) to another ``(H, W)`` (the image).

    With camlens' default *stretch* preprocessing each axis scales by its own factor:
    ``x' = x * W'/W``, ``y' = y * H'/H``; starts are floored and ends ceiled (the scaled box
    covers the original pixels), then clipped to the image. ``-1`` boxes stay ``-1``.
    (For ``resize="center_crop"`` preprocessing this is not valid: the crop discards borders.)
    """
    b = np.asarray(boxes)
    (h0, w0), (h1, w1) = from_size, to_size
    sx, sy = w1 / w0, h1 / h0
    out = np.empty(b.shape, dtype=np.int64)
    out[..., 0] = np.floor(b[..., 0] * sx + 1e-9)
    out[..., 1] = np.floor(b[..., 1] * sy + 1e-9)
    out[..., 2] = np.ceil(b[..., 2] * sx - 1e-9)
    out[..., 3] = np.ceil(b[..., 3] * sy - 1e-9)
    out[..., 0::2] = out[..., 0::2].clip(0, w1)
    out[..., 1::2] = out[..., 1::2].clip(0, h1)
    empty = (b < 0).any(-1)
    out[empty] = -1
    return out


class Boxes(np.ndarray):
    """An int64 array of boxes ``(..., 4)`` as ``(x0, y0, x1, y1)`` (exclusive ends, ``-1``: none)
    that says which pixel frame it is in.

    Attributes:
        frame: ``"image"`` — each original image's own pixels (the boxes of image ``i`` are in an
            image of ``sizes[i]``); ``"input"`` — the model-input pixels of the maps (``exp.maps``).
        sizes: per image, the ``(H, W)`` of that frame (``(D, H, W)`` for volumes, whose boxes are
            ``(..., 6)`` as ``(x0, y0, z0, x1, y1, z1)`` in voxels).
    """

    frame: str
    sizes: list[tuple[int, ...]]

    def __new__(cls, arr, frame: str, sizes: Sequence[tuple[int, ...]]) -> Boxes:
        obj = np.asarray(arr, dtype=np.int64).view(cls)
        obj.frame = frame
        obj.sizes = [tuple(int(v) for v in s) for s in sizes]
        return obj

    def __array_finalize__(self, obj) -> None:
        self.frame = getattr(obj, "frame", "input")
        self.sizes = getattr(obj, "sizes", [])

    def __reduce__(self):  # pickling keeps the frame
        return (Boxes, (np.asarray(self), self.frame, self.sizes))

    def __repr__(self) -> str:
        return f"Boxes(frame={self.frame!r}, {np.asarray(self)!r})"


def map_boxes(exp, threshold: float = DEFAULT_THRESHOLD, **kwargs) -> np.ndarray:
    """:func:`localize` of an :class:`~camlens.Explanation`'s maps, in the maps' frame: ``(N, K, 4)``
    (``(N, K, M, 4)`` with ``mode="all"``). Lazy maps (see :attr:`~camlens.Explanation.maps`) are
    computed one image at a time, so that their memory is one image's, not the batch's."""
    if not getattr(exp, "lazy", False) or len(exp) == 0:
        return localize(exp.maps, threshold, **kwargs)
    per = [localize(exp.image_maps(i), threshold, **kwargs) for i in range(len(exp))]
    if per[0].ndim == 3:  # mode="all": pad every image's rows to the most boxes of any map
        most = max(p.shape[1] for p in per)
        out = np.full((len(per), per[0].shape[0], most, per[0].shape[-1]), -1, dtype=np.int64)
        for i, p in enumerate(per):
            out[i, :, : p.shape[1]] = p
        return out
    return np.stack(per)


def photo_sizes(exp) -> list[tuple[int, int]] | None:
    """Each explained photo's own ``(H, W)``: ``extras["image_sizes"]`` when given (an image decoded
    reduced, a detector's batch of different sizes), else the held images' shapes; ``None`` without
    images (tensor inputs)."""
    if not exp.images:
        return None
    sizes = exp.extras.get("image_sizes")
    if sizes is not None and len(sizes) == len(exp.images):
        return [(int(s[0]), int(s[1])) for s in sizes]
    return [(int(img.shape[0]), int(img.shape[1])) for img in exp.images]


def explanation_boxes(exp, threshold: float = DEFAULT_THRESHOLD, *, frame: str = "auto", **kwargs) -> Boxes:
    """Boxes of an :class:`~camlens.Explanation` as :class:`Boxes` ``(N, K, 4)`` (``(N, K, M, 4)``
    with ``mode="all"``).

    ``frame="auto"``: original-image pixels when the explanation holds its images (inputs given as
    paths, PIL images or arrays), else model-input pixels; ``"image"`` insists on image pixels;
    ``"input"`` (or ``"map"``) gives model-input / map pixels. The result's ``frame`` says which.
    """
    if frame not in ("auto", "image", "input", "map"):
        raise InputError(f"frame must be 'auto', 'image' or 'input' (model-input / map pixels), not {frame!r}")
    nd = getattr(exp, "spatial_dims", 2)
    if nd == 3:  # volumes and clips: (N, K, 6) boxes in voxels of the maps (the model's input)
        if frame == "image":
            raise InputError("volume and clip maps have no image frame: their boxes are in voxels; ask frame='input'")
        b = map_boxes(exp, threshold, spatial_dims=3, **kwargs)
        return Boxes(b, "input", [tuple(int(s) for s in exp.shape[2:])] * len(b))
    b = map_boxes(exp, threshold, **kwargs)
    size = tuple(int(s) for s in exp.shape[-2:])
    if frame == "image" and not exp.images:
        raise InputError(
            "boxes in image pixels need the original images: explain image paths, PIL images or arrays "
            "(not a preprocessed tensor), or ask for frame='input'"
        )
    if frame in ("input", "map") or not exp.images:
        return Boxes(b, "input", [(int(size[0]), int(size[1]))] * len(b))
    sizes = photo_sizes(exp) or []
    return Boxes(np.stack([scale_boxes(bi, size, s) for bi, s in zip(b, sizes, strict=True)]), "image", sizes)


def image_boxes(exp, threshold: float = DEFAULT_THRESHOLD, **kwargs) -> list[np.ndarray]:
    """Boxes of an :class:`~camlens.Explanation` in each *original* image's pixel frame.

    Returns one ``(K, 4)`` (or ``(K, M, 4)`` with ``mode="all"``) array per image. Without
    original images (tensor inputs) the boxes stay in the maps' frame.
    """
    b = map_boxes(exp, threshold, **kwargs)
    size = tuple(exp.shape[-2:])
    sizes = photo_sizes(exp)
    if sizes is None:
        return list(b)
    return [scale_boxes(bi, size, s) for bi, s in zip(b, sizes, strict=True)]


def centre_box(size: Sequence[int], fraction: float = 0.5) -> np.ndarray:
    """The box centred in an ``(H, W)`` frame spanning ``fraction`` of each side."""
    h, w = size
    bw, bh = w * fraction, h * fraction
    return np.array(
        [round((w - bw) / 2), round((h - bh) / 2), round((w + bw) / 2), round((h + bh) / 2)], dtype=np.int64
    )


def draw_boxes(
    image: np.ndarray,
    boxes,
    *,
    color: tuple[int, int, int] | Sequence[tuple[int, int, int]] = (0, 255, 0),
    width: int | None = None,
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """A copy of an ``(H, W, 3)`` uint8 image with rectangles drawn (``-1`` boxes are skipped).

    The rectangle's outer edge follows the box exactly: pixels ``x0`` and ``x1 - 1`` are on it.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(img)
    bs = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if width is None:
        width = max(1, round(max(img.size) / 150))
    colors: list[Any] = [color] * len(bs) if isinstance(color[0], (int, np.integer)) else list(color)
    font = None
    if labels is not None:
        try:
            font = ImageFont.load_default(size=max(10, round(max(img.size) / 32)))
        except TypeError:  # Pillow < 10.1: fixed-size bitmap font
            font = ImageFont.load_default()
    for i, b in enumerate(bs):
        if (b < 0).any() or b[2] <= b[0] or b[3] <= b[1]:
            continue
        c = tuple(int(v) for v in colors[i % len(colors)])
        draw.rectangle([int(b[0]), int(b[1]), int(b[2]) - 1, int(b[3]) - 1], outline=c, width=width)
        if labels is not None and i < len(labels) and labels[i]:
            # the label on a filled tab inside the box's top-left corner, dark or light text by contrast
            x, y = int(b[0]) + width, int(b[1]) + width
            _, _, r, bt = draw.textbbox((x + 2, y + 1), str(labels[i]), font=font)
            draw.rectangle([x, y, r + 2, bt + 2], fill=c)
            ink = (0, 0, 0) if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 else (255, 255, 255)
            draw.text((x + 2, y + 1), str(labels[i]), fill=ink, font=font)
    return np.asarray(img)


# --------------------------------------------------------------------------------------------
# The pointing game: one definition for camlens.metrics and camlens.metrics.loceval
# --------------------------------------------------------------------------------------------
def box_mask(boxes, size: Sequence[int]) -> np.ndarray:
    """``(H, W)`` bool mask of the pixels covered by boxes ``(M, 4)`` ``(x0, y0, x1, y1)`` with
    exclusive ``x1, y1``: columns ``floor(x0) .. ceil(x1) - 1``, rows likewise, clipped to the image.
    With a ``(D, H, W)`` size, the ``(D, H, W)`` mask of 3-D boxes ``(M, 6)`` ``(x0, y0, z0, x1, y1, z1)``."""
    dims = tuple(int(v) for v in size)
    nd = len(dims)
    if nd not in (2, 3):
        raise InputError(f"box_mask needs an (H, W) or (D, H, W) size, not {size!r}")
    m = np.zeros(dims, dtype=bool)
    for b in np.asarray(boxes, dtype=np.float64).reshape(-1, 2 * nd):
        # box axis a (x, y, z) is array axis nd - 1 - a
        lo = [max(0, int(np.floor(b[a]))) for a in range(nd)]
        hi = [min(dims[nd - 1 - a], int(np.ceil(b[nd + a]))) for a in range(nd)]
        if all(h > lo_ for lo_, h in zip(lo, hi, strict=True)):
            m[tuple(slice(lo[a], hi[a]) for a in reversed(range(nd)))] = True
    return m


def pointing_game_hit(m: np.ndarray, gt: np.ndarray, tolerance: float) -> bool:
    r"""Whether map ``m`` ``(h, w)`` points at the object ``gt`` (an ``(H, W)`` bool mask in image pixels);
    in 3-D, whether a ``(d, h, w)`` map points at a ``(D, H, W)`` mask (the same protocol in voxels).

    TorchRay's protocol (Fong, Patrick & Vedaldi; the benchmark of Zhang et al., ECCV 2016): the
    maximum of the map is an integer pixel :math:`p` of the image, and it is a hit when
    :math:`\min_{q \in \mathrm{GT}} \lVert p - q \rVert_2 < \mathrm{tolerance}` over the object's
    integer pixels, **strictly** below (a peak 11 px right and 11 px down of a box corner is
    :math:`\sqrt{242} \approx 15.56` px away: a miss at 15). ``tolerance = 0``: the maximum must lie
    on the object (distance 0 is always a hit). A map smaller than the image maps each pixel to the
    image pixel holding its centre, ``floor((x + 0.5) W / w)`` (per axis, also in depth).

    **Tied maxima**: a hit when *any* tied maximum hits (Quantus' rule; no randomness, no raster
    order). A constant map (all zeros, say) points nowhere and is a miss, as is a map that is not
    finite or an empty ``gt``.
    """
    m = np.asarray(m)
    if m.ndim != gt.ndim:
        raise InputError(f"a {m.ndim}-D map cannot point into a {gt.ndim}-D ground truth {gt.shape}")
    if not gt.any() or m.size == 0 or not np.isfinite(m).all():
        return False
    top = m.max()
    if m.min() == top:
        return False
    # each tied maximum -> the ground-truth pixel (voxel) holding its centre, axis by axis
    pts = tuple(
        np.minimum(((i + 0.5) * big / small).astype(np.int64), big - 1)
        for i, small, big in zip(np.nonzero(m == top), m.shape, gt.shape, strict=True)
    )
    if gt[pts].any():
        return True
    if tolerance <= 0:
        return False
    # the nearest object pixel of every pixel (exact Euclidean distance transform of the background)
    near = ndimage.distance_transform_edt(~gt, return_distances=False, return_indices=True)
    d2 = sum((near[a][pts] - pts[a]) ** 2 for a in range(gt.ndim))
    return bool((d2 < float(tolerance) ** 2).any())


__all__ = [
    "DEFAULT_THRESHOLD",
    "box_area",
    "box_mask",
    "box_of_map",
    "centre_box",
    "components",
    "draw_boxes",
    "image_boxes",
    "iou",
    "localize",
    "pointing_game_hit",
    "scale_boxes",
]
