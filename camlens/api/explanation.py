"""The :class:`Explanation` returned by :func:`camlens.explain`."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from camlens.base.backends import backend
from camlens.base.errors import InputError
from camlens.base.localization import explanation_boxes
from camlens.base.ops import ULPS, minmax


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)``: 1-D linear interpolation with ``align_corners=False`` as a matrix (column
    ``j`` is :func:`torch.nn.functional.interpolate` of the unit impulse at ``j``)."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    r"""Bilinear resize of float32 ``(..., h, w)`` maps to ``size = (H, W)`` (``align_corners=False``);
    trilinear of ``(..., d, h, w)`` maps (volumes, clips) to ``size = (D, H, W)``.

    The same numbers as ``F.interpolate(..., mode="bilinear", align_corners=False)`` (to float
    rounding), computed as :math:`W_y\,M\,W_x^T` with the two 1-D interpolation matrices: two
    small matrix products instead of a gather per output pixel (EfficientNet-Lite0, 16 images x
    100 classes, 7x7 -> 224x224, CPU, 1 thread: 140 ms instead of 230 ms). Trilinear interpolation
    is separable too: a third product with :math:`W_z` along the depth axis (``mode="trilinear"``).
    """
    if len(size) == 3:
        return _upsample3d(maps, (int(size[0]), int(size[1]), int(size[2])))
    m = maps.float()
    h, w = m.shape[-2:]
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return m.clone()
    wy = _interp_matrix(h, H).to(device=m.device, dtype=m.dtype)
    wx = _interp_matrix(w, W).to(device=m.device, dtype=m.dtype)
    return torch.matmul(torch.matmul(wy, m), wx.T)


def _upsample3d(maps: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """:func:`upsample` of ``(..., d, h, w)`` maps to ``size = (D, H, W)``: bilinear per slice, then
    linear along the depth axis."""
    m = maps.float()
    d = m.shape[-3]
    D, H, W = size
    planes = upsample(m, (H, W))  # (..., d, H, W)
    if d == D:
        return planes
    wz = _interp_matrix(d, D).to(device=m.device, dtype=m.dtype)
    return torch.matmul(wz, planes.flatten(-2)).unflatten(-1, (H, W))


@dataclass(frozen=True)
class Upsampled:
    """Maps not computed yet: ``upsample(source, size)``, done on first access of
    :attr:`Explanation.maps` (and kept), or one image at a time by :meth:`Explanation.image_maps`.

    Layer methods return ``(N, K, h, w)`` maps at feature resolution; at input resolution the same
    maps are ``(H·W)/(h·w)`` times larger (EfficientNet-Lite0, 16 images × 100 classes: 306 MiB of
    float32 from 3 MiB). Computing them only when asked keeps :func:`camlens.explain` at the memory
    of its forward pass, and lets figures, boxes and files go image by image.
    """

    source: torch.Tensor  # (N, K, h, w), or (N, K, d, h, w) for volumes and clips
    size: tuple[int, ...]  # (H, W), or (D, H, W)

    @property
    def shape(self) -> tuple[int, ...]:
        n, k = self.source.shape[:2]
        return (int(n), int(k), *(int(s) for s in self.size))

    def compute(self, index: Any = slice(None)) -> torch.Tensor:
        return upsample(self.source[index].detach(), self.size)


_COMPUTING = threading.Lock()


class _MapsField:
    """The ``maps`` field of :class:`Explanation`: a float32 tensor, or an :class:`Upsampled`
    computed on first access (then kept; assigning a tensor replaces both)."""

    def __get__(self, obj: Any, objtype: Any = None) -> torch.Tensor:
        if obj is None:  # no class-level default: the dataclass field stays a required argument
            raise AttributeError("maps")
        v = obj.__dict__["_maps"]
        if not isinstance(v, Upsampled):
            return v
        cached = obj.__dict__.get("_maps_cache")
        if cached is None:
            with _COMPUTING:  # two threads asking at once get the same tensor, computed once
                cached = obj.__dict__.get("_maps_cache")
                if cached is None:
                    cached = obj.__dict__["_maps_cache"] = v.compute()
        return cached

    def __set__(self, obj: Any, value: torch.Tensor | Upsampled) -> None:
        obj.__dict__["_maps"] = value
        obj.__dict__.pop("_maps_cache", None)


#: what titles, tables and summaries say of a model whose weights are random (``weights="random"``)
RANDOM_WEIGHTS = "random weights"

#: extras that hold one entry per image (target objects' boxes and masks, LIME/KernelSHAP's
#: superpixels and fits), sliced by ``select``
PER_IMAGE_EXTRAS = ("boxes", "detections", "masks", "image_sizes", "segments", "segment_weights", "intercept", "r2")


@dataclass
class Explanation:
    """Maps for ``N`` images x ``K`` target classes, plus what produced them.

    Attributes:
        maps: float32 ``(N, K, H, W)`` at input resolution, un-normalized (``(N, K, D, H, W)`` for
            volume and clip inputs ``(N, C, D, H, W)``: :attr:`spatial_dims` says which). For layer
            methods they are computed from ``raw`` (bilinear, trilinear for volumes: :func:`upsample`)
            on first access and then kept;
            :meth:`image_maps` gives one image's maps without building all of them, and
            ``shape``, ``len``, :meth:`select`, :meth:`boxes` and :meth:`save` never build them all.
        raw: the method's unreduced output: ``(N, K, h, w)`` at feature resolution for layer
            methods (CAM family), ``(N, K, C, H, W)`` for pixel methods.
        classes: ``(N, K)`` class ids (``-1`` for a callable target).
        scores: ``(N, K)`` target logits (or callable scores).
        probs: ``(N, K)`` softmax probabilities of those classes (NaN for callable targets).
        method: registered method name.
        layer: description of the captured layer (``None`` for pixel methods without one).
        class_names: all class names of the model, if known.
        images: the original RGB uint8 images when ``inputs`` were images (for overlays).
        sources: a name per image (file stem, or ``image0``…), used to name output files.
        model_name: the model's zoo name, if known.
        extras: method-specific results (e.g. Integrated Gradients' completeness error), and what
            a target object adds: ``"boxes"`` ``(N, K, 4)`` explained boxes of a detector (original
            pixels, NaN rows: padding) and ``"detections"`` ``(N, K)`` each one's index in the
            model's own detections (``-1``: a given box or padding), ``"masks"`` ``(N, K, h, w)`` explained regions of a
            segmenter, ``"image_sizes"`` for a batch of different-size images, ``"weights":
            "random"`` when the model's card says its weights are random (:attr:`random_weights`).
        ranks: ``(N, K)`` 1-based rank of each target's logit among all classes (``1``: the top
            class), ``None`` when unknown (callable targets, hand-built explanations). Titles and
            file names claim a rank only from here.
        inputs: for tensor inputs, the input batch (a reference, no copy): figures show it
            de-normalized with ``preprocess`` (the model's, when known) instead of a grey panel.
        preprocess: the preprocessing the input went through, if known.
        logits: the model's ``(N, num_classes)`` logits from the same forward pass (``None`` when
            unknown), so that :meth:`top` needs no second forward.
    """

    if TYPE_CHECKING:  # a tensor to type checkers; ``maps=`` also takes an Upsampled (cast to Tensor)
        maps: torch.Tensor
    else:
        maps: torch.Tensor = _MapsField()
    raw: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    method: str
    layer: str | None = None
    class_names: list[str] | None = None
    images: list[np.ndarray] | None = None
    sources: list[str] | None = None
    model_name: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    inputs: torch.Tensor | None = field(default=None, repr=False)
    preprocess: Any = field(default=None, repr=False)

    @property
    def spatial_dims(self) -> int:
        """How many spatial axes the maps have: 2 for images ``(N, K, H, W)``, 3 for volumes and
        clips ``(N, K, D, H, W)`` (depth or time first). Code that must tell them apart asks this,
        never ``maps.dim()``."""
        return len(self.shape) - 2

    @property
    def kind(self) -> str:
        """What :attr:`raw` holds: ``"pixel"`` when it is an input-shaped attribution with a channel
        axis, ``(N, K, C, *spatial)`` (saliency, guided backprop, Integrated Gradients…), else
        ``"map"`` (``(N, K, *spatial)`` maps at feature or input resolution: the CAM family, RISE…).
        Asked instead of ``raw.dim() == 5``, which a volume's layer maps ``(N, K, d, h, w)`` also have."""
        return "pixel" if self.raw.dim() == len(self.shape) + 1 else "map"

    @property
    def signed(self) -> bool:
        """Whether the maps are signed: the method says so (``extras["signed"]``: the sign carries
        meaning, e.g. CAM of an absent class is negative), or a map has negative values anyway.
        Signed maps are drawn with a diverging colormap centred at zero; unsigned ones with jet."""
        return bool(self.extras.get("signed", False)) or bool((self._small_maps() < 0).any())

    def _small_maps(self) -> torch.Tensor:
        """The maps at the smallest resolution held: ``raw`` for lazy maps (the upsampled maps are
        convex combinations of its values), else ``maps``."""
        v = self.__dict__["_maps"]
        return v.source if isinstance(v, Upsampled) else self.maps

    @property
    def lazy(self) -> bool:
        """Whether :attr:`maps` is computed from ``raw`` on access (and not yet computed)."""
        return isinstance(self.__dict__["_maps"], Upsampled) and "_maps_cache" not in self.__dict__

    def _maps_spec(self) -> torch.Tensor | Upsampled:
        """What the ``maps`` field holds: a tensor, or the :class:`Upsampled` that computes it."""
        v = self.__dict__["_maps"]
        return v if self.lazy else self.maps

    def image_maps(self, i: int) -> torch.Tensor:
        """The float32 ``(K, H, W)`` maps of image ``i``, computed alone when :attr:`maps` is lazy
        (memory of one image's maps, not of the batch's)."""
        v = self.__dict__["_maps"]
        if self.lazy:
            return v.compute(i)
        return self.maps[i]

    def map(self, i: int, k: int) -> torch.Tensor:
        """The float32 ``(H, W)`` map of image ``i`` for its ``k``-th target, computed alone when
        :attr:`maps` is lazy."""
        v = self.__dict__["_maps"]
        if self.lazy:
            return v.compute((i, k))
        return self.maps[i, k]

    def replace(self, **changes: Any) -> Explanation:
        """A copy with some fields changed (as :func:`dataclasses.replace`), keeping lazy maps lazy."""
        changes.setdefault("maps", self._maps_spec())
        return replace(self, **changes)

    @property
    def random_weights(self) -> bool:
        """Whether the model's weights were random (``load_model(..., weights="random")``, ``--weights
        random``): its classes and probabilities mean nothing, and titles and summaries say so."""
        return self.extras.get("weights") == "random"

    @property
    def class_agnostic(self) -> bool:
        """One map whatever the target class (Eigen-CAM): figures name no class."""
        return bool(self.extras.get("class_agnostic", False))

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, K, H, W)`` (``(N, K, D, H, W)`` for volumes) of :attr:`maps` (without computing lazy maps)."""
        v = self.__dict__["_maps"]
        return v.shape if isinstance(v, Upsampled) else tuple(v.shape)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __repr__(self) -> str:
        n, k, *spatial = self.shape
        return (
            f"Explanation(method={self.method!r}, layer={self.layer!r}, N={n}, K={k}, "
            f"maps={'x'.join(map(str, spatial))}, "
            f"classes={self.labels()})"
        )

    def normalized(self, *, ulps: float = ULPS) -> torch.Tensor:
        """Maps min-max normalized per map to [0, 1] by :func:`camlens.base.ops.minmax`: a map constant up
        to rounding (range within ``ulps`` float32 units of its magnitude) -> zeros; never NaN. A volume's
        map is normalized as a whole (not slice by slice)."""
        return minmax(self.maps.float(), dims=tuple(range(-self.spatial_dims, 0)), ulps=ulps)

    def labels(self) -> list[list[str]]:
        """Class names (or ids as strings) of ``classes``, ``(N, K)`` nested lists; a text target's
        prompts (``extras["prompts"]``), or ``"custom"`` for another target."""
        prompts = self.extras.get("prompts") if isinstance(self.extras, dict) else None
        out = []
        for row in self.classes.tolist():
            out.append(
                [
                    (prompts[k] if prompts and k < len(prompts) else "custom")
                    if c < 0
                    else (self.class_names[c] if self.class_names and c < len(self.class_names) else str(c))
                    for k, c in enumerate(row)
                ]
            )
        return out

    def top(self, k: int = 5) -> list[list[tuple[int, str, float]]]:
        """The model's ``k`` most probable classes per image, over all its logits (not only the
        explained targets): ``[[(class_id, name, probability), …], …]``, as :func:`camlens.predict`
        returns them, from the logits of the explaining forward pass (no second forward)."""
        if self.logits is None:
            raise InputError("this explanation carries no logits; use camlens.predict(model, images, topk=k)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be an integer >= 1, not {k!r}")
        p = self.logits.detach().float().softmax(dim=1)
        v, i = p.topk(min(k, p.shape[1]), dim=1)
        names = self.class_names
        return [
            [(int(c), names[c] if names and c < len(names) else str(int(c)), float(q)) for q, c in zip(vr, ir)]
            for vr, ir in zip(v.tolist(), i.tolist())
        ]

    def to(self, device: torch.device | str) -> Explanation:
        """A copy with tensors on ``device``."""
        v = self._maps_spec()
        maps = Upsampled(v.source.to(device), v.size) if isinstance(v, Upsampled) else v.to(device)
        return replace(
            self,
            maps=cast(torch.Tensor, maps),
            raw=self.raw.to(device),
            classes=self.classes.to(device),
            scores=self.scores.to(device),
            probs=self.probs.to(device),
            ranks=None if self.ranks is None else self.ranks.to(device),
            logits=None if self.logits is None else self.logits.to(device),
        )

    def cpu(self) -> Explanation:
        return self.to("cpu")

    def select(self, index) -> Explanation:
        """A sub-explanation for some images: ``exp.select([0, 2])`` or ``exp.select(slice(0, 4))``."""
        idx = [index] if isinstance(index, int) else index
        rows = list(range(len(self)))[idx] if isinstance(idx, slice) else list(idx)
        v = self._maps_spec()
        return replace(
            self,
            maps=cast(torch.Tensor, Upsampled(v.source[idx], v.size)) if isinstance(v, Upsampled) else v[idx],
            raw=self.raw[idx],
            classes=self.classes[idx],
            scores=self.scores[idx],
            probs=self.probs[idx],
            ranks=None if self.ranks is None else self.ranks[idx],
            logits=None if self.logits is None else self.logits[idx],
            images=[self.images[i] for i in rows] if self.images else None,
            inputs=None if self.inputs is None else self.inputs[idx],
            sources=[self.sources[i] for i in rows] if self.sources else None,
            extras={
                k: ([v[i] for i in rows] if isinstance(v, list) else v[rows]) if k in PER_IMAGE_EXTRAS else v
                for k, v in self.extras.items()
            },
        )

    def first_targets(self, t: int) -> Explanation:
        """The first ``t`` targets of every image (``first_targets(1)``: the top-1 of a top-k
        explanation), lazy maps kept lazy."""
        v = self._maps_spec()
        maps = Upsampled(v.source[:, :t], v.size) if isinstance(v, Upsampled) else v[:, :t]
        return replace(
            self,
            maps=cast(torch.Tensor, maps),
            raw=self.raw[:, :t],
            classes=self.classes[:, :t],
            scores=self.scores[:, :t],
            probs=self.probs[:, :t],
            ranks=None if self.ranks is None else self.ranks[:, :t],
        )

    # --- localization, figures and export: thin calls into the "figures" backend (camlens.viz, declared
    # by the package root; this module stays data and imports no figure code) ---------------------
    def boxes(self, threshold: float | None = None, *, frame: str = "auto", **kwargs) -> np.ndarray:
        """Bounding boxes ``(N, K, 4)`` as ``(x0, y0, x1, y1)`` (exclusive), see :func:`camlens.localize`.

        In **original-image pixels** when the images are known (inputs given as paths, PIL images or
        arrays), else in model-input pixels; ``frame="input"`` asks for model-input (map) pixels,
        ``frame="image"`` insists on image pixels. The result is a :class:`camlens.base.localization.Boxes`
        array whose ``.frame`` says which (``"image"`` or ``"input"``) and ``.sizes`` the frame sizes.
        """
        kw = dict(kwargs)
        if threshold is not None:
            kw["threshold"] = threshold
        return explanation_boxes(self, frame=frame, **kw)

    def figure(self, **kwargs):
        """The overlays as a :class:`matplotlib.figure.Figure` (no display); see
        :func:`camlens.viz.explanation_figure` for the options. Volume and clip maps: one map's
        ``kind="montage"`` (default), ``"threeview"`` or ``"strip"`` (frames), see
        :func:`camlens.viz.clip_explanation_figure` (``index=``, ``target=`` pick the map)."""
        figures = backend("figures")
        if self.spatial_dims == 3:
            return figures.clip_explanation_figure(self, **kwargs)
        if "kind" in kwargs:
            raise InputError(
                f"kind={kwargs['kind']!r} is for volume and clip maps (N, K, D, H, W); these are {self.shape}"
            )
        return figures.explanation_figure(self, **kwargs)

    def show(self, **kwargs) -> None:
        """Display the overlays now: inline in Jupyter/IPython (also when ``show()`` is not the
        cell's last expression, e.g. ``exp.show(); exp.save("out/")``), in a window in a script
        with an interactive matplotlib backend; with a non-interactive backend (Agg) there is
        nothing to display. Returns ``None``; :meth:`figure` returns the figure itself."""
        backend("figures").display_figure(self.figure(**kwargs))

    def _repr_png_(self) -> bytes:
        """The figure as PNG bytes (IPython shows an ``Explanation`` as its overlays)."""
        return backend("figures").figure_png(self.figure(**({} if self.spatial_dims == 3 else {"max_images": 4})))

    def _repr_html_(self) -> str:
        """A summary line and the figure, for notebooks."""
        import base64
        import html

        png = base64.b64encode(self._repr_png_()).decode("ascii")
        return (
            f"<div><code>{html.escape(repr(self))}</code><br>"
            f'<img src="data:image/png;base64,{png}" style="max-width:100%"/></div>'
        )

    def save(self, directory: str | Path, **kwargs) -> list[Path]:
        """Write PNG overlays, ``.npy`` maps and a JSON summary to ``directory``; returns the paths."""
        return backend("figures").save_explanation(self, directory, **kwargs)
