"""PNG files: figures and single overlays (with a colorbar in the map's units), fonts for any script."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from camlens.base.fsio import atomic_write
from camlens.viz.panels import _add_boxes
from camlens.viz.render import BOX_COLOR, BOX_POINTS, ColorScale, render_map

#: zlib level of the PNGs camlens writes: 1 encodes several times faster than PIL's default 6 for
#: files about a fifth larger on photo overlays (the encode was the largest single cost of saving).
PNG_COMPRESS_LEVEL = 1


def save_figure(
    fig: Figure,
    path: str | Path,
    *,
    dpi: int = 100,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
    compress_level: int | None = None,
    **kwargs: Any,
) -> Path:
    """Save a figure through the Agg canvas (no display needed); PNG text metadata if given. Written
    atomically (:func:`camlens.base.fsio.atomic_write`); ``overwrite=False`` refuses an existing file.
    ``compress_level`` (0–9) sets a PNG's zlib level (default: matplotlib's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    p = Path(path)
    fmt = kwargs.pop("format", None) or (p.suffix.lstrip(".").lower() or "png")
    if compress_level is not None and fmt == "png":
        kwargs["pil_kwargs"] = {**kwargs.get("pil_kwargs", {}), "compress_level": int(compress_level)}
    _font_fallback(fig)
    # atomic and symlink-safe (camlens.base.fsio): complete or absent, a link is replaced, never followed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GLYPH_MISSING)
        atomic_write(p, lambda f: fig.savefig(f, format=fmt, dpi=dpi, metadata=metadata, **kwargs), overwrite=overwrite)
    return p


def save_png(
    rgb: np.ndarray,
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    compress_level: int = PNG_COMPRESS_LEVEL,
    boxes=None,
    box_color: tuple[int, int, int] = (0, 255, 0),
    box_width: int = 2,
    overwrite: bool = True,
) -> Path:
    """Write an ``(H, W, 3)`` uint8 array as a PNG with PIL (no matplotlib): text ``metadata`` as
    PNG text chunks, ``boxes`` ``(M, 4)`` ``x0, y0, x1, y1`` (exclusive; ``-1``: none) drawn as
    rectangles on the pixels ``x0 .. x1 - 1``, zlib level ``compress_level``. Written atomically
    (:func:`camlens.base.fsio.atomic_write`); ``overwrite=False`` refuses an existing file."""
    from PIL import Image, ImageDraw, PngImagePlugin

    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if boxes is not None:
        draw = ImageDraw.Draw(im)
        for b in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
            if (b < 0).any() or b[2] <= b[0] or b[3] <= b[1]:
                continue
            draw.rectangle((int(b[0]), int(b[1]), int(b[2]) - 1, int(b[3]) - 1), outline=box_color, width=box_width)
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, v)
    p = Path(path)
    atomic_write(
        p, lambda f: im.save(f, format="PNG", pnginfo=info, compress_level=int(compress_level)), overwrite=overwrite
    )
    return p


#: fonts that cover CJK / emoji, used as fallbacks when installed (matplotlib >= 3.6 falls back per glyph)
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans JP", "WenQuanYi Zen Hei", "Droid Sans Fallback")


_FALLBACKS: list[str] | None = None


_COVERED: set[int] | None = None


_NOTICE_GIVEN = False
#: matplotlib's per-glyph warning, silenced while camlens draws (the notice above is said once instead);
#: only inside camlens' own draws (warnings.catch_warnings), never process-wide
GLYPH_MISSING = r"Glyph \d+ .* missing from font"


def _font_fallback(fig: Figure) -> None:
    """Texts of ``fig`` with characters the default font lacks (CJK, emoji…) get the installed
    fallback fonts; when none has them, one notice per process says so (and matplotlib's per-glyph
    warnings are silenced, since the notice already says it)."""
    global _FALLBACKS, _COVERED, _NOTICE_GIVEN
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if isinstance(t, Text) and not t.get_text().isascii()]
    if not texts:
        return
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    if _FALLBACKS is None:
        have = {f.name for f in font_manager.fontManager.ttflist}
        _FALLBACKS = [f for f in FALLBACK_FONTS if f in have]
        covered: set[int] = set()
        for fam in [None, *_FALLBACKS]:
            path = font_manager.findfont(font_manager.FontProperties(family=fam))
            covered |= set(FT2Font(path).get_charmap())
        _COVERED = covered
    known: set[int] = _COVERED or set()
    missing = {ch for t in texts for ch in t.get_text() if ord(ch) not in known and not ch.isspace()}
    if _FALLBACKS:
        for t in texts:
            t.set_fontfamily([*t.get_fontfamily(), *_FALLBACKS])
    if missing and not _NOTICE_GIVEN:
        _NOTICE_GIVEN = True
        warnings.warn(
            f"some characters of the titles ({''.join(sorted(missing))[:20]}) are not in the installed fonts "
            "and are drawn as empty boxes in the figures; install a font that has them (e.g. fonts-noto-cjk) "
            "and camlens uses it. File names and JSON keep the names intact. (Said once.)",
            UserWarning,
            stacklevel=3,
        )


