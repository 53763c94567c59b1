"""Figures from a result store: an image's stored maps back as :class:`~camlens.Explanation` objects,
drawn exactly as ``camlens.explain``'s are (``Results.figure(i)``, ``camlens show STORE --image N``).

The store holds the maps at the model's input resolution, the rows (classes, scores, probabilities,
the model, the layer) and the image's source path; the photo is read again from there (a grey panel
when it has moved). A rank is claimed only when the run's targets were the top-k classes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure

from camlens.api.explanation import Explanation
from camlens.attribution.registry import methods as registered
from camlens.base.errors import InputError
from camlens.base.io import load_image
from camlens.viz import explanation_figure, montage
from camlens.viz.volume import volume_figure

if TYPE_CHECKING:
    from camlens.pipeline.store import Results


def _class_names(rows) -> list[str]:
    ids = [int(c) for c in rows["class_id"]]
    names = [str(i) for i in range(max([*ids, 0]) + 1)]
    for c, n in zip(ids, rows["class_name"], strict=True):
        if c >= 0:
            names[c] = str(n)
    return names


def _photo(source: str) -> list[np.ndarray] | None:
    p = Path(source)
    return [load_image(p)] if p.is_file() else None


def _stored_maps(results: Results, image: int, method: str, rows: Any) -> torch.Tensor:
    """``(1, K, ...)`` maps of one image and method: of a volume store each row's map cropped to its
    volume (:meth:`Results.map`), else the stored array's first ``K`` maps."""
    if "depth" in rows.columns:
        return torch.from_numpy(np.stack([results.map(r) for _, r in rows.iterrows()]).astype(np.float32))[None]
    k = len(rows)
    return torch.from_numpy(np.asarray(results.maps(method)[int(image), :k], dtype=np.float32))[None]


def stored_explanations(results: Results, image: int) -> dict[str, Explanation]:
    """``{method: Explanation}`` of image ``image`` (its ``image_id``) as stored (a volume's maps
    ``(1, K, D, H, W)``, cropped to the volume)."""
    t = results.table
    rows = t[t["image_id"] == int(image)]
    if rows.empty:
        ids = sorted(set(int(i) for i in t["image_id"]))
        have = f"{ids[0]}..{ids[-1]} ({len(ids)} images)" if ids else "none"
        raise InputError(f"image {image} is not in the store {results.root}; image ids there: {have}")
    targets = results.run.get("signature", {}).get("targets")
    topk = targets is None or (isinstance(targets, str) and re.fullmatch(r"top\d+", targets) is not None)
    photo = None if "depth" in rows.columns else _photo(str(rows["source"].iloc[0]))
    out: dict[str, Explanation] = {}
    for method, g in rows.groupby("method", sort=False):
        g = g.sort_values("rank")
        maps = _stored_maps(results, int(image), str(method), g)
        info = registered().get(str(method))
        raw = maps[:, :, None] if info is not None and info.kind == "pixel" else maps  # pixel maps: drawn as such
        out[str(method)] = Explanation(
            maps=maps,
            raw=raw,
            classes=torch.tensor([[int(c) for c in g["class_id"]]]),
            scores=torch.tensor([[float(v) for v in g["score"]]]),
            probs=torch.tensor([[float(v) for v in g["prob"]]]),
            method=str(method),
            layer=None if g["layer"].iloc[0] is None else str(g["layer"].iloc[0]),
            class_names=_class_names(g),
            images=photo,
            sources=[str(g["name"].iloc[0])],
            model_name=str(g["model"].iloc[0]),
            ranks=torch.tensor([[int(r) for r in g["rank"]]]) if topk else None,
        )
    order = [str(m) for m in results.run.get("signature", {}).get("methods") or []]  # the run's order
    return {m: out[m] for m in sorted(out, key=lambda m: order.index(m) if m in order else len(order))}


def stored_figure(results: Results, image: int, method: str | None = None, **kwargs: Any) -> Figure:
    """The figure of image ``image``: one method's overlays (:func:`camlens.viz.explanation_figure`,
    the figure ``camlens.explain`` would give) or, with several methods stored and none named, the
    montage of methods x classes (:func:`camlens.viz.montage`). ``kwargs`` go to that function
    (``shared_scale=True``, ``alpha``, ``cmap``…). Of a volume store: the slice montage
    (:func:`camlens.viz.volume.volume_figure`) of one method (the run's first when none is named)
    and class (``target=``, default 0), over the scan (or the clip) read again when it is still there."""
    exps = stored_explanations(results, image)
    if method is not None and method not in exps:
        raise InputError(f"no {method!r} maps for image {image}; stored methods: {', '.join(exps)}")
    first = next(iter(exps.values()))
    if first.spatial_dims == 3:
        t = results.table
        row = t[t["image_id"] == int(image)].iloc[0]
        exp = exps[method or next(iter(exps))]
        kwargs.pop("shared_scale", None)  # one map per figure: nothing to share
        kwargs.setdefault("background", volume_background(results, row, tuple(exp.shape[2:])))
        if row["spacing"] is not None:
            kwargs.setdefault("spacing", tuple(float(v) for v in row["spacing"])[::-1])
        return volume_figure(exp, 0, int(kwargs.pop("target", 0)), **kwargs)
    if method is not None:
        return explanation_figure(exps[method], 0, **kwargs)
    if len(exps) == 1:
        return explanation_figure(next(iter(exps.values())), 0, **kwargs)
    return montage(exps, 0, **kwargs)


def volume_background(results: Results, row: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The scan (or the clip's frames, channel mean of the model's input) of a volume store's row,
    read again from its source with the run's reader settings; ``None`` when it is gone or changed."""
    from camlens.pipeline.volumes import VolumeFiles, VolumeReader

    sig = results.run.get("signature", {}).get("volumes")
    if not isinstance(sig, dict):
        return None
    try:
        reader = VolumeReader(**{**sig, "size": tuple(sig.get("size", (112, 112))), "channels": 1})
        item = VolumeFiles([str(row["source"])], reader)[0]
    except Exception:  # moved, unreadable: the montage without a background
        return None
    x = item.get("x")
    if x is None or tuple(x.shape[1:]) != tuple(shape):
        return None
    return x.float().mean(0).numpy()


def draw_volume_figures(results: Results, folder: Path, top: int | None) -> int:
    """The slice montage of every volume, method and class (``top``: the first ``top`` classes) of a
    volume store, as ``FOLDER/NAME_METHOD_topRANK.png``; files already there are kept (a resumed run
    draws only the new ones). Returns how many were drawn."""
    from camlens.base.fsio import atomic_write
    from camlens.viz import figure_png

    t = results.table
    drawn = 0
    for image in sorted(set(int(i) for i in t["image_id"])):
        rows = t[(t["image_id"] == image) & ((t["rank"] <= top) if top else True)]
        todo = [(str(r["method"]), int(r["rank"])) for _, r in rows.iterrows()]
        name = str(rows["name"].iloc[0])
        todo = [(m, k) for m, k in todo if not (folder / f"{name}_{m}_top{k}.png").exists()]
        for m, k in todo:
            fig = stored_figure(results, image, m, target=k - 1)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"{name}_{m}_top{k}.png", figure_png(fig), overwrite=True)
            drawn += 1
    return drawn


__all__ = ["draw_volume_figures", "stored_explanations", "stored_figure", "volume_background"]
