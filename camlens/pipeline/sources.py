"""Dataset inputs for the streaming pipeline: folders, globs, ImageFolder trees, CSV / COCO / VOC
lists, explicit path lists and any ``torch.utils.data.Dataset``.

Every input becomes a map-style dataset whose item ``i`` is a plain ``dict`` decoded and
preprocessed *in the DataLoader worker*: ``x`` (the normalized ``(3, h, w)`` network input), the
original image size, the source, an output stem, an optional label, and ``error`` — a bad file is
not an exception that kills the workers but an item that says what went wrong, so the run reports
it by name, skips it and goes on. :func:`collate` keeps the good items and the failures apart.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from camlens.base.errors import CamlensError, InputError
from camlens.base.io import IMAGE_EXTENSIONS, Decoded, FitSize, decode_image, image_size, sample_image
from camlens.base.names import output_stems
from camlens.core.inputs import check_not_meta
from camlens.models.preprocess import IMAGENET, Preprocess

#: list files read as datasets
LIST_SUFFIXES = (".csv", ".json", ".xml", ".txt")


@dataclass(frozen=True)
class Record:
    """One image of a dataset: ``source`` (a path or ``skimage:NAME``), ``name`` (a unique output
    stem), ``label`` (the class from an ImageFolder tree or a list file, if any) and ``gt`` (the
    position in a ground-truth list, for ``localize --gt``)."""

    source: str
    name: str
    label: str | None = None
    gt: int | None = None


@dataclass
class Batch:
    """A collated batch: the good items stacked in ``x`` and ``failed`` ``(index, source, message)``."""

    x: torch.Tensor | None
    indices: list[int]
    sources: list[str]
    names: list[str]
    sizes: list[tuple[int, ...]]  # (H, W) of each image; (D, H, W) of a volume or clip
    labels: list[str | None]
    gts: list[int | None]
    images: list[np.ndarray] | None
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    forward_args: tuple[Any, ...] = ()  # the model's other inputs, batched along dim 0
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    #: per item, what a volume or clip run stores besides the maps (affine, spacing, timestamps)
    meta: list[dict[str, Any] | None] = field(default_factory=list)
    #: a detector's batch of images of different sizes (:func:`collate_ragged`): ``x`` is then ``None``
    xs: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this on custom batches
        if self.x is not None:
            self.x = self.x.pin_memory()
        if self.xs is not None:
            self.xs = [t.pin_memory() for t in self.xs]
        return self

    def inputs(self, device: torch.device, non_blocking: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """The batch on ``device``: the stacked ``x``, or a detector's list of ``(3, H, W)`` images."""
        if self.xs is not None:
            return [t.to(device, non_blocking=non_blocking) for t in self.xs]
        assert self.x is not None
        return self.x.to(device, non_blocking=non_blocking)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def is_image_folder_tree(folder: Path) -> bool:
    """An ImageFolder tree: no images at the top, images one level down in class sub-folders."""
    if not folder.is_dir() or any(_is_image(f) for f in folder.iterdir()):
        return False
    subs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(subs) and any(_is_image(f) for d in subs for f in d.rglob("*"))


def image_folder_records(folder: Path) -> list[tuple[str, str]]:
    """``(path, class)`` for every image of an ImageFolder tree (classes = sub-folder names, sorted)."""
    out = []
    for d in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        out += [(str(f), d.name) for f in sorted(d.rglob("*")) if _is_image(f)]
    return out


def is_list_file(item: str | os.PathLike) -> bool:
    p = Path(item)
    return p.is_file() and p.suffix.lower() in LIST_SUFFIXES