def overlay_figure(
    image: np.ndarray,
    m,
    title: str,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    boxes=None,
    min_width: int = 320,
    max_side: int = 4096,
    dpi: int = 100,
    pixel: bool = False,
    scale: ColorScale | None = None,
    colorbar: bool = False,
) -> Figure:
    """One overlay at the image's own resolution (upscaled to at least ``min_width`` pixels wide, no
    side beyond ``max_side`` from the upscale) with a title band on top: the saved PNG is ``W·s`` x
    ``H·s + 30·min(s, 5)`` pixels, ``s`` the upscale. The overlay is :func:`render_map`'s, as in
    ``show()`` (``scale``: a given colour scale, e.g. shared by an image's classes). ``colorbar=True``
    adds a band of ``22·min(s, 5)`` pixels under the title: the scale's colours from its minimum to
    its maximum, both written beside it (:func:`colorbar_geometry`)."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    lay = _overlay_layout(h, w, title, min_width, max_side, dpi, colorbar)
    W, H = lay.width, lay.height
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h * lay.scale / H))
    shown, sc = render_map(img, m, pixel=pixel, alpha=alpha, cmap=cmap, scale=scale)
    ax.imshow(shown, interpolation="nearest" if lay.scale > 1 else "antialiased")
    ax.set_axis_off()
    if boxes is not None:
        _add_boxes(ax, boxes, lw=BOX_POINTS)
    fig.text(0.5, 1 - (lay.band / 2) / H, title, ha="center", va="center", fontsize=lay.fontsize)
    if colorbar:
        g = colorbar_geometry(lay)
        bar = fig.add_axes((g.x0 / W, 1 - g.y1 / H, (g.x1 - g.x0) / W, (g.y1 - g.y0) / H))
        bar.imshow(sc.colors()[None], aspect="auto", interpolation="nearest", extent=(0, 1, 0, 1))
        bar.set_axis_off()
        if sc.kind == "diverging":  # zero: a dark tick at the centre
            bar.axvline(0.5, color="black", linewidth=72 / dpi)
        y = 1 - (g.y0 + g.y1) / 2 / H
        lo, hi = _bar_labels(sc)
        fig.text((g.x0 - g.gap) / W, y, lo, ha="right", va="center", fontsize=g.fontsize)
        fig.text((g.x1 + g.gap) / W, y, hi, ha="left", va="center", fontsize=g.fontsize)
    return fig


@dataclass(frozen=True)
class _OverlayLayout:
    """Geometry of a titled overlay (:func:`overlay_figure`, :func:`overlay_png`): the upscale, the
    title band's height, the colorbar band's height (0: none), the canvas size (pixels, unrounded)
    and the title's font size (points)."""

    scale: float
    band: float
    width: float
    height: float
    fontsize: float
    bar: float = 0.0


def _overlay_layout(
    h: int, w: int, title: str, min_width: int, max_side: int, dpi: int, colorbar: bool = False
) -> _OverlayLayout:
    s = max(1.0, min_width / w)
    s = min(s, max(1.0, max_side / h))  # a 1-pixel-wide strip is not blown up to 320 x 100 000
    band = 30 * min(s, 5.0)  # the title band grows with the upscale, up to 150 px (a 1x1 image: 320 x 470)
    bar = 22 * min(s, 5.0) if colorbar else 0.0
    W = w * s
    # font size that fits the width: average glyph ≈ 0.55 em, 1 pt = dpi/72 px
    fs = float(np.clip((W - 8) / (0.6 * max(len(title), 1) * dpi / 72), 6, 13))
    return _OverlayLayout(s, band, W, h * s + band + bar, fs, bar)


@dataclass(frozen=True)
class ColorbarGeometry:
    """Where a saved PNG's colorbar is, in canvas pixels: the gradient ``x0 .. x1`` x ``y0 .. y1``
    (the middle 60 % of the width, the middle half of the band under the title), the labels' gap
    from it and their font size (points)."""

    x0: float
    x1: float
    y0: float
    y1: float
    gap: float
    fontsize: float


def colorbar_geometry(lay: _OverlayLayout) -> ColorbarGeometry:
    """The colorbar of a titled overlay with ``colorbar=True`` (see :func:`overlay_figure`)."""
    return ColorbarGeometry(
        x0=round(0.2 * lay.width),
        x1=round(0.8 * lay.width),
        y0=round(lay.band + 0.25 * lay.bar),
        y1=round(lay.band + 0.75 * lay.bar),
        gap=4.0,
        fontsize=float(min(lay.fontsize, 9.0)),
    )


def _bar_labels(sc: ColorScale) -> tuple[str, str]:
    """The colorbar's end labels (ASCII, so the PIL path's font always has them)."""
    return f"{sc.lo:.3g}", f"{sc.hi:.3g}"


