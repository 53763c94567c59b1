"""Synthetic localization data: one shape per image on a textured background, with class, box and mask.

Everything is deterministic from ``seed``. Each image holds exactly one object whose class is its
shape (``circle``, ``square``, ``triangle``, ``cross``, ``diamond``, ``ring``, ``hbar``, ``vbar``);
its colour, size and position are random and independent of the class, so a classifier has to look at
the object's *shape* — which makes CAM-style localization meaningful. The object colour is drawn far
from the background's mean colour, so the object is always clearly visible.

Boxes are ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive, the tight bounding rectangle of
the object's mask (``mask[y0:y1, x0:x1]`` holds every object pixel).
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camlens.base.errors import InputError, OutputExistsError
from camlens.base.fsio import atomic_write, safe_out_dir

#: Shapes this generator can draw (any subset, in any order, can be asked for).
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "hbar", "vbar")
DEFAULT_CLASSES = ("circle", "square", "triangle", "cross")

#: object side as a fraction of the image side (uniform in this range)
SIZE_RANGE = (0.22, 0.45)


@dataclass
class SyntheticArrays:
    """In-memory synthetic data.

    Attributes:
        images: ``(n, H, W, 3)`` uint8 RGB.
        labels: ``(n,)`` int64 class indices into ``classes``.
        boxes: ``(n, 4)`` int64 ``(x0, y0, x1, y1)``, exclusive ends.
        masks: ``(n, H, W)`` bool object masks.
        classes: class names.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class SyntheticDataset:
    """A synthetic dataset written to disk in ImageFolder layout plus ``boxes.csv``.

    Attributes:
        root: dataset folder (``root/<class>/<class>_00000.png``).
        classes: class names in label order: *sorted*, as torchvision's ``ImageFolder`` orders the
            class folders, so ``labels`` here agree with ``ImageFolder(root)``'s targets.
        paths: absolute image paths.
        labels: ``(n,)`` class indices into ``classes``.
        boxes: ``(n, 4)`` int ``(x0, y0, x1, y1)`` exclusive.
        csv: path of ``boxes.csv`` (columns ``path,class,x0,y0,x1,y1``; paths relative to ``root``).
    """

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    boxes: np.ndarray
    csv: Path

    def __len__(self) -> int:
        return len(self.paths)


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str):
        classes = [classes]
    classes = list(classes)
    if not classes:
        raise InputError("classes is empty; pass shape names such as ('circle', 'square')")
    bad = [c for c in classes if c not in SHAPES]
    if bad:
        raise InputError(f"unknown synthetic shape(s) {bad}; choose from {list(SHAPES)}")
    if len(set(classes)) != len(classes):
        raise InputError(f"classes has duplicates: {classes}; pass each shape once")
    return classes


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)`` of a ``size x size`` image (read-only, cached)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def shape_mask(shape: str, size: int, cx: float, cy: float, s: float) -> np.ndarray:
    """Boolean ``(size, size)`` mask of ``shape`` centred at ``(cx, cy)`` with side ``s`` (pixels).

    A pixel ``(x, y)`` is inside when its centre ``(x + 0.5, y + 0.5)`` is inside the shape.
    """
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    h = s / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= h * h) & (d2 >= (0.55 * h) ** 2)
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "triangle":  # apex at the top, base at the bottom
        t = (dy + h) / s  # 0 at the apex row, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    if shape == "cross":
        arm = s / 6.0
        return ((np.abs(dx) <= h) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= h) & (np.abs(dx) <= arm))
    if shape == "hbar":
        return (np.abs(dx) <= h) & (np.abs(dy) <= s / 6.0)
    if shape == "vbar":
        return (np.abs(dy) <= h) & (np.abs(dx) <= s / 6.0)
    raise InputError(f"unknown synthetic shape {shape!r}; choose from {list(SHAPES)}")


def _background(rng: np.random.Generator, size: int, textured: bool) -> np.ndarray:
    base = rng.uniform(70, 185, size=3)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float64).copy()
    if textured:
        yy, xx = (g / size for g in _grid(size))
        for _ in range(3):  # oriented stripes at random frequencies, tinted per channel
            theta = rng.uniform(0, np.pi)
            freq = rng.uniform(2.0, 9.0)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
            img += wave[..., None] * rng.uniform(4, 14, size=3)
        img += rng.normal(0.0, 7.0, size=img.shape)  # grain
    return img


def _object_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    for _ in range(100):
        col = rng.uniform(0, 255, size=3)
        if np.linalg.norm(col - bg_mean) >= 150:
            return col
    # fall back: the colour opposite the background
    return np.where(bg_mean > 127, 15.0, 240.0)


