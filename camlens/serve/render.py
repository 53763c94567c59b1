"""Pictures and files of ``camlens serve``: heat layers, pixel-attribution detail, the figure, the
maps (``.npy``) and the JSON summary — built from :mod:`camlens.viz` and :mod:`camlens.localize`.

Colours. With the colormap "auto" (the default) the page follows the library's one rule,
:func:`camlens.viz.color_scale`, as the figures and saved PNGs do: a map with both signs (CAM of a
lesser class, Integrated Gradients, …) is drawn with a diverging colormap centred at zero,
``v = ½ + ½·m / q`` (``q`` = the largest |m|, or its 99.5th percentile for pixel methods), so white
means "no evidence" and red / blue "for" / "against" the class; a map of one sign (Grad-CAM, CAM of
the top class) uses the whole of ``jet`` from its minimum to its maximum; an all-negative map the
blue half of the diverging colormap. A colormap chosen by name is used as asked (a diverging one
centred at zero, another min–max). Pixel methods' maps are clipped at their 99.5th percentile first.
The page lays the heat layer over the photo with CSS opacity ``α``, which is exactly
:func:`camlens.viz.overlay`'s ``(1 - α)·image + α·heat``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from camlens.attribution.registry import get_method
from camlens.serve.service import PIXEL_PERCENTILE, THRESHOLDS, Panel, Result, ServeError, method_title

#: colormaps offered by the page; "auto" picks DIVERGING_DEFAULT for signed maps, SEQUENTIAL_DEFAULT otherwise
COLORMAPS = ("auto", "jet", "viridis", "inferno", "RdBu_r", "coolwarm")
DIVERGING = frozenset({"RdBu_r", "RdBu", "coolwarm", "bwr", "seismic", "PiYG", "PRGn"})
DIVERGING_DEFAULT, SEQUENTIAL_DEFAULT = "RdBu_r", "jet"


def png_bytes(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def resolve_cmap(cmap: str, signed: bool) -> str:
    if cmap == "auto":
        return DIVERGING_DEFAULT if signed else SEQUENTIAL_DEFAULT
    if cmap not in COLORMAPS:
        raise ServeError(f"unknown colormap {cmap!r}; choose one of {', '.join(COLORMAPS)}", 400)
    return cmap


def heat_values(panel: Panel, signed: bool, cmap: str, size: tuple[int, int]) -> np.ndarray:
    """The panel's map at ``size`` as values in [0, 1] for ``cmap`` (see the module docstring)."""
    from camlens.viz import attribution_heat, normalize, resize_map

    m = resize_map(panel.map, size)
    pixel = panel.raw is not None
    if cmap in DIVERGING:  # centred at zero whatever the map's sign
        a = np.abs(m)
        q = float(np.percentile(a, PIXEL_PERCENTILE)) if pixel else float(a.max(initial=0.0))
        if not q > 0:
            q = float(a.max(initial=0.0))
        return np.clip(0.5 + 0.5 * m / q, 0, 1) if q > 0 else np.full(m.shape, 0.5, np.float32)
    if pixel and not signed:
        return attribution_heat(m, PIXEL_PERCENTILE)
    return normalize(m)


def heat_rgb(result: Result, panel: Panel, cmap: str = "auto") -> np.ndarray:
    """The heat layer of a panel at the display size, ``(h, w, 3)`` uint8 (``"auto"``: the library's
    colour rule, :func:`camlens.viz.color_scale`, on this map's values)."""
    from camlens.viz import color_scale, colorize, resize_map

    if cmap == "auto":
        sc = color_scale(
            panel.map, pixel=panel.raw is not None, cmap=SEQUENTIAL_DEFAULT, diverging_cmap=DIVERGING_DEFAULT
        )
        m = resize_map(panel.map, result.image.display.shape[:2])
        return colorize(sc.position(m), sc.cmap, normalized=True)
    signed = result.signed(panel.method)
    name = resolve_cmap(cmap, signed)
    v = heat_values(panel, signed, name, result.image.display.shape[:2])
    return colorize(v, name, normalized=True)


def model_label(result: Result) -> str:
    """The model's name, with ``(random weights)`` when they are."""
    from camlens.api.explanation import RANDOM_WEIGHTS

    return result.model + (f" ({RANDOM_WEIGHTS})" if result.random_weights else "")


def detail_rgb(result: Result, panel: Panel) -> np.ndarray:
    """A pixel method's attribution as colour at the display size (grey = 0; :func:`camlens.viz.attribution_rgb`)."""
    import torch

    from camlens.viz import attribution_rgb, resize_map

    if panel.raw is None:
        raise ServeError(f"{panel.method} is not a pixel method: it has no pixel detail", 404)
    raw = panel.raw[::-1] if result.channel_order == "BGR" else panel.raw
    size = result.image.display.shape[:2]
    a = torch.from_numpy(np.stack([resize_map(np.ascontiguousarray(c), size) for c in raw]))
    return (attribution_rgb(a, PIXEL_PERCENTILE) * 255 + 0.5).astype(np.uint8)


def threshold_index(threshold: float) -> int:
    """The index of ``threshold`` in :data:`THRESHOLDS` (a 400 when it is not one of them)."""
    for i, t in enumerate(THRESHOLDS):
        if abs(t - threshold) < 1e-6:
            return i
    raise ServeError(f"threshold {threshold} is not one of {', '.join(map(str, THRESHOLDS))}", 400)


