r"""Scoring modified features at the captured layer by running only the layers above it.

Ablation-CAM and Recipro-CAM score many modified copies of the captured features
:math:`A` ``(C, h, w)`` of one image: :math:`f_{\uparrow}(A')`, the network from the captured layer
on. :class:`HeadRunner` does this for a batch of ``(image, A')`` pairs with an ordinary forward of
the model in which

* the captured call hands the layers above the replacement :math:`A'` instead of :math:`A`
  (:func:`camlens.core.capture.capture` with ``replace=``), and
* **the layers below are skipped**: a probe forward (one forward of the explained batch, inference
  mode) records, for every submodule, whether it ran exactly once and finished before the
  captured call; the outermost such modules then return their recorded output for the rows'
  images (their ``forward`` is swapped for a lookup during the batched forwards and restored in a
  ``finally`` block; the model lock of :mod:`camlens.base.concurrency` is held by :func:`camlens.explain`).
  On ResNet-50 at ``layer4`` this leaves the global pooling and the linear layer: the batched
  forwards cost a small fraction of full ones.

The shortcut is checked before use: the unmodified features of every image, scored through it,
must reproduce the pass's own scores (to float rounding); otherwise — a model whose submodules
are not called as modules, one whose output depends on the other rows of the batch — every
batched forward runs the whole network (the replacement still happens at the captured call), and
``mode`` says why. Both give the same numbers for a model that passes the check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from camlens.base.errors import MethodError
from camlens.core.capture import CaptureSpec, capture
from camlens.core.engine import ForwardPass, model_input
from camlens.core.extra import rows as image_rows
from camlens.targets import take_rows

CPU_BATCH = 32  # modified feature maps per forward on CPU
ACCEL_BATCH = 256  # ... on accelerators


@dataclass
class _Probe:
    """What the probe forward saw per module: ``start``/``end`` event numbers, calls, the captured
    calls counted by the capture at its start and end, and its output."""

    calls: dict[nn.Module, int] = field(default_factory=dict)
    start: dict[nn.Module, tuple[int, int]] = field(default_factory=dict)
    end: dict[nn.Module, tuple[int, int]] = field(default_factory=dict)
    output: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    event: list[int] = field(default_factory=lambda: [0])
    captured_at: int | None = None


def default_batch(device: torch.device) -> int:
    return CPU_BATCH if device.type == "cpu" else ACCEL_BATCH


class HeadRunner:
    """``scores(feats, images)``: the ``(B, K)`` target scores of replacement features ``feats``
    ``(B, C, h, w)`` for the images ``images`` (``B`` indices into the pass's batch)."""

    def __init__(self, ctx: ForwardPass, *, skip: bool = True) -> None:
        if isinstance(ctx.x, list):
            raise MethodError(
                "this method re-runs the layers above the target on one batch of same-size images; these differ "
                "in size: explain them one at a time"
            )
        spec = ctx.layer_spec
        if ctx.calls < 1:
            raise MethodError(f"the {spec.describe()} did not run in the forward pass; choose another layer")
        self.ctx = ctx
        self.call = ctx.calls - 1 if spec.call < 0 else spec.call
        self.spec = CaptureSpec(spec.module, spec.name, spec.capture, self.call)
        self._skip: dict[nn.Module, torch.Tensor] = {}
        self._head_call = self.call
        self._base: torch.Tensor | None = None
        self._views = True
        self.mode = "whole network (skip=False)"
        if skip:
            self.mode = self._prepare_skip()

    # ------------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, replace, call: int, rows: torch.Tensor | int | None) -> torch.Tensor:
        """The selected output of ``model(x)`` with the captured call ``call`` replaced, the modules
        below replaying ``rows`` of their recorded outputs (an ``int``: that row as a view)."""
        ctx = self.ctx
        spec = CaptureSpec(self.spec.module, self.spec.name, self.spec.capture, call)
        with contextlib.ExitStack() as stack:
            if rows is not None:
                stack.enter_context(_swapped(self._skip, rows, len(x)))
            stack.enter_context(capture(ctx.model, spec, need_grad=False, layout=ctx.layout_request, replace=replace))
            return ctx.select(ctx.model(x))

    def target_scores(self, out, images: list[int]) -> torch.Tensor:
        """The ``(B, K)`` target scores of a selected output ``out`` of the rows ``images``."""
        t = self.ctx.targets
        if t.obj is not None:  # a target object scores the raw output of its own images
            return take_rows(t.obj, images)(out)
        if t.fn is not None:
            return t.fn(out)[:, None]
        return out.gather(1, t.classes.to(out.device)[images])

    def logits(self, feats: torch.Tensor, images: list[int]) -> torch.Tensor:
        """The selected model output for replacement features ``feats`` of ``images``."""
        given = feats

        def replace(t: torch.Tensor) -> torch.Tensor:
            if t.shape[1:] != given.shape[1:]:
                raise MethodError(f"the captured features have shape {tuple(t.shape)}, not {tuple(given.shape)}")
            return given.to(t.dtype, copy=True)  # the layers above may write in place (ReLU(inplace=True))

        x = self.ctx.x.detach()
        with torch.inference_mode(), image_rows(images):  # the extra inputs of these images, if any
            if not self._skip:
                return self._forward(x[images], replace, self.call, None)
            if self._views and len(images) > 1 and len(set(images)) == 1:
                # one image: the input and the replayed outputs as stride-0 views, no copies; an
                # in-place operation on them raises (overlapping memory) and the copies are used
                n = images[0]
                try:
                    return self._forward(x[n : n + 1].expand(len(images), *x.shape[1:]), replace, self._head_call, n)
                except RuntimeError:
                    self._views = False
            rows = torch.tensor(images, device=x.device)
            return self._forward(x[images], replace, self._head_call, rows)

    def scores(self, feats: torch.Tensor, images: list[int]) -> torch.Tensor:
        """``(B, K)`` target scores of ``feats`` (see the class docstring)."""
        return self.target_scores(self.logits(feats, images), images).to(feats.dtype)

    def base_scores(self) -> torch.Tensor:
        """``(N, K)`` scores of the unmodified features through the same path as :meth:`scores`
        (so that a modification that changes nothing changes the score by exactly 0)."""
        if self._base is None:
            self._base = self.scores(self.ctx.layer_features.detach(), list(range(len(self.ctx.x))))
        return self._base

    # ------------------------------------------------------------------------------------------
    def _prepare_skip(self) -> str:
        ctx = self.ctx
        try:
            probe = self._probe()
            skip, skipped_calls = _outermost_done(ctx.model, probe, len(ctx.x))
        except (RuntimeError, TypeError, ValueError) as exc:  # a model the probe cannot follow
            return f"whole network (the probe forward failed: {type(exc).__name__})"
        if not skip:
            return "whole network (no submodule finished before the target layer)"
        self._skip, self._head_call = skip, self.call - skipped_calls
        n = len(ctx.x)
        # every image, then the first again: a batch of several rows, as the method's own, so that a
        # replayed output whose first axis is not the batch (an ONNX graph's shape constant) is caught
        rows = [*range(n), 0]
        feats = ctx.layer_features.detach()[rows]
        ref = ctx.scores.detach()[rows]
        try:
            got = self.scores(feats, rows)
        except (RuntimeError, TypeError, ValueError, IndexError, MethodError) as exc:
            self._skip = {}
            return f"whole network (the layers above alone failed: {type(exc).__name__})"
        tol = 1e-4 * (1 + float(ref.abs().max())) if ref.numel() else 0.0
        if got.shape != ref.shape or not bool(torch.allclose(got, ref.to(got), rtol=1e-4, atol=tol)):
            self._skip = {}
            return "whole network (the layers above alone did not reproduce the scores)"
        self._base = got[:n]
        return f"layers above the target only ({len(skip)} module(s) below it replayed)"

    def _probe(self) -> _Probe:
        ctx, p = self.ctx, _Probe()
        handles = []
        cap_box: list = []

        def calls_now() -> int:
            return cap_box[0].calls if cap_box else 0

        def pre(m, args) -> None:
            p.event[0] += 1
            p.calls[m] = p.calls.get(m, 0) + 1
            p.start[m] = (p.event[0], calls_now())

        def post(m, args, output) -> None:
            p.event[0] += 1
            p.end[m] = (p.event[0], calls_now())
            if isinstance(output, torch.Tensor):
                p.output[m] = output
                if p.captured_at is None:  # m may be replayed whole: its submodules' outputs are not needed
                    for d in inner[m]:
                        p.output.pop(d, None)
            else:
                p.output.pop(m, None)

        def mark(t: torch.Tensor) -> torch.Tensor:
            p.event[0] += 1
            p.captured_at = p.event[0]
            return t

        inner = {m: [d for d in m.modules() if d is not m] for m in ctx.model.modules()}
        try:
            for name, m in ctx.model.named_modules():
                if name:
                    handles.append(m.register_forward_pre_hook(pre))
                    handles.append(m.register_forward_hook(post))
            with (
                torch.inference_mode(),
                capture(ctx.model, self.spec, need_grad=False, layout=ctx.layout_request, replace=mark) as cap,
            ):
                cap_box.append(cap)
                ctx.model(model_input(ctx.x.detach()))
        finally:
            for h in handles:
                h.remove()
        if p.captured_at is None:
            raise RuntimeError("the captured call did not run in the probe")
        return p


def _outermost_done(model: nn.Module, p: _Probe, n: int) -> tuple[dict[nn.Module, torch.Tensor], int]:
    """The outermost modules that ran once and finished before the captured call, with their
    outputs, and how many captured-layer calls happened inside them."""
    assert p.captured_at is not None
    chosen: dict[nn.Module, torch.Tensor] = {}
    names: list[str] = []
    skipped = 0
    for name, m in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in names):
            continue
        out = p.output.get(m)
        # features are floating point: an integer output is a shape computation (ONNX graphs), rerun as it is
        if p.calls.get(m) != 1 or out is None or out.dim() == 0 or out.shape[0] != n or not out.is_floating_point():
            continue
        if p.end[m][0] < p.captured_at:
            chosen[m] = out
            names.append(name)
            skipped += p.end[m][1] - p.start[m][1]
    return chosen, skipped


@contextlib.contextmanager
def _swapped(skip: dict[nn.Module, torch.Tensor], rows: torch.Tensor | int, b: int) -> Iterator[None]:
    """Within the block, each module of ``skip`` returns its recorded output's ``rows`` (an ``int``:
    that row ``b`` times, as a view)."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for m, out in skip.items():
            saved.append((m, m.__dict__.get("forward", _ABSENT)))
            m.forward = _Replay(out, rows, b)
        yield
    finally:
        for m, old in reversed(saved):
            if old is _ABSENT:
                del m.forward
            else:
                m.forward = old


_ABSENT = object()


class _Replay:
    """A module ``forward`` that ignores its input and returns recorded rows: a copy for a tensor
    of row indices, a stride-0 view of one row repeated ``b`` times for an ``int``."""

    def __init__(self, out: torch.Tensor, rows: torch.Tensor | int, b: int) -> None:
        self.out, self.rows, self.b = out, rows, b

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if isinstance(self.rows, int):
            return self.out[self.rows : self.rows + 1].expand(self.b, *self.out.shape[1:])
        return self.out[self.rows.to(self.out.device)]
