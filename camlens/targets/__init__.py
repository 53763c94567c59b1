"""Resolve ``targets=``: which class scores to explain, as an ``(N, K)`` table of class ids.

Accepted forms (``N`` images, ``num_classes`` logits):

* ``None`` -> the top-1 class of each image (``K = 1``);
* ``int`` -> that class for every image;
* ``"topK"`` (``"top1"``, ``"top5"``…) -> the K highest logits of each image, best first;
* a class name or a list of names (needs the model's class names);
* a flat list (or 1-D array) -> **one target per image**: its length must be ``N`` (the
  convention of Captum and pytorch-grad-cam); ``[3, 5]`` for two images explains class 3 in the
  first and class 5 in the second;
* :class:`Classes` ``(3, 5)`` -> the same classes (ids or names) for every image, ``K = 2``;
* an ``(N, K)`` array / tensor / nested list of ints (``[[3, 5]]`` for one image: classes 3 and 5);
* a callable ``logits -> (N,)`` scores (multi-label sums, margins, regression…) -> ``K = 1``,
  with class id ``-1`` in :attr:`Explanation.classes`;
* a **target object** (:class:`Target` protocol): the model's *raw* output -> ``(N, K)`` scores,
  for models that are not classifiers: :class:`Detection` (boxes of a detector),
  :class:`Segmentation` (a region of a segmenter's logits), :class:`Similarity` (an embedding's
  cosine with a reference).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.base._util import eval_mode, model_device, model_dtype
from camlens.base.classnames import class_id
from camlens.base.errors import NonFiniteError, TargetError


class Classes:
    """The same classes for every image: ``Classes(3, 5)`` or ``Classes("tabby cat", "tiger cat")``
    explains classes 3 and 5 (``K = 2``) of each image, in :func:`camlens.explain`, in
    :func:`camlens.explain_dataset` and in the metrics alike.

    (A flat list means one target per image; see :mod:`camlens.targets`.)
    """

    __slots__ = ("ids",)

    def __init__(self, *ids: int | str) -> None:
        if len(ids) == 1 and isinstance(ids[0], (list, tuple)):
            ids = tuple(ids[0])
        if not ids:
            raise TargetError("Classes() needs at least one class id or name, e.g. Classes(3, 5)")
        for c in ids:
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer, str)):
                raise TargetError(f"Classes takes class ids (int) or names (str), not {c!r}")
        self.ids: tuple[int | str, ...] = tuple(c if isinstance(c, str) else int(c) for c in ids)

    def __repr__(self) -> str:
        return f"Classes({', '.join(map(repr, self.ids))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Classes) and other.ids == self.ids

    def __hash__(self) -> int:
        return hash(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int | str]:
        return iter(self.ids)


def flat_list_for_one_image(targets: Any, n: int) -> bool:
    """True for the old spelling ``targets=[3, 5]`` with one image (K classes of that image)."""
    if n != 1 or isinstance(targets, (str, Classes)) or callable(targets) or targets is None:
        return False
    if isinstance(targets, (int, np.integer, float, np.floating)):
        return False
    arr = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets, dtype=object)
    return arr.ndim == 1 and arr.shape[0] > 1


def deprecated_flat_list(targets: Sequence[Any], where: str = "explain") -> Classes:
    """The old reading of a flat list as the same classes for every image, with a DeprecationWarning
    naming the new spelling (kept for camlens 0.3; an error from 0.4)."""
    ids = [t.item() if hasattr(t, "item") else t for t in targets]
    fix = f"Classes({', '.join(map(repr, ids))})"
    warnings.warn(
        f"{where}: targets={list(ids)!r} reads as the same classes for every image; a flat list now means one "
        f"target per image. Pass targets=camlens.targets.{fix} (or [[...]] for one image) for these classes. "
        "This reading stops in camlens 0.4.",
        DeprecationWarning,
        stacklevel=3,
    )
    return Classes(*ids)


TargetSpec = None | int | str | Sequence | np.ndarray | torch.Tensor | Callable | Classes


@dataclass
class Targets:
    """Resolved targets: ``classes`` ``(N, K)`` long tensor (``-1`` for callables) and ``fn``;
    ``obj``: a bound :class:`Target` object (then :meth:`scores` takes the raw model output);
    ``skipped``: images whose target selects nothing (row -> why), reported, not explained."""

    classes: torch.Tensor
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    obj: Any = None
    skipped: dict[int, str] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.classes.shape[1])

    def scores(self, logits: Any) -> torch.Tensor:
        """The ``(N, K)`` target scores of a batch of logits (keeps the autograd graph); for a
        target object, of the raw model output. A batch of ``m`` copies of each image (SmoothGrad,
        Score-CAM…) is scored row ``i`` against image ``i // m``."""
        if self.obj is not None:
            b, n = output_batch_size(logits), self.classes.shape[0]
            obj = self.obj if b == n else take_rows(self.obj, torch.arange(n).repeat_interleave(b // n).tolist())
            return check_scores(obj(logits), b, self.k)
        if self.fn is not None:
            s = self.fn(logits)
            if not isinstance(s, torch.Tensor) or s.shape != (logits.shape[0],):
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise TargetError(
                    f"a callable target must return one score per image, shape ({logits.shape[0]},); got {shape}"
                )
            if logits.requires_grad and torch.is_grad_enabled() and not s.requires_grad:
                raise TargetError(
                    "the callable target returned scores that do not depend on the logits through autograd "
                    "(detached: .detach(), .item(), .numpy(), torch.no_grad() or a new tensor built from "
                    "values); compute them with torch operations on the logits it receives, e.g. "
                    "lambda logits: logits[:, [3, 7]].sum(1)"
                )
            return s[:, None]
        idx = self.classes.to(logits.device)
        if idx.shape[0] != logits.shape[0]:  # repeated batches (smoothgrad, IG, Score-CAM)
            idx = idx.repeat_interleave(logits.shape[0] // idx.shape[0], dim=0)
        return logits.gather(1, idx)


def check_scores(s: Any, n: int, k: int) -> torch.Tensor:
    """Check that a target object returned ``(n, k)`` scores."""
    if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[0] != n or (k and s.shape[1] != k):
        shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise TargetError(f"a target object must return (N, K) = ({n}, {k or 'K'}) scores; got {shape}")
    return s


def take_rows(obj: Any, rows: Sequence[int]) -> Any:
    """``obj.take(rows)`` when the target object has it (else the object itself: row-wise)."""
    take = getattr(obj, "take", None)
    return take(list(rows)) if callable(take) else obj


def bind_target(
    obj: Any, output: Any, model: nn.Module | None = None, image_sizes: Sequence[tuple[int, int]] | None = None
) -> Targets:
    """Bind a target object to the clean forward pass's raw ``output`` -> :class:`Targets`.

    Images whose target selects nothing (the object's optional ``empty_rows(image_sizes)``: no
    detection, an empty mask, a zero embedding) are never explained silently as zero maps: when
    every image is empty a :class:`TargetError` says why and what to change; otherwise a warning
    names them and :attr:`Targets.skipped` records them (``extras["skipped"]`` of the result).
    """
    bind = getattr(obj, "bind", None)
    bound = bind(output, model) if callable(bind) else obj
    n = output_batch_size(output)
    empty_rows = getattr(bound, "empty_rows", None)
    skipped: dict[int, str] = dict(empty_rows(image_sizes)) if callable(empty_rows) else {}
    if skipped:
        listed = "; ".join(f"image {i}: {r}" for i, r in sorted(skipped.items())[:8])
        if len(skipped) >= n:
            raise TargetError(f"the target selects nothing to explain ({listed})")
        warnings.warn(
            f"camlens: {len(skipped)} of {n} image(s) have nothing to explain and are skipped: their maps are "
            f"zero, not explanations, and extras['skipped'] lists them ({listed})",
            stacklevel=2,
        )
    with torch.no_grad():
        k = getattr(bound, "k", None)
        if not isinstance(k, int):
            k = int(check_scores(bound(output), n, 0).shape[1])
    labels = getattr(bound, "labels", None)
    classes = torch.full((n, k), -1, dtype=torch.long)
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == (n, k):
        classes = labels.detach().long().cpu().clone()
    return Targets(classes, obj=bound, skipped=skipped)


def _name_to_id(name: str, class_names: Sequence[str] | None) -> int:
    return class_id(name, class_names)


def resolve_targets(
    targets: TargetSpec,
    logits: torch.Tensor,
    class_names: Sequence[str] | None = None,
) -> Targets:
    """Resolve a target spec against ``logits`` ``(N, num_classes)``; see the module docstring."""
    n, num_classes = logits.shape
    if callable(targets) and not isinstance(targets, (str, torch.Tensor, np.ndarray)):
        return Targets(torch.full((n, 1), -1, dtype=torch.long), targets)
    if targets is None:
        targets = "top1"
    if flat_list_for_one_image(targets, n):
        targets = deprecated_flat_list(targets)  # type: ignore[arg-type]
    if isinstance(targets, Classes):  # names (and mixed names and ids) to ids once, for every image
        row = [_name_to_id(c, class_names) if isinstance(c, str) else c for c in targets.ids]
        targets = [list(row) for _ in range(n)]
    if isinstance(targets, str):
        m = re.fullmatch(r"top-?(\d+)", targets.strip().lower())
        if m:
            k = int(m.group(1))
            if not 1 <= k <= num_classes:
                raise TargetError(f"{targets!r}: k must be between 1 and the {num_classes} classes")
            return Targets(logits.detach().topk(k, dim=1).indices.cpu())
        targets = [targets]
        ids = torch.tensor([[_name_to_id(t, class_names) for t in targets]] * n)
        return Targets(ids)
    if isinstance(targets, (bool, np.bool_)):
        raise TargetError("targets must be class indices, names, 'topK' or a callable, not a bool")
    if isinstance(targets, (float, np.floating)):
        if not (np.isfinite(targets) and float(targets).is_integer()):
            raise TargetError(
                f"class index {targets!r} is not an integer; pass an int class id (e.g. targets=3), a class "
                "name, 'topK' or a callable"
            )
        targets = int(targets)  # an integral float (3.0), as integral float arrays are accepted
    if isinstance(targets, (int, np.integer)):
        arr = np.full((n, 1), int(targets))
    else:
        if isinstance(targets, torch.Tensor):
            targets = targets.detach().cpu().numpy()
        seq = list(targets) if not isinstance(targets, np.ndarray) else targets
        if len(seq) and all(isinstance(t, str) for t in np.ravel(np.asarray(seq, dtype=object))):
            arr = np.vectorize(lambda t: _name_to_id(t, class_names), otypes=[np.int64])(np.asarray(seq))
        else:
            try:
                arr = np.asarray(seq)
            except ValueError:
                raise TargetError("targets rows must all have the same number of classes") from None
            if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
                if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
                    arr = arr.astype(np.int64)
                else:
                    raise TargetError(f"targets must be integer class indices; got dtype {arr.dtype}")
        if arr.ndim == 1:
            if arr.shape[0] != n:
                raise TargetError(
                    f"{arr.shape[0]} targets for {n} images: a flat list gives one target per image. For the "
                    f"same classes in every image pass camlens.targets.Classes({', '.join(map(str, arr.tolist()))}); "
                    "for several classes per image an (N, K) table; or 'topK', or one int for all"
                )
            arr = arr[:, None]
        elif arr.ndim == 2:
            if arr.shape[0] != n:
                raise TargetError(f"targets table has {arr.shape[0]} rows for {n} images")
        else:
            raise TargetError(f"targets must be at most 2-D (N, K); got shape {arr.shape}")
        if arr.shape[1] == 0:
            raise TargetError("empty targets")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise TargetError(
            f"class index {int(bad.flat[0])} is out of range: the model has {num_classes} classes "
            f"(valid indices 0..{num_classes - 1})"
        )
    return Targets(torch.as_tensor(arr, dtype=torch.long))


# ==============================================================================================
# Target objects: the model's RAW output -> (N, K) scores (detection, segmentation, embeddings)
# ==============================================================================================
class Target:
    r"""Base class (and documented protocol) of a target object.

    A target object maps the model's **raw output** (whatever ``model(x)`` returns: a tensor, a
    dict such as torchvision segmenters' ``{"out": …}``, or a list of per-image dicts such as
    torchvision detectors' ``[{"boxes", "labels", "scores"}, …]``) to an ``(N, K)`` tensor of
    scores, keeping the autograd graph. Every method explains column ``k`` of that table.

    The protocol, for a user target (subclass this class, or give any object ``raw_output = True``):

    * ``__call__(output) -> (N, K)`` tensor (required);
    * ``bind(output, model) -> Target`` (optional): called once on the clean forward pass; returns
      the target with everything data-dependent fixed (for example which boxes are explained), so
      that the masked or noisy forwards of RISE, Score-CAM, SmoothGrad… are scored against the same
      references. The default returns ``self``;
    * ``take(rows) -> Target`` (optional): the target for the images ``rows`` of the bound batch
      (a list of ints, repeats allowed), used when a method scores a batch of copies of some
      images. The default returns ``self`` (right for targets that act row-wise);
    * ``labels`` (optional): ``(N, K)`` class ids of the targets (``-1``: none), for titles;
    * ``extras`` (optional): a dict copied into :attr:`Explanation.extras` (e.g. ``"boxes"``);
    * ``empty_rows(image_sizes) -> {row: reason}`` (optional, on the bound target): the images
      whose target selects nothing (``image_sizes``: each input image's ``(H, W)``, or ``None``).
      All images empty -> :class:`TargetError`; some -> a warning and ``extras["skipped"]``.

    Classification targets (class ids, ``"topK"``, names, callables ``logits -> (N,)``) keep
    working; they see the classification logits, a target object sees the raw output.
    """

    raw_output = True
    labels: torch.Tensor | None = None

    def __call__(self, output: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, output: Any, model: nn.Module | None = None) -> Target:
        return self

    def take(self, rows: Sequence[int]) -> Target:
        return self

    def empty_rows(self, image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[int, str]:
        return {}

    @property
    def extras(self) -> dict[str, Any]:
        return {}


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A detached tensor that autograd may save (a clone of an inference-mode tensor)."""
    t = t.detach()
    if t.is_inference():
        with torch.inference_mode(False):
            t = t.clone()
    return t


def is_target_object(t: Any) -> bool:
    """Whether ``t`` follows the :class:`Target` protocol (it receives the raw model output)."""
    return isinstance(t, Target) or (callable(t) and getattr(t, "raw_output", False) is True)


def output_batch_size(output: Any) -> int:
    """The number of images of a raw model output (tensor, dict with ``"out"``, list of dicts)."""
    if isinstance(output, torch.Tensor):
        return int(output.shape[0])
    if isinstance(output, Mapping):
        for v in output.values():
            if isinstance(v, torch.Tensor):
                return int(v.shape[0])
    if isinstance(output, (list, tuple)):
        if output and isinstance(output[0], Mapping):
            return len(output)
        for v in output:
            if isinstance(v, torch.Tensor):
                return int(v.shape[0])
    raise TargetError(f"cannot tell the batch size of a model output of type {type(output).__name__}")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Pairwise IoU of boxes ``a`` ``(A, 4)`` and ``b`` ``(B, 4)`` as ``(x0, y0, x1, y1)`` -> ``(A, B)``.

    :math:`\mathrm{IoU} = |a \cap b| / (|a| + |b| - |a \cap b|)` (differentiable; 0 for empty unions).
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def _detections(output: Any) -> list[Mapping[str, torch.Tensor]]:
    if isinstance(output, Mapping) and "boxes" in output:
        return [output]
    if isinstance(output, (list, tuple)) and all(isinstance(d, Mapping) and "boxes" in d for d in output):
        return list(output)
    raise TargetError(
        "Detection needs a detector's output: a list of per-image dicts with 'boxes' (x0, y0, x1, y1), "
        f"'scores' and 'labels' (torchvision's format); got {type(output).__name__}"
    )


def _check_labels(labels: Sequence[torch.Tensor], model: nn.Module | None) -> None:
    """Given box labels must be class ids of the model (when it says its classes: a zoo detector's
    card, a detector adapter's ``class_names``)."""
    card = getattr(model, "camlens", None)
    names = getattr(card, "class_names", None) or getattr(model, "class_names", None)
    if not names:
        return
    for lab in labels:
        bad = lab[(lab >= len(names)) | (lab < -1)]
        if len(bad):
            raise TargetError(
                f"box label {int(bad[0])} is not a class of this detector: it has {len(names)} classes "
                f"(ids 0..{len(names) - 1}, e.g. 0 = {names[0]!r}); pass labels= among them, or labels=None for any"
            )


class Detection(Target):
    r"""Explain detected boxes: one map per box, so ``K`` = number of boxes.

    For image :math:`n` and reference box :math:`b_k` with label :math:`c_k`, the score is the
    best match among the predicted boxes :math:`(P_j, \ell_j, s_j)` of the model's output:

    .. math:: y_k = \max_{j:\ \ell_j = c_k,\ \mathrm{IoU}(b_k, P_j) \ge \tau} \mathrm{IoU}(b_k, P_j)\, s_j

    (``0`` when no predicted box matches). ``labels=None`` with given boxes matches any label. When
    the output also holds class-probability vectors ``"probs"`` ``(D, C)`` (D-RISE's detection
    vector), the label test becomes the cosine :math:`\cos(e_{c_k}, p_j) = p_j[c_k]/\lVert p_j\rVert`
    and :math:`s_j` the ``"objectness"`` if given, else the score — then :math:`y_k` is D-RISE's
    similarity (Petsiuk et al., CVPR 2021) thresholded at :math:`\tau`. Gradients flow through the
    scores and, via the IoU, through the predicted box coordinates.

    Relation to pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``: that target returns *one* scalar
    :math:`\sum_k [\mathrm{IoU}_k > \tau][\ell = c_k](\mathrm{IoU}_k + s)` for the predicted box of
    highest IoU with each reference (one map for all boxes, the label checked after the match);
    this one keeps the boxes apart (one column each), matches among boxes of the right label, and
    multiplies IoU and score, so a poor overlap cannot be made up by a confident score.

    Args:
        boxes: reference boxes in original-image pixels ``(x0, y0, x1, y1)``: ``(K, 4)`` for every
            image or a list of ``(K_n, 4)`` per image; ``None``: the model's own detections with a
            score at least ``score_threshold`` (at most ``max_boxes`` per image, best first),
            chosen on the clean forward pass (:meth:`bind`).
        labels: class ids of the boxes (``(K,)`` or a list per image); ``None``: any label (given
            boxes) or the detections' own labels.
        iou: the IoU threshold :math:`\tau`.
        score_threshold, max_boxes: which own detections to explain when ``boxes=None``.

    Images with fewer boxes than the largest ``K`` of the batch get padding columns with label
    ``-1`` and score 0.
    """

    def __init__(
        self,
        boxes: Any = None,
        labels: Any = None,
        iou: float = 0.5,
        *,
        score_threshold: float = 0.5,
        max_boxes: int = 5,
    ) -> None:
        if not 0.0 <= float(iou) <= 1.0:
            raise TargetError(f"iou must be in [0, 1], not {iou}")
        if max_boxes < 1:
            raise TargetError("max_boxes must be >= 1")
        if boxes is not None:  # check early: a bad box is the caller's error, not the forward pass's
            per_image = isinstance(boxes, (list, tuple)) and len(boxes) and all(np.ndim(b) == 2 for b in boxes)
            for b in boxes if per_image else [boxes]:
                self._as_boxes(b)
        self.boxes = boxes
        self.label_spec = labels
        self.iou = float(iou)
        self.score_threshold = float(score_threshold)
        self.max_boxes = int(max_boxes)
        self._ref: list[torch.Tensor] | None = None  # per image (K, 4)
        self._lab: list[torch.Tensor] | None = None  # per image (K,), -1: any label
        self._best: list[float | None] = []  # own detections: each image's best score (None: none)
        self._k = 0
        self._hint = ""  # a detector adapter's own threshold, said when it detected nothing

    # -- references -------------------------------------------------------------------------
    @staticmethod
    def _as_boxes(b: Any) -> torch.Tensor:
        try:
            t = _plain(torch.as_tensor(np.asarray(b, dtype=np.float64) if not isinstance(b, torch.Tensor) else b))
        except (TypeError, ValueError):
            raise TargetError(f"boxes must be numbers (x0, y0, x1, y1), a (K, 4) array; got {b!r}") from None
        if t.numel() and (t.dim() not in (1, 2) or t.shape[-1] != 4):
            raise TargetError(
                f"a box is 4 numbers (x0, y0, x1, y1) and boxes a (K, 4) array; got shape {tuple(t.shape)}: "
                f"{t.tolist()}"
            )
        t = t.float().reshape(-1, 4) if t.numel() else t.float().reshape(0, 4)
        if t.numel() and not bool((t[:, 2:] > t[:, :2]).all()):
            raise TargetError(f"boxes must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0; got {t.tolist()}")
        return t

    def bind(self, output: Any, model: nn.Module | None = None) -> Detection:
        dets = _detections(output)
        n = len(dets)
        refs, labs = [], []
        best: list[float | None] = [None] * n  # own detections: each image's best score
        if self.boxes is None:
            for i, d in enumerate(dets):
                s = d["scores"].detach()
                best[i] = float(s.max()) if len(s) else None
                keep = (s >= self.score_threshold).nonzero().flatten()
                keep = keep[s[keep].argsort(descending=True)][: self.max_boxes]
                refs.append(d["boxes"].detach()[keep].float().cpu())
                labs.append(d["labels"].detach()[keep].long().cpu())
        else:
            per_image = isinstance(self.boxes, (list, tuple)) and (
                len(self.boxes) == n and all(np.ndim(b) == 2 for b in self.boxes)
            )
            bl = [self._as_boxes(b) for b in self.boxes] if per_image else [self._as_boxes(self.boxes)] * n
            if self.label_spec is None:
                ll = [torch.full((len(b),), -1, dtype=torch.long) for b in bl]
            else:
                per_lab = per_image and isinstance(self.label_spec, (list, tuple)) and len(self.label_spec) == n
                raw = self.label_spec if per_lab else [self.label_spec] * n
                ll = [torch.as_tensor(np.asarray(lb, dtype=np.int64)).reshape(-1) for lb in raw]
                for b, lb in zip(bl, ll):
                    if len(lb) != len(b):
                        raise TargetError(f"{len(lb)} labels for {len(b)} boxes")
            refs, labs = bl, ll
            _check_labels(ll, model)
        out = Detection(
            self.boxes, self.label_spec, self.iou, score_threshold=self.score_threshold, max_boxes=self.max_boxes
        )
        out._ref, out._lab = refs, labs
        out._k = max(1, max((len(r) for r in refs), default=0))
        out._best = best
        out._hint = str(getattr(model, "threshold_hint", "") or "")
        return out

    def empty_rows(self, image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[int, str]:
        """Images with no box to explain (no own detection above ``score_threshold``, an empty box
        list). A given box entirely outside its image is a :class:`TargetError` (wrong coordinates)."""
        self._check_bound()
        assert self._ref is not None
        if image_sizes is not None and self.boxes is not None:
            for i, (ref, (h, w)) in enumerate(zip(self._ref, image_sizes)):
                out = (ref[:, 2] <= 0) | (ref[:, 3] <= 0) | (ref[:, 0] >= w) | (ref[:, 1] >= h)
                if bool(out.any()):
                    box = [round(float(v), 2) for v in ref[int(out.nonzero()[0, 0])]]
                    raise TargetError(
                        f"box {box} of image {i} lies entirely outside the image ({w}x{h} px, width x height): "
                        "boxes are (x0, y0, x1, y1) in the original image's pixels; fix its coordinates (were "
                        "they (x, y, w, h), normalized to [0, 1], or for a resized image?)"
                    )
        reasons = {}
        for i, ref in enumerate(self._ref):
            if len(ref):
                continue
            if self.boxes is not None:
                reasons[i] = "no box given for it; pass at least one (x0, y0, x1, y1) box"
            else:
                b = self._best[i] if i < len(self._best) else None
                seen = "the model detected nothing" if b is None else f"its best detection scores {b:.3g}"
                reasons[i] = (
                    f"no detection scores >= score_threshold={self.score_threshold:g} ({seen}); lower "
                    "Detection(score_threshold=...) or pass boxes="
                ) + (f" ({self._hint})" if self._hint and b is None else "")
        return reasons

    def take(self, rows: Sequence[int]) -> Detection:
        self._check_bound()
        assert self._ref is not None and self._lab is not None
        out = Detection(
            self.boxes, self.label_spec, self.iou, score_threshold=self.score_threshold, max_boxes=self.max_boxes
        )
        out._ref = [self._ref[int(r)] for r in rows]
        out._lab = [self._lab[int(r)] for r in rows]
        out._best = [self._best[int(r)] for r in rows] if self._best else []
        out._k = self._k
        return out

    def with_iou(self, iou: float) -> Detection:
        """The same bound references with another IoU threshold (D-RISE uses ``0``)."""
        self._check_bound()
        out = self.take(range(len(self._ref or [])))
        out.iou = float(iou)
        return out

    def _check_bound(self) -> None:
        if self._ref is None:
            raise TargetError("this Detection target is not bound to a forward pass yet (call .bind(output))")

    @property
    def k(self) -> int:
        return self._k

    @property
    def labels(self) -> torch.Tensor:  # type: ignore[override]
        """``(N, K)`` labels of the reference boxes (``-1``: any label or padding)."""
        self._check_bound()
        assert self._lab is not None
        out = torch.full((len(self._lab), self._k), -1, dtype=torch.long)
        for i, lb in enumerate(self._lab):
            out[i, : len(lb)] = lb
        return out

    @property
    def reference_boxes(self) -> torch.Tensor:
        """``(N, K, 4)`` reference boxes in original-image pixels (NaN rows: padding)."""
        self._check_bound()
        assert self._ref is not None
        out = torch.full((len(self._ref), self._k, 4), float("nan"))
        for i, b in enumerate(self._ref):
            out[i, : len(b)] = b
        return out

    @property
    def extras(self) -> dict[str, Any]:
        return {"boxes": self.reference_boxes.numpy()}

    # -- scores -----------------------------------------------------------------------------
    def match(self, det: Mapping[str, torch.Tensor], ref: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """``(K,)`` scores of one image's detections ``det`` against references ``ref``/``lab``."""
        boxes = det["boxes"]
        if len(ref) == 0:
            return boxes.new_zeros(0)
        if len(boxes) == 0:
            return boxes.new_zeros(len(ref)) + 0.0 * boxes.sum()
        ref = ref.to(boxes.device, boxes.dtype)
        lab = lab.to(boxes.device)
        iou = box_iou(ref, boxes)  # (K, D)
        if "probs" in det:
            p = det["probs"]
            cls = p[:, lab.clamp_min(0)].T / p.norm(dim=1).clamp_min(1e-12)  # (K, D) cosine with one-hot
            cls = torch.where(lab[:, None] < 0, torch.ones_like(cls), cls)
            obj = det.get("objectness", det["scores"])
        else:
            cls = ((det["labels"][None, :] == lab[:, None]) | (lab[:, None] < 0)).to(boxes.dtype)
            obj = det["scores"]
        q = iou * cls * obj[None, :]
        q = torch.where(iou >= self.iou, q, torch.zeros_like(q)) if self.iou > 0 else q
        return q.max(dim=1).values

    def __call__(self, output: Any) -> torch.Tensor:
        self._check_bound()
        assert self._ref is not None and self._lab is not None
        dets = _detections(output)
        if len(dets) != len(self._ref):
            raise TargetError(f"the Detection target was bound to {len(self._ref)} images; the output has {len(dets)}")
        rows = []
        for det, ref, lab in zip(dets, self._ref, self._lab):
            s = self.match(det, ref, lab)
            if len(s) < self._k:
                s = torch.cat([s, s.new_zeros(self._k - len(s))])
            rows.append(s)
        return torch.stack(rows)

    def __repr__(self) -> str:
        return f"Detection(boxes={'own' if self.boxes is None else 'given'}, iou={self.iou}, k={self._k or '?'})"


def _segmentation_logits(output: Any) -> torch.Tensor:
    if isinstance(output, Mapping):
        if "out" not in output:
            raise TargetError(f"a segmentation output dict needs an 'out' entry; it has {list(output)}")
        output = output["out"]
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TargetError(f"Segmentation needs (N, num_classes, H, W) logits (or a dict with 'out'); got {shape}")
    return output


class Segmentation(Target):
    r"""Explain why a region is labelled ``category``: the class logits summed over a mask.

    With logits :math:`O` ``(N, C, H, W)`` (or ``output["out"]``, torchvision's segmenters) and mask
    :math:`M` ``(H, W)``:

    .. math:: y_c = \sum_{ij} M_{ij}\, O_{c,ij},\qquad M = [\arg\max_{c'} O_{c',ij} = c]\ \text{by default}

    (the predicted region of the class, fixed on the clean pass; the same score as pytorch-grad-cam's
    ``SemanticSegmentationTarget``). A given ``mask`` (``(H, W)`` or ``(N, H, W)``, bool or
    weights, in the model input's frame; resized nearest to the logits' size) replaces it.

    Args:
        category: class id (or a list of ids, ``K`` = their number); ``None``: each image's
            predicted class of largest area other than ``background`` (``K = 1``).
        mask: the region, or ``None`` for the predicted one.
        background: class id ignored by ``category=None``.
    """

    def __init__(self, category: int | Sequence[int] | None, mask: Any = None, *, background: int = 0) -> None:
        cats = None if category is None else [category] if isinstance(category, (int, np.integer)) else list(category)
        if cats is not None and (not cats or not all(isinstance(c, (int, np.integer)) for c in cats)):
            raise TargetError(f"category must be a class id or a list of ids, not {category!r}")
        self.category = cats
        self.mask = mask
        self.background = background
        self._cats: torch.Tensor | None = None  # (N, K)
        self._masks: torch.Tensor | None = None  # (N, K, H, W) float

    @property
    def k(self) -> int:
        return 1 if self.category is None else len(self.category)

    @property
    def labels(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._cats

    def bind(self, output: Any, model: nn.Module | None = None) -> Segmentation:
        logits = _segmentation_logits(output).detach()
        n, c, h, w = logits.shape
        pred = logits.argmax(dim=1)  # (N, H, W)
        if self.category is None:
            counts = torch.stack([(pred == i).flatten(1).sum(1) for i in range(c)], dim=1)  # (N, C)
            if 0 <= self.background < c:
                counts[:, self.background] = -1
            cats = counts.argmax(dim=1)[:, None]
        else:
            bad = [int(x) for x in self.category if not 0 <= int(x) < c]
            if bad:
                raise TargetError(f"category {bad[0]} is out of range: the segmenter has {c} classes (0..{c - 1})")
            cats = torch.tensor(self.category, dtype=torch.long)[None].expand(n, -1)
        cats = cats.to(logits.device)
        if self.mask is None:
            masks = (pred[:, None] == cats[:, :, None, None]).to(logits.dtype)
        else:
            m = _as_mask(self.mask).to(logits.device, logits.dtype)
            if m.dim() == 2:
                m = m[None].expand(n, -1, -1)
            if m.dim() != 3 or m.shape[0] != n:
                raise TargetError(f"mask must be (H, W) or (N, H, W) for {n} images; got {tuple(m.shape)}")
            if tuple(m.shape[-2:]) != (h, w):
                m = torch.nn.functional.interpolate(m[:, None], size=(h, w), mode="nearest")[:, 0]
            masks = m[:, None].expand(n, cats.shape[1], h, w)
        out = Segmentation(self.category, self.mask, background=self.background)
        out._cats, out._masks = cats.cpu(), masks
        return out

    def empty_rows(self, image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[int, str]:
        """Images whose every region is empty (an all-zero mask, a class predicted nowhere)."""
        if self._masks is None or self._cats is None:
            raise TargetError("this Segmentation target is not bound to a forward pass yet (call .bind(output))")
        area = (self._masks != 0).flatten(2).sum(-1).cpu()  # (N, K)
        reasons = {}
        for i in (area.sum(1) == 0).nonzero().flatten().tolist():
            if self.mask is not None:
                reasons[i] = (
                    "the given mask selects no pixel (all zero, or too small to survive the resize to the "
                    f"logits' {self._masks.shape[-2]}x{self._masks.shape[-1]} grid); pass a mask with non-zero pixels"
                )
            else:
                cats = self._cats[i].tolist()
                reasons[i] = (
                    f"no pixel is predicted as class {cats if len(cats) > 1 else cats[0]}; pass a mask= of the "
                    "region to explain or another category"
                )
        return reasons

    @property
    def extras(self) -> dict[str, Any]:
        """``"masks"``: the explained regions ``(N, K, H, W)`` (bool) in the logits' frame."""
        return {} if self._masks is None else {"masks": (self._masks > 0).cpu().numpy()}

    def take(self, rows: Sequence[int]) -> Segmentation:
        if self._masks is None or self._cats is None:
            raise TargetError("this Segmentation target is not bound to a forward pass yet (call .bind(output))")
        out = Segmentation(self.category, self.mask, background=self.background)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        out._cats, out._masks = self._cats[idx], self._masks[idx.to(self._masks.device)]
        return out

    def __call__(self, output: Any) -> torch.Tensor:
        if self._masks is None or self._cats is None:
            raise TargetError("this Segmentation target is not bound to a forward pass yet (call .bind(output))")
        logits = _segmentation_logits(output)
        sel = logits.gather(1, self._cats.to(logits.device)[:, :, None, None].expand(-1, -1, *logits.shape[-2:]))
        return (sel * self._masks.to(logits.dtype)).sum(dim=(2, 3))


def _as_mask(mask: Any) -> torch.Tensor:
    """A given segmentation mask as a finite float tensor (bool masks become 0/1)."""
    try:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    except (TypeError, ValueError):
        raise TargetError(
            f"mask must be an (H, W) or (N, H, W) array of 0/1 or weights; got {type(mask).__name__}"
        ) from None
    if m.is_complex():
        raise TargetError(f"mask must hold bools or real numbers; got {m.dtype}")
    m = _plain(m).float()
    if not bool(torch.isfinite(m).all()):
        raise NonFiniteError("the Segmentation mask holds NaN or Inf values; pass a mask of 0/1 or finite weights")
    return m


def _as_reference(reference: Any) -> torch.Tensor:
    """A Similarity reference as a finite float tensor; a zero embedding (cosine undefined) refused."""
    try:
        r = reference if isinstance(reference, torch.Tensor) else torch.as_tensor(np.asarray(reference))
    except (TypeError, ValueError, RuntimeError):
        r = None
    if r is None or r.dtype == torch.bool or r.is_complex():
        raise TargetError(
            f"reference must be a numeric embedding (D,)/(K, D) or preprocessed images (3,H,W)/(K,3,H,W); "
            f"got {type(reference).__name__}"
        )
    if not r.is_floating_point():
        r = r.float()
    if r.dim() not in (1, 2, 3, 4) or r.numel() == 0:
        raise TargetError(
            f"reference must be an embedding (D,)/(K, D) or images (3,H,W)/(K,3,H,W); got {tuple(r.shape)}"
        )
    if not bool(torch.isfinite(r).all()):
        raise NonFiniteError("the Similarity reference holds NaN or Inf values; pass a finite embedding or image")
    return _plain(r)


def _check_nonzero(ref: torch.Tensor, what: str) -> None:
    zero = (ref.flatten(1).norm(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        raise TargetError(
            f"{what} {zero[0]} is the zero vector: its cosine similarity is undefined (0/0), so its map would be "
            "zero; pass a non-zero reference embedding"
        )


def _embedding(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.dim() >= 2:
        return output.flatten(1)
    if isinstance(output, Mapping):
        for key in ("image_embeds", "embeddings", "pooler_output"):
            if key in output and isinstance(output[key], torch.Tensor):
                return output[key].flatten(1)
    raw = getattr(output, "image_embeds", None)
    if isinstance(raw, torch.Tensor):
        return raw.flatten(1)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise TargetError(f"Similarity needs an (N, D) embedding output; got {shape}")


class Similarity(Target):
    r"""Explain the similarity of an image's embedding to a reference (CLIP-style retrieval,
    re-identification, face verification).

    .. math:: y_k = \cos(e(x), r_k) = \frac{e(x)\cdot r_k}{\lVert e(x)\rVert\, \lVert r_k\rVert}

    with :math:`e(x)` the model's output ``(N, D)`` (flattened) and references :math:`r_k`: an
    embedding ``(D,)`` or ``(K, D)``, or images ``(3, H, W)`` / ``(K, 3, H, W)`` already
    preprocessed for the model, embedded once by the model when the target is bound (under
    ``inference_mode``, eval mode held). ``K`` = number of references; the same references for
    every image. A reference equal to the image's own embedding gives the maximum, 1.
    """

    def __init__(self, reference: Any) -> None:
        r = _as_reference(reference)
        self.reference = r
        # embeddings are used as given; images are embedded by bind()
        self._ref: torch.Tensor | None = {1: r[None], 2: r}.get(r.dim())
        if self._ref is not None:
            _check_nonzero(self._ref, "reference embedding")
        self._zero_rows: list[int] = []  # images whose own embedding is zero (set by bind)

    @property
    def k(self) -> int:
        return 1 if self.reference.dim() in (1, 3) else int(self.reference.shape[0])

    def bind(self, output: Any, model: nn.Module | None = None) -> Similarity:
        out = Similarity(self.reference)
        if self._ref is None:
            if model is None:
                raise TargetError("a Similarity reference image needs the model to embed it")
            imgs = self.reference if self.reference.dim() == 4 else self.reference[None]
            with eval_mode(model), torch.no_grad():
                emb = _embedding(model(imgs.to(model_device(model), model_dtype(model)))).detach()
            _check_nonzero(emb, "the model's embedding of reference image")
            out._ref = emb.float()
        out._zero_rows = (_embedding(output).detach().norm(dim=1) == 0).nonzero().flatten().tolist()
        return out

    def empty_rows(self, image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[int, str]:
        """Images whose own embedding is the zero vector (their cosine is undefined)."""
        return {i: "the model's embedding of this image is the zero vector (cosine undefined)" for i in self._zero_rows}

    def __call__(self, output: Any) -> torch.Tensor:
        assert self._ref is not None, "bind() the Similarity target first"
        e = _embedding(output)
        ref = self._ref.to(e.device, e.dtype)
        if ref.shape[1] != e.shape[1]:
            raise TargetError(f"reference embedding has {ref.shape[1]} dimensions; the model's has {e.shape[1]}")
        return (
            torch.nn.functional.normalize(e, dim=1, eps=1e-12) @ torch.nn.functional.normalize(ref, dim=1, eps=1e-12).T
        )


from camlens.targets.text import Text as Text  # noqa: E402  (image–text logits: camlens/targets/text.py)
