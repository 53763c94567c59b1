r"""Video files (``.mp4``, ``.avi``, ``.webm``, ``.mkv``…) sampled into clips for video classifiers
(PyAV, the optional extra ``camlens[video]``).

:func:`read_clip` decodes the first video stream and keeps ``frames`` frames, every ``stride``-th
one from the first frame at or after ``start`` seconds, with each kept frame's **timestamp** in
seconds (its presentation time), so that a map's time axis ``t`` is said in the file's own seconds.
A file shorter than asked gives the frames it has (``Clip.frames`` says how many).

:meth:`Clip.tensor` turns the RGB frames into the ``(1, 3, T, H, W)`` float batch torchvision's video
classifiers take: resized to ``size`` (bilinear, no crop: camlens never drops the borders of what
it explains), scaled to [0, 1] and normalized with the Kinetics-400 mean and std.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from camlens.base.errors import CamlensError, InputError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
#: torchvision's video classifiers (Kinetics-400)
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def _av() -> Any:
    try:
        import av  # optional dependency: camlens[video]
    except ImportError:
        raise CamlensError("reading video files needs PyAV: pip install 'camlens[video]' (or pip install av)") from None
    return av


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a video file (by its extension)."""
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class Clip:
    """Decoded frames ``(T, H, W, 3)`` uint8 RGB, their ``timestamps`` (seconds), the stream's
    ``fps`` (``None`` if unknown) and the source ``path``."""

    frames: np.ndarray
    timestamps: np.ndarray
    fps: float | None = None
    path: Path | None = None

    def tensor(
        self,
        size: tuple[int, int] = (112, 112),
        mean: tuple[float, ...] = KINETICS_MEAN,
        std: tuple[float, ...] = KINETICS_STD,
    ) -> torch.Tensor:
        """The ``(1, 3, T, H, W)`` float32 batch of a video classifier (see the module docstring)."""
        x = torch.from_numpy(np.ascontiguousarray(self.frames)).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, h, w)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
        s = torch.tensor(std, dtype=x.dtype)[:, None, None]
        return ((x - m) / s).permute(1, 0, 2, 3)[None].contiguous()


def read_clip(path: str | os.PathLike, frames: int = 16, stride: int = 1, start: float = 0.0) -> Clip:
    """``frames`` frames of ``path``'s first video stream, every ``stride``-th from ``start`` seconds."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise InputError(f"frames must be an integer >= 1, not {frames!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise InputError(f"stride must be an integer >= 1, not {stride!r}")
    av = _av()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such video file")
    kept: list[np.ndarray] = []
    stamps: list[float] = []
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise InputError(f"{p} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            seen = 0
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else seen / (fps or 1.0)
                if t + 1e-9 < start:
                    continue
                if seen % stride == 0:
                    kept.append(frame.to_ndarray(format="rgb24"))
                    stamps.append(t)
                    if len(kept) == frames:
                        break
                seen += 1
    except InputError:
        raise
    except Exception as exc:  # PyAV's FFmpeg errors (InvalidDataError…), OSError
        raise InputError(f"{p} is not a readable video ({type(exc).__name__}: {exc})") from None
    if not kept:
        raise InputError(f"{p} has no frame at or after {start} s")
    return Clip(np.stack(kept), np.asarray(stamps), fps, p)


__all__ = ["KINETICS_MEAN", "KINETICS_STD", "VIDEO_EXTENSIONS", "Clip", "is_video", "read_clip"]
