"""Volumes and clips as dataset inputs: a folder of NIfTI scans (``.nii``, ``.nii.gz``), of DICOM
series (one folder of slices per series) or of video files, read in the DataLoader workers into
``(C, D, H, W)`` items for a 3-D network, with what the store keeps of each: the scan's affine and
voxel spacing, the clip's timestamps.

* **Scans** (NIfTI, DICOM; :mod:`camlens.base.nifti`, :mod:`camlens.base.dicom`): the voxels as
  stored, no resampling (the map's voxel ``(z, y, x)`` is the file's ``(k, j, i)``), optionally through
  a CT ``window``; the single channel repeated to the model's input channels.
* **Clips** (:mod:`camlens.base.video`): ``frames`` frames every ``stride``-th from the start,
  resized to ``size`` and Kinetics-normalized (:meth:`camlens.base.video.Clip.tensor`).

Scans of different shapes are batched with their own shape only (:meth:`VolumeFiles.group_key`:
consecutive items of one input shape share a batch) and stored padded to :attr:`VolumeFiles.map_shape`,
the largest, read from the files' headers before the run (a NIfTI header, the DICOM slices' headers;
a clip's frame count from its stream header, ``frames`` when the container does not say).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from camlens.base.errors import CamlensError, InputError
from camlens.base.names import output_stems
from camlens.base.nifti import Volume, is_nifti, read_nifti
from camlens.base.video import is_video, read_clip
from camlens.pipeline.sources import Record

KINDS = ("nifti", "dicom", "video")


@dataclass(frozen=True)
class VolumeReader:
    """How volume and clip files become model inputs.

    Attributes:
        channels: input channels of the model (a scan's one channel is repeated); ``None``: the
            model's first convolution's (:func:`input_channels`).
        window: CT intensity window of scans (a name of :data:`camlens.base.nifti.WINDOWS` or
            ``(low, high)``), ``None``: the values as stored.
        frames, stride: a clip's frames and the step between them (:func:`camlens.base.video.read_clip`).
        size: a clip's frames resized to ``(H, W)``.
    """

    channels: int | None = None
    window: str | tuple[float, float] | None = None
    frames: int = 16
    stride: int = 1
    size: tuple[int, int] = (112, 112)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def input_channels(model: nn.Module) -> int:
    """The input channels of ``model``'s first convolution (1 without one)."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 1


def _is_dicom_file(p: Path) -> bool:
    if not p.is_file() or p.name.startswith("."):
        return False
    if p.suffix.lower() == ".dcm":
        return True
    if p.suffix:
        return False
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


#: files of a folder looked at to tell a DICOM series (a large image folder costs no more)
SERIES_PROBE = 16


def _is_series(d: Path) -> bool:
    """Whether one of the first :data:`SERIES_PROBE` files of folder ``d`` is a DICOM slice."""
    if not d.is_dir():
        return False
    try:
        with os.scandir(d) as it:
            first = list(itertools.islice((Path(e.path) for e in it if e.is_file()), SERIES_PROBE))
    except OSError:
        return False
    return any(_is_dicom_file(f) for f in first)


def kind_of(source: str | os.PathLike) -> str | None:
    """``"nifti"``, ``"video"``, ``"dicom"`` (a folder of DICOM slices) or ``None``."""
    p = Path(source)
    if is_nifti(p):
        return "nifti"
    if is_video(p):
        return "video"
    return "dicom" if _is_series(p) else None


def _found(folder: Path) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        d = Path(dirpath)
        if d != folder and _is_series(d):
            out.append(str(d))
        out += [str(d / f) for f in sorted(files) if kind_of(d / f) in ("nifti", "video")]
    return sorted(out)


def volume_sources(spec: Any) -> list[str] | None:
    """The volume or clip sources of a dataset spec (a folder, one file or series, or a list of
    them, folders expanded), or ``None`` when it names none (an image dataset)."""
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if kind_of(p) is not None:
            return [str(p)]
        return (_found(p) or None) if p.is_dir() else None
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, (str, os.PathLike)) for s in spec):
        parts = [volume_sources(s) for s in spec]
        if all(part is None for part in parts):
            return None
        bad = [str(s) for s, part in zip(spec, parts, strict=True) if part is None]
        if bad:
            raise InputError(
                f"{bad[0]} is not a NIfTI scan, a DICOM series, a video file or a folder of them, but other "
                "inputs are: give volumes / clips or images, not both in one run"
            )
        return list(dict.fromkeys(s for part in parts for s in part or []))
    return None


