"""Clip maps ``(T, H, W)`` over their frames: an animated overlay (GIF, MP4) and a frame strip.

Every picture of a clip uses **one colour scale for all its frames** (:func:`camlens.viz.color_scale`
of the whole ``(T, H, W)`` map: ``jet`` over ``[min, max]`` for a map of one sign, diverging around
zero for a signed one), so a frame that looks hotter *is* hotter; a per-frame scale would make every
frame look equally hot.

* :func:`overlay_frames` — the ``(T, H, W, 3)`` uint8 overlays (the map resized to each frame,
  :func:`camlens.viz.render_map` with the shared scale) and that scale;
* :func:`gif_bytes` — an animated GIF (PIL, one 256-colour palette for all frames): each frame
  shown for its own duration (from the timestamps), with a band under it holding the colour bar
  (low … high) and the frame's time;
* :func:`mp4_bytes` — an H.264 MP4 (PyAV, ``camlens[video]``) of the same frames at the clip's rate;
* :func:`frame_strip` — a figure of every ``every``-th frame titled with its index and timestamp,
  the peak frame framed in red, a colorbar in the map's units;
* :func:`clip_explanation_figure` — the figure of one map of an :class:`~camlens.Explanation` by
  ``kind`` (``"montage"``, ``"threeview"``, ``"strip"``), behind ``Explanation.figure(kind=...)``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from camlens.api.explanation import Explanation
from camlens.base.errors import CamlensError, InputError
from camlens.viz.figures import _colorbar, scale_label
from camlens.viz.render import ColorScale, color_scale, render_map
from camlens.viz.volume import PEAK_COLOR, _np3, explanation_title, peak_voxel, volume_figure

#: height in pixels of the band under each GIF frame (colour bar and time)
BAND = 14


def _frames_rgb(frames, shape: tuple[int, int, int]) -> np.ndarray:
    """``frames`` as ``(T, H', W', 3)`` uint8: RGB frames as given, grey ``(T, H', W')`` volumes
    min-max scaled; ``None`` -> mid grey at the map's size."""
    if frames is None:
        return np.full((*shape, 3), 128, dtype=np.uint8)
    f = np.asarray(frames.detach().cpu().numpy() if hasattr(frames, "detach") else frames)
    if f.ndim == 3:
        lo, hi = float(np.nanmin(f)), float(np.nanmax(f))
        g = (f - lo) / (hi - lo) if hi > lo else np.zeros(f.shape)
        f = np.repeat((np.clip(g, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=3)
    if f.ndim != 4 or f.shape[3] != 3 or len(f) != shape[0]:
        raise InputError(
            f"frames must be (T, H, W, 3) RGB or (T, H, W) grey with T = {shape[0]} (the map's), got shape {f.shape}"
        )
    if f.dtype != np.uint8:
        f = np.clip(f, 0, 255).astype(np.uint8)
    return f


def overlay_frames(
    m, frames=None, *, alpha: float = 0.5, pixel: bool = False, scale: ColorScale | None = None
) -> tuple[np.ndarray, ColorScale]:
    """The overlays ``(T, H', W', 3)`` uint8 of a clip map ``m`` ``(T, H, W)`` over its ``frames``
    (``(T, H', W', 3)`` RGB, ``(T, H', W')`` grey, or ``None``: mid grey), one colour scale for all
    frames (``scale``, else :func:`color_scale` of the whole map), and that scale."""
    a = _np3(m, "the clip map")
    rgb = _frames_rgb(frames, a.shape)
    sc = scale if scale is not None else color_scale(a, pixel=pixel)
    out = np.stack([render_map(rgb[t], a[t], scale=sc, pixel=sc.pixel, alpha=alpha)[0] for t in range(len(a))])
    return out, sc


def _band(sc: ColorScale, width: int, text: str) -> np.ndarray:
    """A ``(BAND, width, 3)`` strip: the colour bar on the left 60 %, ``text`` (PIL's default font) right."""
    from PIL import Image, ImageDraw

    band = np.full((BAND, width, 3), 255, dtype=np.uint8)
    bar_w = max(1, int(width * 0.6))
    band[2 : BAND - 2, :bar_w] = sc.colors(bar_w)[None]
    img = Image.fromarray(band)
    ImageDraw.Draw(img).text((bar_w + 3, 1), text, fill=(0, 0, 0))
    return np.asarray(img)


def _durations_ms(timestamps: Sequence[float] | None, n: int, fps: float | None) -> list[int]:
    """Per-frame display time: the gaps between timestamps (the last repeats the one before),
    else ``1000 / fps``, else 100 ms; at least 20 ms (what GIF viewers honour)."""
    if timestamps is not None and len(timestamps) == n and n > 1:
        gaps = np.diff(np.asarray(timestamps, dtype=np.float64)) * 1000
        d = [*gaps.tolist(), float(gaps[-1])]
    else:
        d = [1000.0 / fps if fps else 100.0] * n
    return [max(20, round(v)) for v in d]


def gif_bytes(
    m,
    frames=None,
    *,
    timestamps: Sequence[float] | None = None,
    fps: float | None = None,
    alpha: float = 0.5,
    pixel: bool = False,
    band: bool = True,
    min_width: int = 160,
) -> bytes:
    """An animated GIF (looping) of :func:`overlay_frames`, one GIF frame per clip frame shown for
    its own duration; ``band``: a strip under each frame with the shared colour bar and the time.
    Frames narrower than ``min_width`` pixels are enlarged by a whole factor (nearest neighbour: each
    voxel a block, no new colours) so that a small scan or clip stays visible and the band legible."""
    from PIL import Image

    over, sc = overlay_frames(m, frames, alpha=alpha, pixel=pixel)
    f = max(1, -(-min_width // over.shape[2]))
    over = over.repeat(f, axis=1).repeat(f, axis=2) if f > 1 else over
    if band:
        stamps = timestamps if timestamps is not None else [None] * len(over)
        labels = [f"{i}" if t is None else f"{float(t):.2f}s" for i, t in enumerate(stamps)]
        over = np.stack([np.concatenate([f, _band(sc, f.shape[1], s)]) for f, s in zip(over, labels, strict=True)])
    # one 256-colour palette for the whole clip (a per-frame palette made the colour bar and the
    # same map value change colour from frame to frame); no dithering: blocks stay flat
    palette = Image.fromarray(np.concatenate(list(over), axis=0)).quantize(256, method=Image.Quantize.MEDIANCUT)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in over]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=_durations_ms(timestamps, len(over), fps),
        loop=0,
        disposal=1,
        optimize=False,
    )
    return buf.getvalue()


def _av() -> Any:
    try:
        import av  # optional dependency: camlens[video]
    except ImportError:
        raise CamlensError("writing MP4 needs PyAV: pip install 'camlens[video]' (or pip install av)") from None
    return av


def mp4_bytes(
    m, frames=None, *, fps: float | None = None, alpha: float = 0.5, pixel: bool = False, crf: int = 18
) -> bytes:
    """An H.264 MP4 (``yuv420p``, ``crf`` quality; PyAV) of :func:`overlay_frames` at ``fps``
    (default 8). Odd frame sizes are padded by one edge pixel (H.264 needs even sizes)."""
    av = _av()
    over, _ = overlay_frames(m, frames, alpha=alpha, pixel=pixel)
    h, w = over.shape[1:3]
    over = np.pad(over, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    from fractions import Fraction

    rate = Fraction(fps if fps and fps > 0 else 8).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = over.shape[2], over.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in over:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def frame_strip(
    m,
    frames=None,
    *,
    timestamps: Sequence[float] | None = None,
    every: int = 1,
    alpha: float = 0.5,
    pixel: bool = False,
    title: str | None = None,
    cell: float = 1.8,
) -> Figure:
    """A row of every ``every``-th frame of a clip map ``m`` ``(T, H, W)`` over its ``frames``, one
    colour scale for all of them and a colorbar; each titled ``frame i · t s``, the frame holding
    the map's peak (always shown) framed in red."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InputError(f"every must be an integer >= 1, not {every!r}")
    over, sc = overlay_frames(m, frames, alpha=alpha, pixel=pixel)
    peak_t = peak_voxel(_np3(m, "the clip map"), sc.kind != "sequential")[0]
    keep = sorted(set(range(0, len(over), every)) | {peak_t})
    h, w = over.shape[1:3]
    fig = Figure(figsize=(cell * len(keep) * min(2.0, w / h) + 1.0, cell + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(keep)))
    for ax, t in zip(axes, keep, strict=True):
        ax.imshow(over[t], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        stamp = f" · {float(timestamps[t]):.2f} s" if timestamps is not None else ""
        ax.set_title(f"frame {t}{stamp}", fontsize=7, color=PEAK_COLOR if t == peak_t else "black")
        if t == peak_t:
            for s in ax.spines.values():
                s.set_edgecolor(PEAK_COLOR)
                s.set_linewidth(2.5)
    _colorbar(fig, list(axes), sc, fraction=0.02, shrink=0.9)
    head = f"{title}  " if title else ""
    fig.suptitle(f"{head}peak in frame {peak_t}, one scale for all frames: {scale_label(sc)}", fontsize=8)
    return fig


def clip_explanation_figure(
    exp: Explanation, index: int = 0, target: int = 0, *, kind: str = "montage", frames=None, **kwargs: Any
) -> Figure:
    """The figure of one map of a volume/clip :class:`~camlens.Explanation` by ``kind``:
    ``"montage"`` / ``"threeview"`` (:func:`camlens.viz.volume.volume_figure`) or ``"strip"``
    (:func:`frame_strip`, over ``frames`` or else the explained input's channel mean)."""
    if kind != "strip":
        return volume_figure(exp, index, target, kind=kind, background=kwargs.pop("background", frames), **kwargs)
    if exp.spatial_dims != 3:
        raise InputError(f"a frame strip draws clip maps (N, K, T, H, W); these are {exp.shape}")
    if frames is None and exp.inputs is not None and exp.inputs.dim() == 5:
        frames = exp.inputs[index].float().mean(0)
    kwargs.setdefault("title", explanation_title(exp, index, target))
    kwargs.setdefault("pixel", exp.kind == "pixel")
    return frame_strip(exp.map(index, target), frames, **kwargs)


__all__ = ["BAND", "clip_explanation_figure", "frame_strip", "gif_bytes", "mp4_bytes", "overlay_frames"]