def rank_of(result: Result, cls: int) -> int | None:
    for p in result.predictions:
        if p["id"] == cls:
            return int(p["rank"])
    return None


def panel_title(result: Result, panel: Panel) -> str:
    """``"Egyptian cat 78.8% (top-1)"``: the rank only when it is the class's real rank."""
    if panel.prob != panel.prob:  # a detection (no probability): "detection 2: dog (score 0.81)"
        return panel.name
    r = rank_of(result, panel.cls)
    name = panel.name.split(",")[0]
    return f"{name} {panel.prob:.1%}" + (f" (top-{r})" if r else "")


def figure_png(
    result: Result, *, alpha: float = 0.5, threshold: float = 0.3, cmap: str = "auto", pixel_boxes: bool = False
) -> bytes:
    """The page's view as one PNG: a row per method (its cost in the row title), the photo then one
    overlay per explained class with its box at ``threshold`` (only for methods whose box means
    something, unless ``pixel_boxes``: not on pixel-noise maps); pixel methods add their detail."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from camlens.base.localization import draw_boxes

    if not 0 <= alpha <= 1:
        raise ServeError(f"alpha must be in [0, 1], not {alpha}", 400)
    ti = threshold_index(threshold)
    img = result.image.display
    rows = result.methods
    pixel = {m: any(p.raw is not None for (mm, _), p in result.panels.items() if mm == m) for m in rows}
    ncols = 1 + max(len(result.classes) * (2 if pixel[m] else 1) for m in rows)
    h, w = img.shape[:2]
    cell = 2.6
    fig = Figure(figsize=(cell * ncols, (cell * h / w + 0.55) * len(rows)), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, m in enumerate(rows):
        cost = result.cost_ms.get(m)
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"{method_title(m)}" + (f" · {cost:.0f} ms" if cost is not None else ""), fontsize=9)
        col = 1
        for c in result.classes:
            p = result.panels.get((m, c))
            if p is None:
                continue
            heat = heat_rgb(result, p, cmap).astype(np.float32)
            ov = np.clip((1 - alpha) * img.astype(np.float32) + alpha * heat + 0.5, 0, 255).astype(np.uint8)
            if pixel_boxes or get_method(m).boxes:
                ov = draw_boxes(ov, np.asarray(p.boxes[ti]))
            axes[r, col].imshow(ov)
            axes[r, col].set_title(panel_title(result, p), fontsize=8)
            col += 1
            if p.raw is not None:
                axes[r, col].imshow(detail_rgb(result, p))
                axes[r, col].set_title("pixel detail", fontsize=8)
                col += 1
    fig.suptitle(
        f"camlens · {model_label(result)} · {result.image.name} · box at {threshold:.2f} of the max", fontsize=10
    )
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": "camlens serve"})
    return buf.getvalue()


def maps_npy(result: Result, method: str) -> bytes:
    """``(K, H, W)`` float32 maps of ``method`` at the model's input resolution, classes in the
    result's order (the same array ``camlens explain --format npy`` writes)."""
    panels = [result.panels.get((method, c)) for c in result.classes]
    if method not in result.methods or any(p is None for p in panels):
        raise ServeError(f"result {result.id} has no {method} maps", 404)
    arr = np.stack([p.map for p in panels if p is not None]).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def summary(result: Result, threshold: float = 0.3) -> dict[str, Any]:
    """The JSON summary: model, image, predictions, and per method and class the probability, logit,
    cost and box at ``threshold`` (display and original-image pixels), plus any curves computed."""
    import camlens
    from camlens.base.localization import localize, scale_boxes

    ti = threshold_index(threshold)
    img = result.image
    shown = img.display.shape[:2]
    items = []
    for (m, c), p in result.panels.items():
        box_img = scale_boxes(localize(p.map, threshold), p.map.shape, img.photo_size).tolist()
        items.append(
            {
                "method": m,
                "class": c,
                "class_name": p.name,
                "rank": rank_of(result, c),
                "prob": p.prob,
                "score": p.score,
                "layer": p.layer,
                "signed": result.signed(m),
                "ms": round(p.ms, 2),
                "classes_in_call": p.n_in_call,
                "box": box_img,
                "box_display": p.boxes[ti],
                "extras": p.extras,
            }
        )
    return {
        "result": result.id,
        "model": result.model,
        "random_weights": result.random_weights,
        "image": {"name": img.name, "size": list(img.photo_size), "display_size": list(shown)},
        "predictions": result.predictions,
        "classes": result.classes,
        "methods": result.methods,
        "errors": result.errors,
        "threshold": threshold,
        "box_format": "x0,y0,x1,y1 pixels, x1/y1 exclusive, -1 = no box",
        "maps": items,
        "cost_ms": {m: (None if v is None else round(v, 2)) for m, v in result.cost_ms.items()},
        "predict_ms": round(result.predict_ms, 2),
        "faithfulness": [v for v in result.curves.values()],
        "versions": {"camlens": camlens.__version__},
    }


def summary_json(result: Result, threshold: float = 0.3) -> bytes:
    return (json.dumps(summary(result, threshold), indent=2) + "\n").encode()


__all__ = [
    "COLORMAPS",
    "detail_rgb",
    "figure_png",
    "heat_rgb",
    "heat_values",
    "maps_npy",
    "model_label",
    "png_bytes",
    "resolve_cmap",
    "summary",
    "summary_json",
]