@functools.lru_cache(maxsize=1)
def _default_font() -> tuple[str, frozenset[int]]:
    """The file of matplotlib's default font (the one :func:`overlay_figure` titles with) and the
    code points it has glyphs for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties())
    return path, frozenset(FT2Font(path).get_charmap())


@functools.lru_cache(maxsize=32)
def _title_font(px: int):
    """:func:`_default_font` at ``px`` pixels as a PIL font; ``None`` if it cannot be loaded."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype(_default_font()[0], size=px)
    except OSError:
        return None


def overlay_png(
    image: np.ndarray,
    m,
    title: str,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    boxes=None,
    min_width: int = 320,
    max_side: int = 4096,
    dpi: int = 100,
    pixel: bool = False,
    scale: ColorScale | None = None,
    colorbar: bool = False,
) -> np.ndarray | None:
    """:func:`overlay_figure`'s picture drawn with PIL alone, as an ``(H, W, 3)`` uint8 array: the
    same size, upscale, title band, colorbar, font and font size, and boxes of the same colour and
    width (2 pt), without matplotlib artists or the Agg canvas (which cost most of a titled PNG's time).
    Returns ``None`` when the title needs glyphs outside the default font (then the figure, with
    its font fallbacks, is the way) or the font cannot be loaded."""
    from PIL import Image, ImageDraw

    if not title.isascii() and not all(ord(c) in _default_font()[1] for c in title):
        return None
    img = np.asarray(image)
    h, w = img.shape[:2]
    lay = _overlay_layout(h, w, title, min_width, max_side, dpi, colorbar)
    W, H = int(lay.width + 1e-6), int(lay.height + 1e-6)  # the Agg canvas truncates its float size
    ih = min(H, max(1, round(h * lay.scale)))
    font = _title_font(max(1, round(lay.fontsize * dpi / 72)))
    if font is None:
        return None
    shown, sc = render_map(img, m, pixel=pixel, alpha=alpha, cmap=cmap, scale=scale)
    pic = Image.fromarray(np.ascontiguousarray(shown))
    if (W, ih) != (w, h):
        pic = pic.resize((W, ih), Image.Resampling.NEAREST if lay.scale > 1 else Image.Resampling.BILINEAR)
    if boxes is not None:  # on the picture, so that the lines are clipped to it as the figure's
        from matplotlib.colors import to_rgb

        draw = ImageDraw.Draw(pic)
        lw = max(1, round(BOX_POINTS * dpi / 72))
        color = tuple(round(255 * c) for c in to_rgb(BOX_COLOR))
        for b in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
            if (b < 0).any() or b[2] <= b[0] or b[3] <= b[1]:
                continue
            x0, x1, y0, y1 = b[0] * W / w, b[2] * W / w, b[1] * ih / h, b[3] * ih / h  # pixel edges
            draw.rectangle(
                # a line of width lw centred on each edge, on the pixels it covers most
                tuple(int(np.floor(v + 0.5)) for v in (x0 - lw / 2, y0 - lw / 2, x1 + lw / 2 - 1, y1 + lw / 2 - 1)),
                outline=color,
                width=lw,
            )
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    canvas.paste(pic, (0, H - ih))
    draw = ImageDraw.Draw(canvas)
    draw.text((W / 2, (H - ih - lay.bar) / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    if colorbar:
        _draw_colorbar(canvas, sc, lay, dpi)
    return np.asarray(canvas)


def _draw_colorbar(canvas, sc: ColorScale, lay: _OverlayLayout, dpi: int) -> None:
    """The colorbar of :func:`overlay_png` (PIL), where :func:`overlay_figure` puts it."""
    from PIL import Image, ImageDraw

    g = colorbar_geometry(lay)
    x0, x1, y0, y1 = int(g.x0), int(g.x1), int(g.y0), int(g.y1)
    if x1 <= x0 or y1 <= y0:
        return
    n = x1 - x0  # one colour per pixel column, sampled as matplotlib's nearest-neighbour imshow does
    cols = sc.colors()[np.minimum(((np.arange(n) + 0.5) * 256 / n).astype(int), 255)]
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(cols[None], y1 - y0, 0))), (x0, y0))
    draw = ImageDraw.Draw(canvas)
    if sc.kind == "diverging":
        draw.line(((x0 + x1) // 2, y0, (x0 + x1) // 2, y1 - 1), fill=(0, 0, 0), width=max(1, round(dpi / 72)))
    font = _title_font(max(1, round(g.fontsize * dpi / 72)))
    if font is None:
        return
    lo, hi = _bar_labels(sc)
    ym = (y0 + y1) / 2
    draw.text((x0 - g.gap, ym), lo, fill=(0, 0, 0), font=font, anchor="rm")
    draw.text((x1 + g.gap, ym), hi, fill=(0, 0, 0), font=font, anchor="lm")
