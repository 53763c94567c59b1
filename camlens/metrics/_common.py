"""Shared plumbing for the metrics: inputs, maps, targets, pixel ranking, substrates, batched scoring.

Conventions used by every metric in :mod:`camlens.metrics`:

* **Model output.** The score of an image is the *softmax probability* of its target class,
  :math:`p_c(x) = \\mathrm{softmax}(f(x))_c`, computed in float32 under
  :func:`torch.inference_mode` with every module in eval mode (the user's flags are restored).
* **Targets.** ``None`` means the top-1 class of the *unperturbed* image; an int, ``N`` ints, class
  names or ``"top1"`` are accepted (see :mod:`camlens.targets`); only the first target per image
  is used. Callable targets have no class probability and are refused. A target object
  (:class:`~camlens.targets.Detection`, :class:`~camlens.targets.Segmentation`,
  :class:`~camlens.targets.Text`…) is bound on the clean images and scored by its own first
  score instead (:class:`TargetScores`: a detection's class score x IoU, a region's summed logits,
  an image–text logit), the references fixed for every perturbed copy.
* **Maps.** ``(N, H, W)`` (or ``(N, 1, H, W)``) at input resolution, a NumPy array or tensor; a map
  of another size is resized bilinearly. Also accepted: an :class:`~camlens.Explanation` (its
  first target; its classes become the default targets), a registered method name
  (``"gradcam"``…: computed with :func:`camlens.explain` for the targets), ``"random"`` (a smooth
  random map, the random-map baseline for CAMs), ``"random_pixels"`` (i.i.d. per-pixel noise, the
  baseline for pixel attributions) or ``"centre"`` (decreasing with the distance to the image
  centre, the centre baseline of the pointing game); see :func:`baseline_maps`.
* **Ranking and ties.** Pixels are ranked by decreasing map value. Ties (constant or all-zero maps,
  plateaus after ReLU) are broken by a random permutation of the pixels drawn from ``seed``: the
  order is the stable sort of the randomly permuted pixels, so a constant map behaves like a
  random pixel order and results are reproducible (independent of device and batching). No metric
  divides by a map's range, so no map gives NaN.
* **Memory.** Perturbed images are built and scored ``batch_size`` at a time (default 4 on the CPU,
  64 on an accelerator: :func:`metric_batch`): memory does not grow
  with the number of steps. Results are CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from camlens.api.explainer import ExplainRequest, explain, run_request
from camlens.api.explanation import Explanation
from camlens.attribution.registry import get_method
from camlens.base._util import eval_mode, gaussian_kernel1d, model_device
from camlens.base._util import gaussian_blur as _blur
from camlens.base.defaults import EXPLAIN_BATCH, forward_batch
from camlens.base.errors import InputError, TargetError
from camlens.core.engine import model_input
from camlens.core.inputs import prepare_inputs
from camlens.core.outputs import select_output
from camlens.models.zoo import card_of, load_model
from camlens.targets import Detection, Segmentation, is_target_object, resolve_targets, take_rows

MapsLike = Union[torch.Tensor, np.ndarray, Explanation, str]  # noqa: UP007 (a runtime alias)
Substrate = Union[str, float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]  # noqa: UP007

#: map names that are baselines rather than registered methods
BASELINES = ("random", "random_pixels", "centre", "center")


def _is_baseline(name: str) -> bool:
    return name.strip().lower() in BASELINES


# --------------------------------------------------------------------------------------------
# model scoring
# --------------------------------------------------------------------------------------------
def _check_logits(out: Any) -> torch.Tensor:
    """The ``(N, num_classes)`` logits in a model output (a tensor, ``(logits, aux)``, a dict, a Hugging
    Face ``ModelOutput``…; see :func:`camlens.core.outputs.select_output`)."""
    return select_output(out)[0]


def logits_of(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """``model(x)`` in eval mode and inference mode, ``batch_size`` images at a time (float32;
    default :func:`metric_batch`)."""
    batch_size = metric_batch(batch_size, x.device)
    outs = []
    with eval_mode(model), torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            outs.append(_check_logits(model(model_input(x[i : i + batch_size]))).float())
    return torch.cat(outs)


class TargetScores:
    r"""A target object (:class:`~camlens.targets.Detection`, :class:`~camlens.targets.Segmentation`,
    :class:`~camlens.targets.Text`, or a user's) bound on the clean images: what the metrics score
    instead of a class probability. Image ``i`` and each of its perturbed copies score
    :math:`y_i = T(f(x))_{i, 0}` — the target's own first score (a detection's matched class score
    :math:`\times` IoU, a region's summed class logits, an image–text logit) with the references fixed
    on the clean pass. :meth:`explain_spec` gives the same references as a target for
    :func:`camlens.explain` (maps of perturbed or randomized copies explain the same boxes / region).
    """

    def __init__(self, bound: Any, spec: Any, n: int) -> None:
        self.bound, self.spec, self.n = bound, spec, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: Any) -> TargetScores:
        idx = list(range(self.n))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
        return TargetScores(take_rows(self.bound, idx), self.spec, len(idx))

    def score(self, output: Any, rows: Sequence[int]) -> torch.Tensor:
        """``(B,)`` float32 scores of a batch of copies of the images ``rows``."""
        return take_rows(self.bound, list(rows))(output)[:, 0].float()

    def explain_spec(self, rows: Sequence[int]) -> Any:
        """The target of the images ``rows`` for :func:`camlens.explain`, references fixed (own
        detections become given boxes, a predicted region a given mask); a row-wise target as given."""
        b = take_rows(self.bound, list(rows))
        if isinstance(b, Detection):
            boxes, labels = b.reference_boxes, b.labels
            keep = [~torch.isnan(r[:, 0]) for r in boxes]
            return Detection(
                [r[k].numpy() for r, k in zip(boxes, keep)], [lb[k].numpy() for lb, k in zip(labels, keep)], b.iou
            )
        if isinstance(b, Segmentation):
            cats = b.labels
            assert cats is not None and b._masks is not None
            if cats.shape[1] != 1 or len(set(cats[:, 0].tolist())) > 1:
                raise TargetError(
                    "the images' predicted classes differ; pass targets=Segmentation(category) to score one class"
                )
            return Segmentation(int(cats[0, 0]), mask=b._masks[:, 0].cpu())
        return self.spec

    def describe(self) -> list[Any]:
        """What decides the scores (for a run's signature): the target's settings and references."""
        parts: list[Any] = [
            type(self.spec).__name__,
            {k: repr(v) for k, v in vars(self.spec).items() if not k.startswith("_")},
        ]
        if isinstance(self.bound, Detection):
            parts += [self.bound.reference_boxes, self.bound.labels]
        elif isinstance(self.bound, Segmentation):
            parts += [self.bound.labels, self.bound._masks]
        return parts


#: what the metrics score per image: class ids ``(N,)`` (softmax probabilities) or a bound target object
Scored = Union[torch.Tensor, TargetScores]  # noqa: UP007 (a runtime alias)


def target_scores(model: nn.Module, x: torch.Tensor, target: Any) -> TargetScores:
    """Bind a target object on the clean forward pass of ``x`` (one pass, inference mode)."""
    with eval_mode(model), torch.inference_mode():
        out = model(model_input(x))
    bound = target.bind(out, model)
    empty = bound.empty_rows(None) if callable(getattr(bound, "empty_rows", None)) else {}
    if empty:
        i, why = next(iter(empty.items()))
        raise TargetError(
            f"{len(empty)} image(s) have nothing to score (image {i}: {why}); drop them or change the target"
        )
    return TargetScores(bound, target, int(x.shape[0]))


def _scores(out: Any, classes: torch.Tensor | TargetScores, rows: list[int]) -> torch.Tensor:
    if isinstance(classes, TargetScores):
        return classes.score(out, rows).cpu()
    p = _check_logits(out).float().softmax(dim=1)
    c = classes[rows].to(p.device)
    return p.gather(1, c[:, None])[:, 0].cpu()


def explain_targets(classes: torch.Tensor | TargetScores, rows: slice) -> Any:
    """What :func:`camlens.explain` takes for the images ``rows``: ``(B, 1)`` class ids, or the fixed target."""
    if isinstance(classes, TargetScores):
        return classes.explain_spec(list(range(len(classes)))[rows])
    return classes[rows, None] if classes.dim() == 1 else classes[rows]


def class_probs(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Softmax probability of ``classes[i]`` for image ``x[i]``, ``(N,)`` on the CPU (a
    :class:`TargetScores`: the target's score)."""
    batch_size = metric_batch(batch_size, x.device)
    out = []
    with eval_mode(model), torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            rows = list(range(i, min(i + batch_size, x.shape[0])))
            out.append(_scores(model(model_input(x[i : i + batch_size])), classes, rows))
    return torch.cat(out)


def scored_batches(
    model: nn.Module,
    items: Sequence[tuple[int, Any]],
    make: Callable[[list[tuple[int, Any]]], torch.Tensor],
    classes: torch.Tensor,
    batch_size: int | None,
) -> torch.Tensor:
    """Score many perturbed images without holding them all: ``items`` are ``(image index, step)``
    pairs, ``make(chunk)`` builds the ``(B, C, H, W)`` batch of one chunk (``batch_size`` items,
    default :func:`metric_batch` on the model's device); returns ``(len(items),)`` target-class
    probabilities (a :class:`TargetScores`: the target's scores) on the CPU."""
    batch_size = metric_batch(batch_size, model_device(model))
    out = torch.empty(len(items))
    forward = ChannelsLastForward(model)
    with eval_mode(model), torch.inference_mode():
        for i in range(0, len(items), batch_size):
            chunk = list(items[i : i + batch_size])
            xb = make(chunk)
            out[i : i + len(chunk)] = _scores(forward(xb), classes, [n for n, _ in chunk])
    return out


class ChannelsLastForward:
    """``model(x)`` for many batches of perturbed images. On the CPU, a CNN's convolutions run 1.2-2x
    faster on a channels-last batch (EfficientNet-Lite0, 8 images: 22 -> 13 ms per image), so a 4-D
    batch is handed over in that layout (a copy: the caller's tensor is never changed) -- once the
    first batch has given the same output both ways (relative difference <= 1e-4); a model that
    refuses it (``x.view`` on a non-contiguous tensor) or gives other numbers keeps the plain layout.
    The first batch's output is always the plain one."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.channels_last: bool | None = None if convolutional and model_device(model).type == "cpu" else False

    def __call__(self, xb: Any) -> Any:
        if self.channels_last is False or not isinstance(xb, torch.Tensor) or xb.dim() != 4:
            return self.model(model_input(xb))
        if self.channels_last:
            return self.model(xb.clone(memory_format=torch.channels_last))
        plain = self.model(model_input(xb))
        try:
            fast = self.model(xb.clone(memory_format=torch.channels_last))
        except RuntimeError:
            self.channels_last = False
            return plain
        self.channels_last = _same_output(plain, fast)
        return plain


def _same_output(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool(torch.isfinite(b).all()) and float((a - b).abs().max()) <= 1e-4 * max(scale, 1e-6)


# --------------------------------------------------------------------------------------------
# inputs, targets and maps
# --------------------------------------------------------------------------------------------
def metric_batch(batch_size: int | None, device: torch.device) -> int:
    """``batch_size``, checked; ``None``: the default number of perturbed copies per forward on
    ``device`` (:func:`camlens.base.defaults.forward_batch`: 4 on the CPU, whose cache small
    batches fit, 64 on an accelerator)."""
    return forward_batch(device.type) if batch_size is None else check_batch_size(batch_size)


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
    return int(batch_size)


def resolve_classes(
    model: nn.Module | None,
    x: torch.Tensor,
    targets: Any,
    batch_size: int | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets -> ``(N,)`` long class ids (first target of each image), on the CPU.

    With a model, ``None`` / ``"top1"`` / names are resolved on the model's output for ``x`` (one
    batched inference pass) and ids are checked against its number of classes. A target object
    (detection, segmentation, image–text…) is bound on the clean pass: a :class:`TargetScores`
    (the metrics then score the target's own score instead of a class probability).
    """
    if isinstance(targets, TargetScores):
        if len(targets) != x.shape[0]:
            raise InputError(f"the target was bound to {len(targets)} images, not {x.shape[0]}")
        return targets  # type: ignore[return-value]
    if model is not None and is_target_object(targets):
        return target_scores(model, x, targets)  # type: ignore[return-value]
    if isinstance(targets, torch.Tensor) and targets.dim() == 2 and targets.shape[1] > 1:
        targets = targets[:, :1]
    if model is None:
        if targets is None or isinstance(targets, str):
            raise InputError("targets=None (the top-1 class) or class names need the model; pass model=")
        logits = torch.empty(x.shape[0], 2**31 - 1, device="meta")  # shape only: ids are not range-checked
        t = resolve_targets(targets, logits)
    else:
        if logits is None:
            logits = logits_of(model, x, batch_size)
        card = card_of(model)
        t = resolve_targets(targets, logits, card.class_names if card else None)
    if t.fn is not None:
        raise TargetError(
            "metrics need class ids (they score the softmax probability of a class); a callable target "
            "has no class probability: pass class indices or names"
        )
    return t.classes[:, 0].cpu()


def _maps_shape(size: tuple[int, ...]) -> str:
    return "(N, H, W)" if len(size) == 2 else "(N, D, H, W)"


def as_maps(maps: Any, n: int, size: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Array-like maps -> float32 ``(N, H, W)`` tensor on ``device`` at ``size`` (bilinear resize);
    with a ``(D, H, W)`` size, ``(N, D, H, W)`` volume maps (trilinear resize)."""
    nd = len(size)
    if isinstance(maps, Explanation):
        maps = maps.maps[:, 0]
    if isinstance(maps, np.ndarray):
        maps = torch.from_numpy(np.ascontiguousarray(maps))
    if not isinstance(maps, torch.Tensor):
        raise InputError(
            f"maps must be an {_maps_shape(size)} tensor or array, an Explanation, a method name or 'random'; "
            f"got {type(maps).__name__}"
        )
    m = maps.detach()
    if m.dim() == nd + 2 and m.shape[1] == 1:
        m = m[:, 0]
    elif m.dim() == nd and n == 1:
        m = m[None]
    if m.dim() != nd + 1:
        fix = " Pick one target with maps[:, k]." if m.dim() == nd + 2 else ""
        raise InputError(f"maps must have shape {_maps_shape(size)}; got {tuple(m.shape)}.{fix}")
    if m.shape[0] != n:
        raise InputError(f"{m.shape[0]} maps for {n} images: give one map per image")
    if m.dtype == torch.bool or not m.is_floating_point():
        m = m.float()
    m = m.to(device=device, dtype=torch.float32)
    if not torch.isfinite(m).all():
        raise InputError("maps contain NaN or infinite values; clean them first (torch.nan_to_num)")
    if tuple(m.shape[1:]) != tuple(size):
        mode = "bilinear" if nd == 2 else "trilinear"
        m = F.interpolate(m[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0]
    return m


def baseline_maps(
    name: str, n: int, size: tuple[int, ...], device: torch.device, seed: int = 0, cell: int = 32
) -> torch.Tensor:
    """Baseline maps ``(N, H, W)``.

    * ``"random"``: a smooth random map, like a random CAM: i.i.d. U(0, 1) values on a coarse grid
      of ``ceil(H / cell) x ceil(W / cell)`` cells (``cell=32``, the stride of the last feature map
      of most ImageNet CNNs), upsampled bilinearly to ``(H, W)``. This is the fair null for
      class-activation maps: an i.i.d. per-pixel map removes scattered pixels, which destroys the
      image much faster than removing any region does.
    * ``"random_pixels"``: i.i.d. U(0, 1) per pixel (the null for pixel-attribution methods).
    * ``"centre"``: ``1 - d / d_max`` with ``d`` the distance of a pixel to the image centre
      ``((H-1)/2, (W-1)/2)``.

    Random maps are drawn on the CPU from ``seed`` (the same maps on every device). With a
    ``(D, H, W)`` size: the same three in 3-D (coarse cells of ``cell`` voxels, trilinear; the
    distance to the volume's centre), ``(N, D, H, W)``.
    """
    if len(size) == 3:
        depth, height, width = (int(v) for v in size)
        return _baseline_volumes(name, n, (depth, height, width), device, seed, cell)
    h, w = size
    key = name.strip().lower()
    g = torch.Generator().manual_seed(int(seed) + 7919)
    if key == "random":
        gh, gw = max(1, math.ceil(h / cell)), max(1, math.ceil(w / cell))
        coarse = torch.rand(n, 1, gh, gw, generator=g)
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[:, 0].to(device)
    if key == "random_pixels":
        return torch.rand(n, h, w, generator=g).to(device)
    if key in ("centre", "center"):
        yy = torch.arange(h, dtype=torch.float32)[:, None] - (h - 1) / 2
        xx = torch.arange(w, dtype=torch.float32)[None, :] - (w - 1) / 2
        d = (yy.pow(2) + xx.pow(2)).sqrt()
        m = 1 - d / d.max().clamp_min(1e-12)
        return m.expand(n, h, w).clone().to(device)
    raise InputError(f"unknown baseline {name!r}; use 'random', 'random_pixels' or 'centre'")


def _baseline_volumes(
    name: str, n: int, size: tuple[int, int, int], device: torch.device, seed: int, cell: int
) -> torch.Tensor:
    """:func:`baseline_maps` of volumes ``(N, D, H, W)``."""
    key = name.strip().lower()
    g = torch.Generator().manual_seed(int(seed) + 7919)
    if key == "random":
        coarse = torch.rand(n, 1, *(max(1, math.ceil(s / cell)) for s in size), generator=g)
        return F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)[:, 0].to(device)
    if key == "random_pixels":
        return torch.rand(n, *size, generator=g).to(device)
    if key in ("centre", "center"):
        axes = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in size), indexing="ij")
        d = torch.stack([a.pow(2) for a in axes]).sum(0).sqrt()
        m = 1 - d / d.max().clamp_min(1e-12)
        return m.expand(n, *size).clone().to(device)
    raise InputError(f"unknown baseline {name!r}; use 'random', 'random_pixels' or 'centre'")


class Prepared:
    """``x`` ``(N, C, H, W)``, ``maps`` ``(N, H, W)`` float32 on ``x.device``, ``classes`` ``(N,)``;
    for volumes and clips ``x`` ``(N, C, D, H, W)`` and ``maps`` ``(N, D, H, W)``."""

    def __init__(
        self,
        x: torch.Tensor,
        maps: torch.Tensor | None,
        classes: torch.Tensor | None,
        images: list[np.ndarray] | None = None,
    ) -> None:
        self.x, self.images = x, images
        self._maps, self._classes = maps, classes

    @property
    def maps(self) -> torch.Tensor:
        """The ``(N, H, W)`` maps (every metric that reads them asked :func:`prepare` for them)."""
        if self._maps is None:
            raise InputError("this metric needs maps: pass maps= (a method name, 'random', or an array)")
        return self._maps

    @property
    def classes(self) -> torch.Tensor:
        """The ``(N,)`` explained classes."""
        if self._classes is None:
            raise InputError("this metric needs the explained classes: pass targets= or the model")
        return self._classes

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def size(self) -> tuple[int, ...]:
        """``(H, W)`` of the inputs, ``(D, H, W)`` of volumes and clips."""
        return tuple(int(v) for v in self.x.shape[2:])


def explain_kwargs(options: dict[str, Any] | ExplainRequest | None) -> dict[str, Any]:
    """The keyword arguments of :func:`camlens.explain` that ``options`` stands for: a dict as it is,
    an :class:`~camlens.api.explainer.ExplainRequest` as its layer, capture, call, output, reshape,
    precision and method options (its methods and targets are the caller's)."""
    if not isinstance(options, ExplainRequest):
        return dict(options or {})
    r = options
    fields = dict(layer=r.layer, capture=r.capture, call=r.call, output=r.output, reshape=r.reshape)
    return {**fields, "precision": r.precision, **r.options}


def explain_maps(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    classes: torch.Tensor,
    batch_size: int,
    options: dict[str, Any] | ExplainRequest | None = None,
) -> torch.Tensor:
    """Maps of ``method`` for ``classes`` ``(N,)`` (or ``(N, K)``), computed ``batch_size`` images at
    a time with :func:`camlens.explain`; ``(N, H, W)`` (or ``(N, K, H, W)``) float32. ``options``:
    the keyword arguments of :func:`camlens.explain` (``layer=``, method options…), or the
    :class:`~camlens.api.explainer.ExplainRequest` a caller already holds (its layer, capture,
    output, reshape, precision and options are used; its methods and targets are the metric's)."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        xs, ts = x[i : i + batch_size], explain_targets(classes, slice(i, i + batch_size))
        if isinstance(options, ExplainRequest):
            name = get_method(method).name
            e = run_request(model, xs, replace(options, methods=(name,), targets=ts))[name]
        else:
            e = explain(model, xs, method=method, targets=ts, **(options or {}))
        out.append(e.maps.detach().float())
    m = torch.cat(out)
    return m if not isinstance(classes, TargetScores) and classes.dim() == 2 else m[:, 0]


def prepare(
    model: nn.Module | None,
    inputs: Any,
    maps: MapsLike | None,
    targets: Any = None,
    *,
    preprocess=None,
    batch_size: int | None = None,
    seed: int = 0,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
    need_classes: bool = True,
) -> Prepared:
    """Resolve ``inputs``, ``targets`` and ``maps`` of a metric call (see the module docstring)."""
    if batch_size is not None:
        check_batch_size(batch_size)
    if isinstance(model, str):
        model = load_model(model)
    if model is not None and not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module or a zoo name, not {type(model).__name__}")
    if model is None:
        if not isinstance(inputs, torch.Tensor):
            raise InputError("image inputs need the model (for its preprocessing); pass model=")
        x, images = inputs, None
    else:
        x, images, _ = prepare_inputs(inputs, model, preprocess)
    x = x.detach()
    if isinstance(maps, Explanation) and targets is None:
        targets = maps.classes[:, 0]
    classes = None
    if need_classes or (isinstance(maps, str) and not _is_baseline(maps)):
        if model is None and targets is None:
            raise InputError("metrics with targets=None (the top-1 class) need the model")
        classes = resolve_classes(model, x, targets, batch_size)
    if x.dim() not in (4, 5):
        raise InputError(
            f"metrics take images (N, C, H, W) or volumes and clips (N, C, D, H, W); got inputs {tuple(x.shape)}"
        )
    size = tuple(int(v) for v in x.shape[2:])
    if maps is None:
        m = None
    elif isinstance(maps, str):
        if _is_baseline(maps):
            m = baseline_maps(maps, x.shape[0], size, x.device, seed)
        else:
            if model is None:
                raise InputError(f"maps={maps!r} names a method: pass the model to compute its maps")
            assert classes is not None  # resolved above for method maps
            m = explain_maps(model, x, maps, classes, batch_size or EXPLAIN_BATCH, explain_options)
    else:
        m = as_maps(maps, x.shape[0], size, x.device)
    return Prepared(x, m, classes, images)


# --------------------------------------------------------------------------------------------
# ranking
# --------------------------------------------------------------------------------------------
def pixel_order(maps: torch.Tensor, seed: int = 0, descending: bool = True) -> torch.Tensor:
    """Pixel indices ``(N, H*W)`` from the most to the least important (``descending=True``).

    Ties are broken by a uniformly random permutation of the pixels drawn from ``seed`` (on the
    CPU, the same for every image of the batch, so results do not depend on the device or on how
    images are batched): ``order = perm[stable_argsort(map[perm])]``.
    """
    flat = maps.flatten(1)
    n, p = flat.shape
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.rand(p, generator=g).argsort().to(flat.device).expand(n, p)
    idx = flat.gather(1, perm).argsort(dim=1, descending=descending, stable=True)
    return perm.gather(1, idx)


def pixel_rank(maps: torch.Tensor, seed: int = 0, descending: bool = True) -> torch.Tensor:
    """Rank of every pixel ``(N, H*W)`` in :func:`pixel_order` (0 = most important)."""
    order = pixel_order(maps, seed, descending)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return rank


# --------------------------------------------------------------------------------------------
# substrates (what removed pixels become)
# --------------------------------------------------------------------------------------------
def gaussian_blur(x: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur of each channel of ``(N, C, H, W)``, reflect padding
    (:func:`camlens.base._util.gaussian_blur`).

    The defaults (11 taps, :math:`\\sigma = 5`) are those of the RISE insertion metric
    (Petsiuk et al., BMVC 2018) for 224 x 224 inputs. Volumes and clips ``(N, C, D, H, W)`` are
    blurred in 3-D: each ``(H, W)`` slice as above, then along ``D`` with the same kernel (reflect
    padding; replicate when ``D`` is not larger than the kernel's radius).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"kernel_size must be a positive odd integer, not {kernel_size}")
    if x.dim() == 5:
        n, c, d, h, w = x.shape
        y = _blur(x.transpose(1, 2).reshape(n * d, c, h, w), sigma, kernel_size=kernel_size, mode="reflect")
        y = y.reshape(n, d, c, h, w).transpose(1, 2)
        r = kernel_size // 2
        k = gaussian_kernel1d(kernel_size, sigma, x.device, x.dtype).view(1, 1, -1, 1, 1)
        y = F.pad(y, (0, 0, 0, 0, r, r), mode="reflect" if d > r else "replicate")
        return F.conv3d(y, k.expand(c, 1, kernel_size, 1, 1), groups=c)
    return _blur(x, sigma, kernel_size=kernel_size, mode="reflect")


def make_substrate(x: torch.Tensor, substrate: Substrate) -> torch.Tensor:
    """What a removed pixel becomes, ``(N, C, H, W)`` like ``x`` (or ``(N, C, D, H, W)``: a removed
    voxel of a volume or clip; ``"blur"`` is then the 3-D blur, ``"mean"`` the mean over the volume).

    ``"zero"``: 0 in the model's input space (the dataset mean colour for mean/std-normalized
    inputs; RISE's deletion); ``"blur"``: :func:`gaussian_blur` of the image (RISE's insertion);
    ``"mean"``: each image's per-channel mean; a float: that constant; a tensor broadcastable to
    ``x``; or a callable ``x -> substrate``.
    """
    if isinstance(substrate, str):
        key = substrate.strip().lower()
        if key in ("zero", "zeros", "black"):
            return torch.zeros_like(x)
        if key == "blur":
            return gaussian_blur(x)
        if key == "mean":
            return x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x).clone()
        raise InputError(
            f"unknown substrate {substrate!r}; use 'zero', 'blur', 'mean', a number, a tensor or a callable x -> tensor"
        )
    if isinstance(substrate, (int, float)) and not isinstance(substrate, bool):
        return torch.full_like(x, float(substrate))
    if isinstance(substrate, torch.Tensor):
        try:
            return substrate.to(device=x.device, dtype=x.dtype).expand_as(x).clone()
        except RuntimeError:
            raise InputError(
                f"substrate of shape {tuple(substrate.shape)} does not broadcast to the inputs {tuple(x.shape)}"
            ) from None
    if callable(substrate):
        s = substrate(x)
        if not isinstance(s, torch.Tensor) or s.shape != x.shape:
            raise InputError("a substrate callable must return a tensor shaped like its input")
        return s.detach().to(x.dtype)
    raise InputError(f"cannot use {type(substrate).__name__} as a substrate")


def removed_counts(num_pixels: int, fractions: torch.Tensor) -> torch.Tensor:
    """``round(f * num_pixels)`` for each fraction, as ints."""
    return torch.round(fractions.double() * num_pixels).long()


def chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))
