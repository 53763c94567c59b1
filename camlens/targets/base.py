"""The target protocol: a target object scores a model's raw output as ``(N, K)``; shared checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from camlens.base.errors import TargetError


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