def _text(path: Path) -> str:
    """A list file's text (UTF-8, a BOM allowed); another encoding is an :class:`InputError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the list file ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: the list file is not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}); "
            "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def read_list(
    path: str | os.PathLike, root: str | os.PathLike | None = None
) -> tuple[list[tuple[str, str | None]], Any]:
    """A list file -> ``([(path, label)], ground truth or None)``.

    * ``.csv`` with a ``path`` column (optional ``label`` or ``class``); with box columns
      ``x0,y0,x1,y1`` it is a ground-truth file (one row per box, see :func:`camlens.metrics.loceval.read_boxes`);
    * ``.json``: COCO; ``.xml``: Pascal VOC (both ground truth);
    * ``.txt``: one path per line.

    Relative paths are resolved against ``root`` or the list file's folder.
    """
    from camlens.metrics.loceval import read_boxes

    p = Path(path)
    base = Path(root) if root is not None else p.parent
    suffix = p.suffix.lower()
    if suffix == ".txt":
        lines = [ln.strip() for ln in _text(p).splitlines() if ln.strip() and not ln.startswith("#")]
        return [(str(base / ln) if not Path(ln).is_absolute() else ln, None) for ln in lines], None
    if suffix == ".csv":
        text = _text(p)
        header = [h.strip() for h in (next(csv.reader(io.StringIO(text, newline="")), None) or [])]
        if "path" not in header:
            raise InputError(f"{p}: an image-list CSV needs a 'path' column (optional 'label'); found {header}")
        if not {"x0", "y0", "x1", "y1"} <= set(header):
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
            out = []
            for r in rows:
                q = Path(r["path"])
                out.append((str(q if q.is_absolute() else base / q), r.get("label") or r.get("class") or None))
            return out, None
    gt = read_boxes(p, root=Path(root) if root is not None else None)
    return [(str(g.path), g.main_class) for g in gt], gt


def records_for(
    items: Sequence[tuple[str, str | None]], gt_positions: Sequence[int | None] | None = None
) -> list[Record]:
    names = output_stems([s for s, _ in items])
    gts = list(gt_positions) if gt_positions is not None else [None] * len(items)
    return [Record(s, n, lab, g) for (s, lab), n, g in zip(items, names, gts, strict=True)]


def discover(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Record], Any]:
    """Python-API inputs -> records: a folder (all images below it; an ImageFolder tree gives labels),
    a glob pattern, a list file (:func:`read_list`) or a list of paths."""
    if isinstance(spec, (list, tuple)):
        return records_for([(str(s), None) for s in spec]), None
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        if is_image_folder_tree(p):
            return records_for(image_folder_records(p)), None
        found = sorted(str(f) for f in p.rglob("*") if _is_image(f))
        if not found:
            raise InputError(f"{p}: no image files in this folder ({', '.join(IMAGE_EXTENSIONS[:6])}…)")
        return records_for([(f, None) for f in found]), None
    if is_list_file(p):
        items, gt = read_list(p)
        return records_for(items, list(range(len(items))) if gt is not None else None), gt
    if p.is_file():
        return records_for([(s, None)]), None
    found = sorted(f for f in glob.glob(s, recursive=True) if _is_image(Path(f)))
    if not found:
        raise InputError(f"{s}: no such file or folder, and no image file matches it as a pattern")
    return records_for([(f, None) for f in found]), None


def _load(source: str, fit: FitSize | None = None) -> Decoded:
    """A record's image decoded for the model (reduced when ``fit`` allows, see
    :func:`camlens.base.io.decode_image`) with the photo's own size."""
    if source.startswith("skimage:"):
        rgb = sample_image(source.split(":", 1)[1])
        return Decoded(rgb, (int(rgb.shape[0]), int(rgb.shape[1])))
    return decode_image(source, fit)


def _prep(pp: Preprocess, img: np.ndarray) -> torch.Tensor:
    """The same arithmetic as ``Preprocess.__call__`` for one image (resize, then normalize)."""
    return pp.normalize(pp.resize_image(img)[None])[0]


