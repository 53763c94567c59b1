r"""Tetromino benchmark with a known signal, in the style of XAI-TRIS (Clark, Wilming & Haufe,
"XAI-TRIS: Non-linear image benchmarks to quantify false positive post-hoc attribution of feature
importance", Machine Learning 2024).

Each ``S x S`` image (``S = 64``, tetrominoes of four ``S/8``-pixel blocks) is a mix of a *signal*
:math:`s` that decides the class and a *background* :math:`\eta` that does not, each scaled to unit
Frobenius norm:

* ``linear``: :math:`x = \alpha s + (1 - \alpha)\eta`, class 0 a T-tetromino in the top-left quadrant,
  class 1 an L-tetromino in the bottom-right one (the class is a linear function of the pixels);
* ``multiplicative``: :math:`x = (1 - \alpha m) \odot \eta` (:math:`m` the 0/1 pattern), same shapes
  and places (the class is in the *variance* of the pattern's pixels, not their mean);
* ``translated_rotated``: as ``linear`` but each tetromino at a random place and a random multiple of
  90 degrees;
* ``xor``: both tetrominoes present, each with a random sign,
  :math:`x = \alpha(\sigma_T s_T + \sigma_L s_L) + (1 - \alpha)\eta`; class 1 iff the signs differ
  (no single pattern's pixels tell the class).

Backgrounds: ``white`` (i.i.d. standard normal) or ``correlated`` (white noise smoothed by a Gaussian
of :math:`\sigma = 10` pixels, then renormalized). The ground-truth importance mask of an image is
the set of its signal pixels (both tetrominoes for ``xor``). Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from camlens.base.errors import InputError, OutputExistsError
from camlens.base.fsio import atomic_write, safe_out_dir
from camlens.data.synthetic import SyntheticDataset

SCENARIOS = ("linear", "multiplicative", "translated_rotated", "xor")
BACKGROUNDS = ("white", "correlated")
#: the two tetrominoes, as (row, col) blocks
SHAPES = {"T": ((0, 0), (0, 1), (0, 2), (1, 1)), "L": ((0, 0), (1, 0), (2, 0), (2, 1))}
#: default signal weight alpha per scenario
ALPHA = {"linear": 0.5, "multiplicative": 0.6, "translated_rotated": 0.5, "xor": 0.5}


@dataclass
class TetrominoArrays:
    """In memory: ``images`` ``(n, S, S)`` float32 in [-1, 1], ``labels`` ``(n,)``, ``masks`` ``(n, S, S)``
    bool (the signal pixels), ``classes`` (class names in label order)."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class TetrominoDataset(SyntheticDataset):
    """:class:`~camlens.data.SyntheticDataset` (ImageFolder layout, ``boxes.csv``) plus ``masks``
    ``(n, S, S)`` bool aligned with ``paths`` (also saved as ``masks.npy``), ``scenario`` and ``background``."""

    masks: np.ndarray
    scenario: str
    background: str