def holds_volumes(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds volumes or clips (it is a DICOM series, or the first volume, clip or
    image file found below it is a volume or a clip): cheap on a large image folder."""
    from camlens.base.io import IMAGE_EXTENSIONS

    p = Path(folder)
    if not p.is_dir():
        return False
    if _is_series(p):
        return True
    for dirpath, dirs, files in os.walk(p):
        dirs.sort()
        for f in sorted(files):
            if kind_of(Path(dirpath) / f) is not None:
                return True
            if f.lower().endswith(tuple(IMAGE_EXTENSIONS)):
                return False
        if any(_is_series(Path(dirpath) / d) for d in dirs if not d.startswith(".")):
            return True
    return False


def _stem(path: str) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


class VolumeFiles(Dataset):
    """NIfTI scans, DICOM series or video files read on access (in DataLoader workers) into item
    dicts (see :mod:`camlens.pipeline.sources`): ``x`` ``(C, D, H, W)``, ``size`` ``(D, H, W)`` the
    boxes' frame (a scan's voxels; a clip's kept frames and the video's own pixels) and ``meta``
    (``affine``, ``spacing``, ``timestamps``; ``None`` where the input has none)."""

    def __init__(self, sources: Sequence[str], reader: VolumeReader):
        kinds = {kind_of(s) for s in sources}
        if not sources:
            raise InputError("no NIfTI scans, DICOM series or video files to explain")
        if None in kinds:
            raise InputError(f"{next(s for s in sources if kind_of(s) is None)}: not a volume or a clip")
        if "video" in kinds and len(kinds) > 1:
            raise InputError("give scans (NIfTI, DICOM) or video files in one run, not both: the models differ")
        self.sources = list(sources)
        self.reader = reader
        names = [_stem(s) for s in self.sources]
        self.names = names if len(set(names)) == len(names) else output_stems(self.sources)
        self._shapes: list[tuple[int, int, int]] | None = None

    def __len__(self) -> int:
        return len(self.sources)

    def describe(self, i: int) -> Record:
        return Record(self.sources[i], self.names[i])

    def kind(self, i: int) -> str:
        k = kind_of(self.sources[i])
        assert k is not None
        return k

    def input_shape(self, i: int) -> tuple[int, int, int]:
        """``(D, H, W)`` of item ``i``'s input, from its headers (no voxel is read)."""
        if self._shapes is None:
            self._shapes = [_header_shape(s, kind_of(s), self.reader) for s in self.sources]
        return self._shapes[i]

    def group_key(self, i: int) -> tuple[int, int, int]:
        """Items with equal keys may share a batch (one input shape)."""
        return self.input_shape(i)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """The stored maps' ``(D, H, W)``: the largest input along each axis (smaller ones padded)."""
        shapes = np.array([self.input_shape(i) for i in range(len(self))], dtype=np.int64)
        return tuple(int(v) for v in shapes.max(0)) if len(shapes) else (0, 0, 0)  # type: ignore[return-value]

    def __getitem__(self, i: int) -> dict[str, Any]:
        src = self.sources[i]
        item: dict[str, Any] = {"index": i, "source": src, "name": self.names[i], "label": None, "gt": None}
        item["image"] = None
        try:
            item.update(_read(src, self.kind(i), self.reader))
            if tuple(item["x"].shape[1:]) != self.input_shape(i):
                raise InputError(
                    f"its input is {tuple(item['x'].shape[1:])}, its header said {self.input_shape(i)}; "
                    "the file changed during the run, or its header is wrong"
                )
        except CamlensError as exc:
            item["error"] = str(exc) if src in str(exc) else f"{src}: {exc}"
        except Exception as exc:  # a worker must not die on one file: report it by name
            item["error"] = f"{src}: {type(exc).__name__}: {exc}"
        return item


def _scan_item(vol: Volume, reader: VolumeReader) -> dict[str, Any]:
    x = vol.tensor(reader.window)[0]
    channels = reader.channels or 1
    meta = {"affine": vol.affine.reshape(-1).tolist(), "spacing": list(vol.spacing), "timestamps": None}
    return {"x": x.expand(channels, -1, -1, -1).contiguous(), "size": vol.shape, "meta": meta}


def _read(src: str, kind: str, reader: VolumeReader) -> dict[str, Any]:
    if kind == "nifti":
        return _scan_item(read_nifti(src), reader)
    if kind == "dicom":
        from camlens.base.dicom import read_dicom_series

        return _scan_item(read_dicom_series(src), reader)
    clip = read_clip(src, frames=reader.frames, stride=reader.stride)
    x = clip.tensor(size=(int(reader.size[0]), int(reader.size[1])))[0]
    size = (len(clip.frames), int(clip.frames.shape[1]), int(clip.frames.shape[2]))
    meta = {"affine": None, "spacing": None, "timestamps": [float(t) for t in clip.timestamps]}
    return {"x": x, "size": size, "meta": meta}