def synthetic_arrays(
    n: int,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    image_size: int = 96,
    seed: int = 0,
    textured: bool = True,
) -> SyntheticArrays:
    """Generate ``n`` images, one object each; labels cycle through ``classes`` (balanced).

    Object side ``s`` is uniform in :data:`SIZE_RANGE` times ``image_size``; the object lies fully
    inside the image at a uniform random position; colour is random, at least 150 (RGB L2) away from
    the background's mean colour. Deterministic from ``seed``.
    """
    classes = _check_classes(classes)
    if int(n) < 0:
        raise InputError(f"n must be >= 0, got {n}")
    if int(image_size) < 16:
        raise InputError(f"image_size must be at least 16 pixels, got {image_size}")
    n, size = int(n), int(image_size)
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(classes)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        img = _background(rng, size, textured)
        s = rng.uniform(*SIZE_RANGE) * size
        h = s / 2.0
        cx = rng.uniform(h + 1, size - h - 1)
        cy = rng.uniform(h + 1, size - h - 1)
        mask = shape_mask(classes[labels[i]], size, cx, cy, s)
        col = _object_colour(rng, img.mean(axis=(0, 1)))
        obj = np.broadcast_to(col, img.shape).astype(np.float64)
        if textured:
            obj = obj + rng.normal(0.0, 6.0, size=img.shape)
        img = np.where(mask[..., None], obj, img)
        images[i] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        masks[i] = mask
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return SyntheticArrays(images=images, labels=labels, boxes=boxes, masks=masks, classes=classes)


def split_seed(seed: int, name: str) -> int:
    """The image seed of a dataset written to a folder called ``name``: ``seed`` mixed with the name.

    ``synthetic("shapes", 10)`` and ``synthetic("val", 5)`` with the same ``seed`` draw from
    independent streams, so a training and a validation split never share an image (with one seed
    for every split they did: ``val/circle/circle_00004.png`` was ``shapes/circle/circle_00004.png``).
    The same ``seed`` and folder name give the same images wherever the folder lies.
    """
    ss = np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])
    return int(ss.generate_state(1, np.uint64)[0])


_GENERATED = re.compile(r"(?P<cls>[a-z]+)_\d{5}\.png")


def _remove_stale(root: Path, keep: set[Path]) -> None:
    """Remove the images an earlier, larger call wrote (``<shape>/<shape>_NNNNN.png`` not in ``keep``).

    Only names this generator writes are touched; a class folder left empty is removed."""
    for shape in SHAPES:
        folder = root / shape
        if folder.is_symlink() or not folder.is_dir():
            continue
        for f in folder.iterdir():
            m = _GENERATED.fullmatch(f.name)
            if m and m["cls"] == shape and f not in keep and (f.is_symlink() or f.is_file()):
                f.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def synthetic(
    root: str | Path,
    n_per_class: int = 50,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    image_size: int = 96,
    seed: int = 0,
    textured: bool = True,
    overwrite: bool = False,
) -> SyntheticDataset:
    """Write a synthetic dataset in ImageFolder layout and a ``boxes.csv`` of ground-truth boxes.

    Layout: ``root/<class>/<class>_00000.png`` … and ``root/boxes.csv`` with columns
    ``path,class,x0,y0,x1,y1`` (``path`` relative to ``root``, ``x1``/``y1`` exclusive).
    The images are ``synthetic_arrays(n_per_class * len(classes), ..., seed=split_seed(seed,
    root.name))``: the folder's name is part of the seed, so two splits written with the same
    ``seed`` (``synthetic("shapes", 10)``, ``synthetic("val", 5)``) never share an image.

    Raises :class:`~camlens.base.errors.OutputExistsError` if ``root`` already holds files that would be
    written, unless ``overwrite=True``; then the dataset is replaced whole: images of an earlier,
    larger call (more per class, or other classes) are removed, so ``root`` holds exactly the new ones.

    Example::

        >>> from camlens.data import synthetic
        >>> train = synthetic("shapes", 10)   # 40 images
        >>> val = synthetic("val", 5)         # 20 others
    """
    from PIL import Image

    classes = _check_classes(classes)
    root = Path(root)
    if int(n_per_class) < 1:
        raise InputError(f"n_per_class must be >= 1, got {n_per_class}")
    arr = synthetic_arrays(
        int(n_per_class) * len(classes),
        classes=classes,
        image_size=image_size,
        seed=split_seed(seed, root.resolve().name),
        textured=textured,
    )
    counters = dict.fromkeys(classes, 0)
    rel_paths = []
    for lab in arr.labels:
        c = classes[lab]
        rel_paths.append(Path(c) / f"{c}_{counters[c]:05d}.png")
        counters[c] += 1
    csv_path = root / "boxes.csv"
    if not overwrite:
        clash = [p for p in [csv_path, *(root / r for r in rel_paths)] if os.path.lexists(p)]
        if clash:
            raise OutputExistsError(
                f"{root} already holds a dataset ({clash[0]} exists); pass overwrite=True to replace it "
                "or choose another folder"
            )
    if overwrite:
        _remove_stale(root, {root / r for r in rel_paths})
    for c in classes:
        safe_out_dir(root / c)
    for rel, img in zip(rel_paths, arr.images, strict=True):  # atomic, never through a link
        save = functools.partial(Image.fromarray(img).save, format="PNG")
        atomic_write(root / rel, save, overwrite=overwrite, fsync=False)
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(["path", "class", "x0", "y0", "x1", "y1"])
    for rel, lab, b in zip(rel_paths, arr.labels, arr.boxes, strict=True):
        w.writerow([rel.as_posix(), classes[lab], *(int(v) for v in b)])
    atomic_write(csv_path, fh.getvalue(), overwrite=overwrite)
    order = sorted(classes)  # ImageFolder's label order
    labels = np.array([order.index(classes[lab]) for lab in arr.labels], dtype=np.int64)
    return SyntheticDataset(
        root=root,
        classes=order,
        paths=[(root / r).resolve() for r in rel_paths],
        labels=labels,
        boxes=arr.boxes.copy(),
        csv=csv_path,
    )
