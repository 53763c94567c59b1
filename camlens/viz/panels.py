"""Titles, labels, images of an explanation, drawn boxes and panel grids shared by the figure layouts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from camlens.api.explanation import RANDOM_WEIGHTS, Explanation
from camlens.attribution.registry import methods
from camlens.viz.render import BOX_COLOR


def _short(name: str, n: int = 28) -> str:
    name = name.split(",")[0].strip()  # ImageNet names: "tabby, tabby cat" -> "tabby"
    return name if len(name) <= n else name[: n - 1] + "…"


def ordinal(r: int) -> str:
    """``1`` -> ``"1st"``, ``2`` -> ``"2nd"``, ``11`` -> ``"11th"``, ``23`` -> ``"23rd"``."""
    suffix = "th" if 10 <= r % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(r % 10, "th")
    return f"{r}{suffix}"


def true_rank(exp: Explanation, i: int, k: int) -> int | None:
    """The 1-based rank of target ``k`` of image ``i`` among all classes, if known."""
    if exp.ranks is None or int(exp.classes[i, k]) < 0:
        return None
    return int(exp.ranks[i, k])


def target_label(exp: Explanation, i: int, k: int, *, rank: bool = True) -> str:
    """``"3rd: tabby (6.8%)"`` for image ``i``, target ``k``: the class's *true* rank among all the
    model's classes (from ``exp.ranks``; no rank when it is unknown), its name and probability; a
    detector's own detection: ``"detection 2: dog (score 0.81)"`` (its rank by score).
    Class-agnostic methods (Eigen-CAM) name no class."""
    if exp.class_agnostic:
        return "class-agnostic (same map for every class)"
    c = int(exp.classes[i, k])
    name = _short(exp.labels()[i][k])
    p = float(exp.probs[i, k])
    what = f"{name} ({p:.1%})" if p == p else f"{name} (score {float(exp.scores[i, k]):.3g})"
    if c < 0:
        return f"custom target (score {float(exp.scores[i, k]):.3g})"
    det = exp.extras.get("detections")
    if rank and det is not None and int(np.asarray(det)[i, k]) >= 0:  # a detector's own k-th best detection
        return f"detection {k + 1}: {what}"
    r = true_rank(exp, i, k)
    return f"{ordinal(r)}: {what}" if rank and r is not None else what


def _label(v, class_names: Sequence[str] | None) -> str:
    if isinstance(v, (int, np.integer)) or (isinstance(v, torch.Tensor) and v.dim() == 0):
        v = int(v)
        return _short(class_names[v]) if class_names and 0 <= v < len(class_names) else str(v)
    return _short(str(v))


def _add_boxes(ax, boxes, color: str = BOX_COLOR, lw: float = 2.0, kind: str = "pred") -> None:
    """Rectangles in image pixel coordinates (pixel centres at integers, so edges sit at ``x0 - 0.5``)."""
    from matplotlib.patches import Rectangle

    for b in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        if (b < 0).any() or b[2] <= b[0] or b[3] <= b[1]:
            continue
        r = Rectangle(
            (b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, edgecolor=color, linewidth=lw, label=kind
        )
        r.set_gid(f"{kind}:{b[0]},{b[1]},{b[2]},{b[3]}")
        ax.add_patch(r)


def patch_boxes(ax, kind: str = "pred") -> list[list[int]]:
    """The boxes drawn on an axes by this module, as ``[[x0, y0, x1, y1], …]`` (for tests and tools)."""
    out = []
    for p in ax.patches:
        gid = p.get_gid() or ""
        if gid.startswith(kind + ":"):
            out.append([int(v) for v in gid.split(":", 1)[1].split(",")])
    return out


def _panel(ax, image, title: str | None = None, *, color=None, fontsize: float = 10) -> None:
    ax.imshow(image, interpolation="nearest" if image.shape[0] < 200 else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=fontsize, **({"color": color} if color else {}))


def _grid(n: int, ncols: int, cell: float, aspect: float, extra_h: float = 0.45) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(cell * ncols, (cell * aspect + extra_h) * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def denormalize(x: torch.Tensor, preprocess=None) -> list[np.ndarray]:
    """A preprocessed ``(N, C, H, W)`` batch back to RGB uint8 images for figures: the inverse of
    ``preprocess`` (``(x · std + mean) / scale``, BGR flipped back) when it is known, else each image
    min–max scaled (an honest view of an unknown normalization rather than a flat grey panel)."""
    t = x.detach().float().cpu()
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    t = t[:, :3]
    if preprocess is not None and t.shape[1] == 3:
        mean = torch.tensor(preprocess.mean, dtype=t.dtype)[:, None, None]
        std = torch.tensor(preprocess.std, dtype=t.dtype)[:, None, None]
        t = (t * std + mean) / preprocess.scale
        if preprocess.channel_order == "BGR":
            t = t.flip(1)
    else:
        lo = t.amin(dim=(1, 2, 3), keepdim=True)
        hi = t.amax(dim=(1, 2, 3), keepdim=True)
        t = (t - lo) / (hi - lo).clamp_min(1e-12) * 255
    return [a.permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy() for a in t]


def _image_of(exp: Explanation, i: int) -> np.ndarray:
    if exp.images:
        return exp.images[i]
    if exp.inputs is not None and exp.inputs.dim() == 4 and exp.inputs.shape[1] in (1, 3):
        return denormalize(exp.inputs[i : i + 1], exp.preprocess)[0]  # tensor inputs: the input itself
    h, w = exp.shape[-2:]
    return np.full((h, w, 3), 128, dtype=np.uint8)


def _source_title(exp: Explanation, i: int) -> str:
    name = exp.sources[i] if exp.sources else f"image{i}"
    if not exp.images and exp.inputs is not None:
        how = "de-normalized" if exp.preprocess is not None else "min-max scaled"
        return f"{name} (input, {how})"
    return name


def _method_title(exp: Explanation) -> str:
    info = methods().get(exp.method)
    pretty = info.title if info is not None else exp.method
    parts = [pretty]
    if exp.model_name:
        parts.append(exp.model_name + (f" ({RANDOM_WEIGHTS})" if exp.random_weights else ""))
    elif exp.random_weights:
        parts.append(RANDOM_WEIGHTS)
    if exp.layer and info is not None and info.kind == "layer":
        parts.append(layer_title(exp.layer))
    return " · ".join(parts)


def layer_title(layer: str) -> str:
    """A layer description in plain words for titles: ``"input of _avg_pooling"`` ->
    ``"features before _avg_pooling"``, ``"input of global pooling (…)"`` -> ``"last features before
    global pooling"``, ``"output of layer4"`` -> ``"features of layer4"``."""
    if layer.startswith("input of global pooling"):
        return "last features before global pooling"
    if layer.startswith("input of "):
        return "features before " + layer.removeprefix("input of ")
    if layer.startswith("output of "):
        return "features of " + layer.removeprefix("output of ")
    return layer


def is_topk(exp: Explanation) -> bool:
    """Whether the targets are each image's top-K classes in order: target ``j`` ranks ``j + 1`` (or
    better, when logits tie: ranks count the classes with a strictly higher logit)."""
    if exp.ranks is None:
        return False
    k = exp.ranks.shape[1]
    return bool((exp.ranks.cpu() <= torch.arange(1, k + 1)).all())