class ImageFiles(Dataset):
    """Image records decoded and preprocessed on access (in DataLoader workers).

    A file larger than the preprocessing needs is decoded reduced (a JPEG at 1/2, 1/4 or 1/8 scale
    in the DCT domain; see :func:`camlens.base.io.decode_image`), unless ``exact_decode``; the item's
    ``size`` is the photo's own (its header's), the kept ``image`` (for figures) the decoded one."""

    def __init__(
        self,
        records: Sequence[Record],
        preprocess: Preprocess = IMAGENET,
        keep_images: bool = False,
        exact_decode: bool = False,
    ):
        self.records = list(records)
        self.preprocess = preprocess
        self.keep_images = keep_images
        self.exact_decode = exact_decode

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, i: int) -> Record:
        return self.records[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        item: dict[str, Any] = {"index": i, "source": r.source, "name": r.name, "label": r.label, "gt": r.gt}
        try:
            d = _load(r.source, None if self.exact_decode else self.preprocess.min_decode_size)
            item["x"] = _prep(self.preprocess, d.rgb)
            item["size"] = tuple(d.size)
            item["image"] = d.rgb if self.keep_images else None
        except CamlensError as exc:
            item["error"] = str(exc)
        except Exception as exc:  # a worker must not die on one file: report it by name
            item["error"] = f"{r.source}: {type(exc).__name__}: {exc}"
        return item


def _extra_of(value: Any, i: int) -> tuple[str, Any]:
    """One item's extra model inputs -> ``("args", tuple of tensors)`` or ``("kwargs", dict)``: a
    tensor (or array / number) is one positional input, a tuple or list several, a dict keywords."""

    def one(v: Any, where: str) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v.detach()
        if isinstance(v, (np.ndarray, np.generic, int, float, bool)):
            return torch.as_tensor(v)
        raise InputError(
            f"item {i}: the extra input {where} is a {type(v).__name__}; give a tensor, an array or a number "
            "per item (a tuple of them for several positional inputs, a dict for keyword inputs)"
        )

    if isinstance(value, dict):
        return "kwargs", {str(k): one(v, f"[{k!r}]") for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return "args", tuple(one(v, f"[{j}]") for j, v in enumerate(value))
    return "args", (one(value, ""),)


class UserDataset(Dataset):
    """Adapts a user's ``Dataset``: items may be an image (a path, PIL, HxWx3 array, uint8 CHW tensor,
    or a preprocessed float CHW tensor) or a tuple ``(image, label, …)``. A path is decoded as
    :class:`ImageFiles` decodes it: reduced to what the preprocessing needs unless ``exact_decode``
    (the item's ``size`` is the photo's own, so maps and boxes stay in its pixels); an image the
    dataset already decoded (PIL, array, tensor) is used as it is — a transform of the user's that
    opens the file itself sees the full resolution, camlens cannot reduce its decode. Sources come from
    ``dataset.samples`` / ``dataset.imgs`` (torchvision ImageFolder) when present, else ``item{i}``;
    an int label is named through ``dataset.classes`` when present.

    ``extra_inputs=True``: items are ``(image, extra)`` or ``(image, extra, label)``, where ``extra``
    is the model's other inputs for this image — a tensor (``model(x, extra)``), a tuple of tensors
    (``model(x, *extra)``) or a dict (``model(x, **extra)``); :func:`collate` stacks them along a
    new dim 0 into the batch's ``forward_args`` / ``forward_kwargs``."""

    def __init__(
        self,
        dataset: Any,
        preprocess: Preprocess = IMAGENET,
        keep_images: bool = False,
        extra_inputs: bool = False,
        exact_decode: bool = False,
    ):
        self.dataset = dataset
        self.preprocess = preprocess
        self.keep_images = keep_images
        self.extra_inputs = extra_inputs
        self.exact_decode = exact_decode
        samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
        srcs = [str(s[0]) for s in samples] if samples and len(samples) == len(dataset) else None
        self.sources = srcs or [f"item{i}" for i in range(len(dataset))]
        self.names = output_stems(self.sources) if srcs else list(self.sources)
        self.classes = getattr(dataset, "classes", None)
        self._first_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, i: int) -> Record:
        return Record(self.sources[i], self.names[i])

    def _check_volume(self, x: torch.Tensor, i: int) -> None:
        """A ``(C, D, H, W)`` item must have the first item's shape: the store holds one array."""
        if self._first_shape is None:
            first = self.dataset[0] if i else x
            first = first[0] if isinstance(first, (tuple, list)) else first
            self._first_shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
        if tuple(x.shape) != self._first_shape:
            raise InputError(
                f"item {i}: volume shape {tuple(x.shape)} differs from the first item's {self._first_shape}; "
                "the store holds one array of maps: resize or pad the volumes in the dataset (or give a folder "
                "of NIfTI files, stored padded)"
            )

    def _decode(self, img: Any) -> Decoded:
        """An item's image for the model: a path (``str`` / ``os.PathLike``) decoded reduced when the
        preprocessing allows (as :class:`ImageFiles` does), unless ``exact_decode``; an array, a uint8
        tensor or a PIL image as it is (already decoded, or the user's own object: never reduced)."""
        if isinstance(img, (str, os.PathLike)):
            return decode_image(img, None if self.exact_decode else self.preprocess.min_decode_size)
        return decode_image(img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else img)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": i, "source": self.sources[i], "name": self.names[i], "label": None, "gt": None}
        try:
            got = self.dataset[i]
            if self.extra_inputs:
                if not isinstance(got, (tuple, list)) or len(got) not in (2, 3):
                    raise InputError(
                        f"item {i}: with extra_inputs=True an item must be (image, extra) or (image, extra, label); "
                        f"got {type(got).__name__}"
                        + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else "")
                    )
                item["extra"] = _extra_of(got[1], i)
                got = (got[0], *got[2:])
            img, label = (got[0], got[1] if len(got) > 1 else None) if isinstance(got, (tuple, list)) else (got, None)
            if isinstance(label, torch.Tensor) and label.numel() == 1:
                label = int(label)
            if (
                isinstance(label, (int, np.integer))
                and self.classes is not None
                and 0 <= int(label) < len(self.classes)
            ):
                label = self.classes[int(label)]
            item["label"] = None if label is None else str(label)
            check_not_meta(img)
            if isinstance(img, torch.Tensor) and img.is_floating_point():
                if img.dim() not in (3, 4):
                    raise InputError(
                        f"item {i}: a tensor item must be an image (C, H, W) or a volume (C, D, H, W); "
                        f"got {tuple(img.shape)}"
                    )
                if img.dim() == 4:
                    self._check_volume(img, i)
                item["x"] = img.float()
                item["size"] = tuple(img.shape[1:])
                item["image"] = None
            else:
                d = self._decode(img)
                item["x"] = _prep(self.preprocess, d.rgb)
                item["size"] = tuple(d.size)
                item["image"] = d.rgb if self.keep_images else None
            if not bool(torch.isfinite(item["x"]).all()):
                bad = int((~torch.isfinite(item["x"])).sum())
                raise InputError(f"item {i}: {bad} NaN or infinite value(s) in the image; it is skipped")
        except CamlensError as exc:
            item["error"] = f"{self.sources[i]}: {exc}"
        except Exception as exc:
            item["error"] = f"{self.sources[i]}: {type(exc).__name__}: {exc}"
        return item


