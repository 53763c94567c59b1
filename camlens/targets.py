"""Resolve ``targets=``: which class scores to explain, as an ``(N, K)`` table of class ids.

Accepted forms (``N`` images, ``num_classes`` logits):

* ``None`` -> the top-1 class of each image (``K = 1``);
* ``int`` -> that class for every image;
* ``"topK"`` (``"top1"``, ``"top5"``…) -> the K highest logits of each image, best first;
* a class name or a list of names (needs the model's class names);
* ``N`` ints -> one class per image; with ``N == 1`` a list of K ints -> K classes;
* an ``(N, K)`` array / tensor / nested list of ints;
* a callable ``logits -> (N,)`` scores (multi-label sums, margins, regression…) -> ``K = 1``,
  with class id ``-1`` in :attr:`Explanation.classes`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .classnames import class_id
from .errors import TargetError

TargetSpec = None | int | str | Sequence | np.ndarray | torch.Tensor | Callable


@dataclass
class Targets:
    """Resolved targets: ``classes`` ``(N, K)`` long tensor (``-1`` for callables) and ``fn``."""

    classes: torch.Tensor
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def k(self) -> int:
        return int(self.classes.shape[1])

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The ``(N, K)`` target scores of a batch of logits (keeps the autograd graph)."""
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
            if arr.shape[0] == n:
                arr = arr[:, None]
            elif n == 1:
                arr = arr[None, :]
            else:
                raise TargetError(
                    f"{arr.shape[0]} targets for {n} images: give one class per image, an (N, K) table, "
                    "'topK', or one int for all"
                )
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