def _header_shape(src: str, kind: str | None, reader: VolumeReader) -> tuple[int, int, int]:
    """The ``(D, H, W)`` model input of ``src``, from headers only."""
    try:
        if kind == "nifti":
            from camlens.base.nifti import _nibabel

            shape = tuple(int(v) for v in _nibabel().load(src).shape)
            if len(shape) == 4 and shape[3] == 1:
                shape = shape[:3]
            return (shape[2], shape[1], shape[0]) if len(shape) == 3 else (0, 0, 0)  # a 4-D file fails when read
        if kind == "dicom":
            return _dicom_shape(Path(src))
        return (_clip_frames(src, reader), *(int(v) for v in reader.size))  # type: ignore[return-value]
    except CamlensError:
        raise
    except Exception:  # an unreadable header: the item fails by name when read
        return (0, 0, 0)


def _dicom_shape(folder: Path) -> tuple[int, int, int]:
    from camlens.base.dicom import _pydicom

    pydicom = _pydicom()
    n, rows, cols = 0, 0, 0
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception:
            continue
        if "ImagePositionPatient" in ds and "Rows" in ds:
            n, rows, cols = n + 1, int(ds.Rows), int(ds.Columns)
    return (n, rows, cols)


def _clip_frames(src: str, reader: VolumeReader) -> int:
    """Frames a clip will have: ``reader.frames``, fewer when the stream header says the file is shorter."""
    from camlens.base.video import _av

    with _av().open(src) as container:
        total = int(container.streams.video[0].frames or 0) if container.streams.video else 0
    if total <= 0:
        return reader.frames
    return min(reader.frames, -(-total // reader.stride))


def shape_batches(keys: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Positions ``0..len(keys)-1`` in order, cut into batches of at most ``batch_size`` consecutive
    positions with one key (one input shape per batch)."""
    out: list[list[int]] = []
    for pos, key in enumerate(keys):
        if out and len(out[-1]) < batch_size and keys[out[-1][0]] == key:
            out[-1].append(pos)
        else:
            out.append([pos])
    return out


def pad_maps(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``(N, K, d, h, w)`` maps padded with NaN to ``(N, K, *shape)`` (the store's array)."""
    if tuple(maps.shape[2:]) == tuple(shape):
        return maps
    out = np.full((*maps.shape[:2], *shape), np.nan, dtype=maps.dtype)
    out[(slice(None), slice(None), *(slice(0, s) for s in maps.shape[2:]))] = maps
    return out


def volume_dataset(
    spec: Any, reader: VolumeReader, model: nn.Module, out: str | os.PathLike | None = None
) -> VolumeFiles | None:
    """A :class:`VolumeFiles` of ``spec`` when it names volumes or clips, else ``None``; files inside
    the store ``out`` (its NIfTI exports, when ``--out`` lies in the data folder) are never inputs."""
    sources = volume_sources(spec)
    if sources is None:
        return None
    if out is not None:
        root = os.path.join(os.path.abspath(out), "")
        sources = [s for s in sources if not os.path.abspath(s).startswith(root)]
    if reader.channels is None:
        reader = VolumeReader(input_channels(model), reader.window, reader.frames, reader.stride, reader.size)
    return VolumeFiles(sources, reader)


def box_world(affine: Sequence[float] | None, box: Sequence[int]) -> list[float]:
    """A voxel box ``(x0, y0, z0, x1, y1, z1)`` as ``[x0, y0, z0, x1, y1, z1]`` in world mm (the
    min and max corner, :meth:`camlens.base.nifti.Volume.world_box`); NaN without an affine or a box."""
    if affine is None or min(box) < 0:
        return [float("nan")] * 6
    vol = Volume(np.zeros((1, 1, 1), np.float32), np.asarray(affine, dtype=np.float64).reshape(4, 4))
    return [float(v) for v in vol.world_box(box).reshape(-1)]


def export_nifti(results: Any, folder: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """Every map of a store over NIfTI scans or DICOM series written as NIfTI in its scan's space
    (:meth:`~camlens.pipeline.store.Results.to_nifti`), as ``FOLDER/NAME_METHOD_topRANK.nii.gz`` (the
    names of ``camlens explain scan.nii.gz``); nothing is written when any exists, unless ``overwrite``."""
    from camlens.base.fsio import check_targets

    t = results.table
    out = Path(folder)
    plan = [out / f"{r['name']}_{r['method']}_top{int(r['rank'])}.nii.gz" for _, r in t.iterrows()]
    check_targets(plan, overwrite)
    if plan:
        out.mkdir(parents=True, exist_ok=True)
    return [results.to_nifti(r, p, overwrite=overwrite) for (_, r), p in zip(t.iterrows(), plan, strict=True)]


__all__ = [
    "KINDS",
    "VolumeFiles",
    "VolumeReader",
    "box_world",
    "export_nifti",
    "holds_volumes",
    "input_channels",
    "kind_of",
    "pad_maps",
    "shape_batches",
    "volume_dataset",
    "volume_sources",
]
