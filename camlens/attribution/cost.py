"""Estimates before slow methods and their progress, for the reporter of :mod:`camlens.base.progress`.

:func:`reported` wraps one method's run inside :func:`camlens.explain`: it asks the method's
``cost`` hook (:class:`~camlens.attribution.registry.Cost`) how many images it will forward, times one
inference forward of a small batch to turn that into seconds, tells the reporter the
:class:`~camlens.base.progress.Estimate`, and counts the images the model forwards while the method runs
(a forward pre-hook on the model that acts only for this thread, removed in ``finally``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from camlens.attribution.registry import Cost, MethodInfo
from camlens.base.progress import Estimate, Reporter, current_reporter
from camlens.core.engine import ForwardPass, forward
from camlens.core.extra import rows

#: backward passes to the input cost about two forwards (DESIGN's performance model)
BACKWARD_FACTOR = 2.0
#: images in the timed forward (the batch size of the masked forwards on a CPU)
TIMED_BATCH = 8


def batch_len(args: tuple) -> int:
    """Images in a model call's first argument (a batch tensor or a list of images)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 3 else 1
    if isinstance(x, (list, tuple)):
        return len(x)
    return 1


def seconds_per_image(ctx: ForwardPass, batch: int = TIMED_BATCH) -> float:
    """One timed inference forward of ``batch`` copies of the first image, per image (the methods
    forward batches: on a CPU a batch of one costs several times more per image)."""
    first = ctx.x[0]
    x: Any = [first] * batch if isinstance(ctx.x, list) else first.detach().expand(batch, *first.shape)
    with torch.inference_mode():
        t0 = time.perf_counter()
        with rows([0] * batch):  # copies of the first image (its extra inputs, if the model takes any)
            forward(ctx.model, x)  # a batch tensor, or a detector's list of images
        return (time.perf_counter() - t0) / batch


def estimate(
    info: MethodInfo, ctx: ForwardPass, options: dict[str, Any], per_image: float, cost: Cost | None = None
) -> Estimate | None:
    """The :class:`Estimate` of ``info`` with ``options`` on this pass (``None``: no declared cost);
    ``cost``: the method's cost with these options when already known."""
    cost = cost if cost is not None else info.estimate(ctx, options)
    if cost is None:
        return None

    def secs(c: Cost) -> float:
        return per_image * (c.forwards + BACKWARD_FACTOR * c.backwards)

    cheaper, cheaper_s = None, None
    if cost.cheaper:
        alt = info.estimate(ctx, options | cost.cheaper)
        if alt is not None and alt.forwards < cost.forwards:
            cheaper, cheaper_s = dict(cost.cheaper), secs(alt)
    return Estimate(info.name, cost.forwards, cost.unit, secs(cost), cost.backwards, cheaper, cheaper_s)


@contextlib.contextmanager
def reported(info: MethodInfo, ctx: ForwardPass, options: dict[str, Any], timing: dict[str, float]) -> Iterator[None]:
    """Report the estimate of ``info`` and its progress to the active reporter while the body runs
    (nothing at all when no reporter listens or the method declares no cost). ``timing`` caches the
    seconds per image across the methods of one call."""
    reporter: Reporter | None = current_reporter()
    if reporter is None or info.cost is None or not reporter.wants(info.name):
        yield
        return
    cost = info.estimate(ctx, options)
    if cost is None:
        yield
        return
    if "per_image" not in timing:
        timing["per_image"] = seconds_per_image(ctx, max(1, min(TIMED_BATCH, cost.forwards)))
    est = estimate(info, ctx, options, timing["per_image"], cost)
    assert est is not None
    reporter.estimate(est)
    total = max(est.forwards, 1)
    done = 0
    owner = threading.get_ident()

    def count(module, args):
        nonlocal done
        if threading.get_ident() == owner:
            done += batch_len(args)
            reporter.advance(info.name, done, total)

    handle = ctx.model.register_forward_pre_hook(count)
    try:
        yield
    finally:
        handle.remove()
    reporter.advance(info.name, max(done, total), max(done, total))


__all__ = ["batch_len", "estimate", "reported", "seconds_per_image"]