def without_store(ds: Dataset, out: str | os.PathLike) -> Dataset:
    """``ds`` without the files inside the result store ``out`` (its figures, when ``--out`` lies in
    the data folder: a store's own PNGs are never inputs). Names are given as if they were absent."""
    if not isinstance(ds, ImageFiles):
        return ds
    root = os.path.join(os.path.abspath(out), "")
    keep = [r for r in ds.records if r.source.startswith("skimage:") or not os.path.abspath(r.source).startswith(root)]
    if len(keep) == len(ds.records):
        return ds
    names = output_stems([r.source for r in keep])
    records = [Record(r.source, n, r.label, r.gt) for r, n in zip(keep, names, strict=True)]
    return ImageFiles(records, ds.preprocess, ds.keep_images, ds.exact_decode)


def image_sizes(dataset: Any) -> list[tuple[int, int] | None]:
    """Each item's image ``(H, W)`` (``None``: unreadable, reported when the run reaches it): from the
    files' headers for :class:`ImageFiles` (nothing decoded), else by reading the items."""
    out: list[tuple[int, int] | None] = []
    for i in range(len(dataset)):
        try:
            src = dataset.describe(i).source if isinstance(dataset, ImageFiles) else None
            if isinstance(src, str) and not src.startswith("skimage:"):
                out.append(image_size(src))
            else:
                size = dataset[i].get("size")
                out.append(tuple(size) if size is not None else None)
        except CamlensError:
            out.append(None)
    return out


def collate_ragged(items: list[dict[str, Any]]) -> Batch:
    """A detector's batch: the good items kept as a list ``xs`` of ``(3, H, W)`` images of any sizes
    (a detector resizes and pads them itself; extra inputs are not taken)."""
    good = [it for it in items if "error" not in it]
    return Batch(
        x=None,
        indices=[it["index"] for it in good],
        sources=[it["source"] for it in good],
        names=[it["name"] for it in good],
        sizes=[tuple(it["size"]) for it in good],
        labels=[it["label"] for it in good],
        gts=[it["gt"] for it in good],
        images=[it["image"] for it in good] if good and all(it.get("image") is not None for it in good) else None,
        failed=[(it["index"], it["source"], it["error"]) for it in items if "error" in it],
        xs=[it["x"] for it in good],
    )


