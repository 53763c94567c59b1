"""ImageFolder data for fine-tuning: ``root/<class>/<image>``, checked up front.

* Classes are the sub-folders of ``root`` in sorted order (as torchvision's ``ImageFolder``);
  images are found recursively inside each class folder; hidden files and non-image files are
  ignored.
* Every image is decoded once while scanning: unreadable (corrupt, truncated) images are
  *reported and skipped*; small datasets are kept decoded in memory (``cache_bytes``).
* Empty class folders, a single class, and a validation split that leaves a class without
  training or validation images are errors that say what to do.
* Augmentation (training only) is a mild random-resized crop (area 60–100 %, aspect 3/4–4/3)
  and a horizontal flip; its randomness comes from ``(seed, epoch, index)``, so a run is
  reproducible and a resumed run sees the same images as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from camlens.base.errors import CamlensError, ImageLoadError, InputError
from camlens.base.io import IMAGE_EXTENSIONS, load_image
from camlens.models.preprocess import Preprocess


class DataError(CamlensError, ValueError):
    """An ImageFolder dataset that cannot be used for fine-tuning."""


@dataclass
class ImageFolderData:
    """A scanned ImageFolder: readable images, their labels, and what was skipped.

    Attributes:
        root: the folder.
        classes: class names (sorted sub-folder names); ``labels`` index into them.
        paths: readable image files.
        labels: ``(n,)`` int64.
        skipped: ``[(path, reason)]`` for unreadable images.
        arrays: decoded RGB uint8 images kept in memory (``None`` where not cached).
    """

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    arrays: list[np.ndarray | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, c, strict=True)}

    def image(self, i: int) -> np.ndarray:
        a = self.arrays[i] if i < len(self.arrays) else None
        return a if a is not None else load_image(self.paths[i])

    def subset(self, idx: np.ndarray) -> ImageFolderData:
        idx = np.asarray(idx, dtype=np.int64)
        arrays = [self.arrays[i] for i in idx] if self.arrays else []
        return ImageFolderData(self.root, self.classes, [self.paths[i] for i in idx], self.labels[idx], [], arrays)


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def scan_image_folder(
    root: str | os.PathLike, *, cache_bytes: int = 512 * 2**20, min_classes: int = 2
) -> ImageFolderData:
    """Scan ``root/<class>/**/<image>``, decode each image once, skip unreadable ones.

    Raises :class:`DataError` when ``root`` is missing, has no class folders, a class folder has
    no readable image, or there are fewer than ``min_classes`` classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}; pass an ImageFolder root (root/<class>/<image>)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        loose = [p.name for p in root.iterdir() if _is_image(p)][:3]
        extra = (
            f" It holds images directly ({', '.join(loose)}…): move them into one sub-folder per class."
            if loose
            else ""
        )
        raise DataError(f"{root} has no class sub-folders; the layout must be root/<class>/<image>.{extra}")
    paths: list[Path] = []
    labels: list[int] = []
    arrays: list[np.ndarray | None] = []
    skipped: list[tuple[Path, str]] = []
    empty: list[str] = []
    used = 0
    for label, d in enumerate(class_dirs):
        files = sorted(
            p for p in d.rglob("*") if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(d).parts)
        )
        good = 0
        for p in files:
            try:
                img = load_image(p)
            except ImageLoadError as exc:
                skipped.append((p, str(exc)))
                continue
            paths.append(p)
            labels.append(label)
            good += 1
            if used + img.nbytes <= cache_bytes:
                arrays.append(img)
                used += img.nbytes
            else:
                arrays.append(None)
        if good == 0:
            empty.append(d.name + ("" if not files else f" ({len(files)} unreadable)"))
    if empty:
        raise DataError(
            f"{root}: class folder(s) without a readable image: {', '.join(empty)}. Add images "
            f"({', '.join(IMAGE_EXTENSIONS)}) or remove the empty folder(s)."
        )
    if len(class_dirs) < min_classes:
        raise DataError(
            f"{root} has only {len(class_dirs)} class folder ({class_dirs[0].name}); a classifier needs at "
            f"least {min_classes} classes: add one sub-folder of images per class"
        )
    return ImageFolderData(
        root, [d.name for d in class_dirs], paths, np.asarray(labels, dtype=np.int64), skipped, arrays
    )


def stratified_split(data: ImageFolderData, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: ``round(n_c * val_split)`` random images of each class for validation.

    Raises :class:`DataError` if that leaves a class with no training or no validation image.
    """
    if not 0 < val_split < 1:
        raise DataError(f"val_split must be between 0 and 1 (exclusive), not {val_split}; or pass val_dir")
    rng = np.random.default_rng([seed, 0x5EED])
    train, val, bad = [], [], []
    for c, name in enumerate(data.classes):
        idx = np.flatnonzero(data.labels == c)
        n_val = round(len(idx) * val_split)
        if n_val == 0 or n_val == len(idx):
            bad.append(
                f"{name} ({len(idx)} image{'s' if len(idx) != 1 else ''} -> {len(idx) - n_val} train / {n_val} val)"
            )
            continue
        idx = rng.permutation(idx)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    if bad:
        need = math.ceil(1 / min(val_split, 1 - val_split))
        raise DataError(
            f"val_split={val_split} leaves a class with no training or no validation image: "
            f"{'; '.join(bad)}. Give every class at least {need} images, change val_split, or pass a separate val_dir."
        )
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def check_same_classes(train: ImageFolderData, val: ImageFolderData) -> None:
    if train.classes != val.classes:
        missing = sorted(set(train.classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"the validation folder {val.root} must have the same class folders as {train.root}; "
            + (f"missing: {', '.join(missing)}. " if missing else "")
            + (f"not in the training data: {', '.join(extra)}." if extra else "")
        )


def random_resized_crop_box(
    h: int, w: int, rng: np.random.Generator, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop covering ``scale`` of the area with aspect
    ratio in ``ratio`` (log-uniform); the whole image if ten draws fail."""
    area = h * w
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(lo, hi))
        cw, ch = round(math.sqrt(a * r)), round(math.sqrt(a / r))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w


class FolderDataset(torch.utils.data.Dataset):
    """``(x, label, index)`` items: the image resized (stretched) to ``preprocess.size`` and
    normalized; with ``augment``, a random-resized crop and a horizontal flip first."""

    def __init__(self, data: ImageFolderData, preprocess: Preprocess, augment: bool = False, seed: int = 0):
        self.data = data
        self.pp = preprocess
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        img = self.data.image(i)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            top, left, ch, cw = random_resized_crop_box(img.shape[0], img.shape[1], rng)
            img = img[top : top + ch, left : left + cw]
            if rng.random() < 0.5:
                img = img[:, ::-1]
        t = self.pp.resize_image(np.ascontiguousarray(img))
        x = self.pp.normalize(t[None])[0]
        return x, int(self.data.labels[i]), i


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch ``epoch`` (a function of the seed and the epoch only)."""
    return np.random.default_rng([seed, epoch, 0xD47A]).permutation(n).tolist()


def loader(ds: FolderDataset, batch_size: int, order: list[int] | None = None, num_workers: int = 0):
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, not {batch_size}")
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=order if order is not None else range(len(ds)),
        num_workers=num_workers,
        drop_last=False,
    )


__all__ = [
    "DataError",
    "FolderDataset",
    "ImageFolderData",
    "check_same_classes",
    "epoch_order",
    "scan_image_folder",
    "stratified_split",
]
