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


def stored_explanations(results: Results, image: int) -> dict[str, Explanation]:
    """``{method: Explanation}`` of image ``image`` (its ``image_id``) as stored."""
    t = results.table
    rows = t[t["image_id"] == int(image)]
    if rows.empty:
        ids = sorted(set(int(i) for i in t["image_id"]))
        have = f"{ids[0]}..{ids[-1]} ({len(ids)} images)" if ids else "none"
        raise InputError(f"image {image} is not in the store {results.root}; image ids there: {have}")
    targets = results.run.get("signature", {}).get("targets")
    topk = targets is None or (isinstance(targets, str) and re.fullmatch(r"top\d+", targets) is not None)
    photo = _photo(str(rows["source"].iloc[0]))
    out: dict[str, Explanation] = {}
    for method, g in rows.groupby("method", sort=False):
        g = g.sort_values("rank")
        k = len(g)
        maps = torch.from_numpy(np.asarray(results.maps(str(method))[int(image), :k], dtype=np.float32))[None]
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
    (``shared_scale=True``, ``alpha``, ``cmap``…)."""
    exps = stored_explanations(results, image)
    if method is not None:
        if method not in exps:
            raise InputError(f"no {method!r} maps for image {image}; stored methods: {', '.join(exps)}")
        return explanation_figure(exps[method], 0, **kwargs)
    if len(exps) == 1:
        return explanation_figure(next(iter(exps.values())), 0, **kwargs)
    return montage(exps, 0, **kwargs)


__all__ = ["stored_explanations", "stored_figure"]