def collate(items: list[dict[str, Any]]) -> Batch:
    good = [it for it in items if "error" not in it]
    failed = [(it["index"], it["source"], it["error"]) for it in items if "error" in it]
    x = None
    if good:
        shapes = {tuple(it["x"].shape) for it in good}
        if len(shapes) > 1:
            # mixed input sizes cannot be batched: fail these items by name instead of a stack trace
            first = tuple(good[0]["x"].shape)
            failed += [
                (it["index"], it["source"], f"{it['source']}: input shape {tuple(it['x'].shape)} differs from {first}")
                for it in good
                if tuple(it["x"].shape) != first
            ]
            good = [it for it in good if tuple(it["x"].shape) == first]
        x = torch.stack([it["x"] for it in good])
    good, args, kwargs = _collate_extra(good, failed)
    if not good:
        x = None
    elif x is not None and len(good) < len(x):
        x = torch.stack([it["x"] for it in good])
    keep = bool(good) and all(it.get("image") is not None for it in good)
    return Batch(
        x=x,
        indices=[it["index"] for it in good],
        sources=[it["source"] for it in good],
        names=[it["name"] for it in good],
        sizes=[tuple(it["size"]) for it in good],
        labels=[it["label"] for it in good],
        gts=[it["gt"] for it in good],
        images=[it["image"] for it in good] if keep else None,
        failed=failed,
        forward_args=args,
        forward_kwargs=kwargs,
        meta=[it.get("meta") for it in good],
    )


def _extra_layout(extra: tuple[str, Any] | None) -> Any:
    """What must agree between the items of a batch: the kind, the keys and every tensor's shape."""
    if extra is None:
        return None
    kind, value = extra
    items = value.items() if kind == "kwargs" else enumerate(value)
    return kind, tuple((k, tuple(v.shape), v.dtype) for k, v in items)


def _collate_extra(good: list[dict[str, Any]], failed: list[tuple[int, str, str]]) -> tuple[list, tuple, dict]:
    """The items' extra inputs stacked along a new dim 0 (``(forward_args, forward_kwargs)``); an
    item whose extra inputs differ in kind, keys, shape or dtype from the first item's fails by name."""
    if not good:
        return good, (), {}
    first = _extra_layout(good[0].get("extra"))
    for it in good[1:]:
        lay = _extra_layout(it.get("extra"))
        if lay != first:
            failed.append((it["index"], it["source"], (
                f"{it['source']}: its extra inputs {_describe(lay)} differ from the first item's {_describe(first)} "
                "in this batch; every item's extra inputs must have the same shapes (pad or resize them in the "
                "dataset)"
            )))  # fmt: skip
    good = [it for it in good if _extra_layout(it.get("extra")) == first]
    if first is None:
        return good, (), {}
    kind, value = good[0]["extra"]
    if kind == "kwargs":
        return good, (), {k: torch.stack([it["extra"][1][k] for it in good]) for k in value}
    return good, tuple(torch.stack([it["extra"][1][j] for it in good]) for j in range(len(value))), {}


def _describe(layout: Any) -> str:
    if layout is None:
        return "(none)"
    kind, parts = layout
    shapes = ", ".join(f"{k!r}: {tuple(s)}" if kind == "kwargs" else str(tuple(s)) for k, s, _ in parts)
    return "{" + shapes + "}" if kind == "kwargs" else "(" + shapes + ")"


def as_dataset(
    data: Any,
    preprocess: Preprocess = IMAGENET,
    keep_images: bool = False,
    exact_decode: bool = False,
    extra_inputs: bool = False,
) -> tuple[Dataset, Any]:
    """Anything the pipeline accepts -> ``(dataset of item dicts, ground truth or None)``; a list
    of images in memory (arrays, PIL images, tensors) is a dataset of them (``exact_decode``: image
    files, and a user dataset's paths, decoded in full, see :class:`ImageFiles`; ``extra_inputs``: a
    user dataset's items carry the model's other inputs, see :class:`UserDataset`)."""
    if isinstance(data, (ImageFiles, UserDataset)):
        return data, None
    if isinstance(data, Dataset) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, list, tuple))
    ):
        return UserDataset(data, preprocess, keep_images, extra_inputs, exact_decode), None
    if isinstance(data, (list, tuple)) and data and not any(isinstance(d, (str, os.PathLike)) for d in data):
        return UserDataset(list(data), preprocess, keep_images, extra_inputs, exact_decode), None  # images in memory
    if extra_inputs:
        raise InputError(
            "extra_inputs=True needs a torch Dataset whose items are (image, extra[, label]); image files and "
            "lists carry no extra inputs"
        )
    records, gt = discover(data)
    return ImageFiles(records, preprocess, keep_images, exact_decode), gt


__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "ImageFiles",
    "Record",
    "UserDataset",
    "as_dataset",
    "collate",
    "collate_ragged",
    "discover",
    "image_folder_records",
    "image_sizes",
    "is_image_folder_tree",
    "is_list_file",
    "output_stems",
    "read_list",
    "records_for",
    "without_store",
]
