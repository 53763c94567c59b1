"""Classifier targets: ``targets=`` of a classifier resolved to an ``(N, K)`` table of class ids
(:class:`Classes`, top-K, names, flat lists = one target per image, callables)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.base.classnames import class_id
from camlens.base.errors import TargetError
from camlens.targets.base import check_scores, output_batch_size, take_rows


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
            err = TargetError(f"the target selects nothing to explain ({listed})")
            err.skipped = skipped  # type: ignore[attr-defined]  # per image, for a dataset run's table
            raise err
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