def _pattern(shape: str, size: int, top: int, left: int, quarter_turns: int = 0) -> np.ndarray:
    blk = size // 8
    grid = np.zeros((3, 3), dtype=bool)
    for r, c in SHAPES[shape]:
        grid[r, c] = True
    grid = np.rot90(grid, quarter_turns)
    rows, cols = np.nonzero(grid)
    grid = grid[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    m = np.zeros((size, size), dtype=bool)
    big = np.kron(grid, np.ones((blk, blk), dtype=bool))
    m[top : top + big.shape[0], left : left + big.shape[1]] = big
    return m


def _unit(a: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(a))
    return a / n if n > 0 else a


def _noise(rng: np.random.Generator, size: int, background: str) -> np.ndarray:
    eta = rng.standard_normal((size, size))
    if background == "correlated":
        eta = ndimage.gaussian_filter(eta, sigma=10, mode="wrap")
    return _unit(eta)


def _signal(rng: np.random.Generator, scenario: str, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(signal s, mask) of one image."""
    blk = size // 8
    fixed = {"T": (blk, blk), "L": (size - 4 * blk, size - 3 * blk)}
    if scenario == "xor":
        t, lm = _pattern("T", size, *fixed["T"]), _pattern("L", size, *fixed["L"])
        signs = rng.choice([-1.0, 1.0], size=2)
        if (signs[0] != signs[1]) != bool(label):
            signs[1] = -signs[1]
        return signs[0] * _unit(t.astype(float)) + signs[1] * _unit(lm.astype(float)), t | lm
    shape = "T" if label == 0 else "L"
    if scenario == "translated_rotated":
        turns = int(rng.integers(4))
        extent = 3 * blk
        top, left = (int(v) for v in rng.integers(0, size - extent + 1, size=2))
        mask = _pattern(shape, size, top, left, turns)
    else:
        mask = _pattern(shape, size, *fixed[shape])
    return _unit(mask.astype(float)), mask


def tetromino_arrays(
    n: int, scenario: str = "linear", background: str = "white", *, seed: int = 0, alpha: float | None = None
) -> TetrominoArrays:
    """``n`` images (classes alternate 0, 1, 0, …) of ``scenario`` on ``background``; see the module docstring."""
    if scenario not in SCENARIOS:
        raise InputError(f"unknown tetromino scenario {scenario!r}; choose from {list(SCENARIOS)}")
    if background not in BACKGROUNDS:
        raise InputError(f"unknown background {background!r}; choose from {list(BACKGROUNDS)}")
    if int(n) < 1:
        raise InputError(f"n must be >= 1, got {n}")
    a = ALPHA[scenario] if alpha is None else float(alpha)
    if not 0 < a < 1:
        raise InputError(f"alpha must be in (0, 1), not {alpha}")
    size = 64
    rng = np.random.default_rng(seed)
    labels = np.arange(int(n), dtype=np.int64) % 2
    images = np.empty((len(labels), size, size))
    masks = np.empty((len(labels), size, size), dtype=bool)
    for i, lab in enumerate(labels):
        s, masks[i] = _signal(rng, scenario, int(lab), size)
        eta = _noise(rng, size, background)
        images[i] = (1 - a * masks[i]) * eta if scenario == "multiplicative" else a * s + (1 - a) * eta
    images /= max(float(np.abs(images).max()), 1e-12)
    classes = ["same_sign", "opposite_sign"] if scenario == "xor" else ["T", "L"]
    return TetrominoArrays(images.astype(np.float32), labels, masks, classes)


def tetromino(
    root: str | Path,
    n_per_class: int = 50,
    *,
    scenario: str = "linear",
    background: str = "white",
    seed: int = 0,
    alpha: float | None = None,
    overwrite: bool = False,
) -> TetrominoDataset:
    """Write a tetromino dataset (grey PNGs, ImageFolder layout, ``boxes.csv`` with each mask's box,
    ``masks.npy``) and return it; raises :class:`~camlens.base.errors.OutputExistsError` if ``root`` holds one."""
    from PIL import Image

    arr = tetromino_arrays(2 * int(n_per_class), scenario, background, seed=seed, alpha=alpha)
    root = Path(root)
    rel = [Path(arr.classes[lab]) / f"{arr.classes[lab]}_{i // 2:05d}.png" for i, lab in enumerate(arr.labels)]
    extra = [root / "boxes.csv", root / "masks.npy"]
    if not overwrite and any(os.path.lexists(p) for p in [*extra, *(root / r for r in rel)]):
        raise OutputExistsError(f"{root} already holds a dataset; pass overwrite=True or choose another folder")
    for c in arr.classes:
        safe_out_dir(root / c)
    grey = np.clip(np.round(127.5 + 127.5 * arr.images), 0, 255).astype(np.uint8)
    for r, img in zip(rel, grey, strict=True):
        save = functools.partial(Image.fromarray(np.repeat(img[..., None], 3, axis=2)).save, format="PNG")
        atomic_write(root / r, save, overwrite=overwrite, fsync=False)
    boxes = np.array([_box(m) for m in arr.masks], dtype=np.int64)
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(["path", "class", "x0", "y0", "x1", "y1"])
    for r, lab, b in zip(rel, arr.labels, boxes, strict=True):
        w.writerow([r.as_posix(), arr.classes[lab], *(int(v) for v in b)])
    atomic_write(root / "boxes.csv", fh.getvalue(), overwrite=overwrite)
    buf = io.BytesIO()
    np.save(buf, arr.masks)
    atomic_write(root / "masks.npy", buf.getvalue(), overwrite=overwrite)
    order = sorted(arr.classes)  # ImageFolder's label order
    labels = np.array([order.index(arr.classes[lab]) for lab in arr.labels], dtype=np.int64)
    paths = [(root / r).resolve() for r in rel]
    return TetrominoDataset(
        root, order, paths, labels, boxes, root / "boxes.csv", arr.masks.copy(), scenario, background
    )


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
