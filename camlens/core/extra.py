"""Models with several inputs: the extra inputs that travel with the explained images.

``explain(model, images, forward_args=(meta,), forward_kwargs={"mask": m})`` explains
``model(images, meta, mask=m)``: the maps are of the image input, and every forward a method runs
— the shared pass, Score-CAM's and RISE's masked batches, SmoothGrad's noisy copies, Integrated
Gradients' path points, the head replays of Ablation-CAM… — gets the extra inputs *of the images it
forwards*. An extra input is

* a tensor (or NumPy array) **batched along dim 0**: it must have one row per image, and a forward
  of a batch built from images ``rows`` (copies, masked or noisy versions of them) gets
  ``extra[rows]``. Never interpolated, never noised: Integrated Gradients' path runs from the
  baseline *image* to the image with the extra inputs held fixed;
* anything else (an int, a string, ``None``), or a value wrapped in :class:`Constant` (a tensor that
  is the same for every image, e.g. a lookup table): passed unchanged to every forward;
* a list, tuple or dict of those: each member follows the same rules.

How it works: while :func:`camlens.explain` runs, a forward pre-hook on the model (removed on exit,
also on error) adds the extra inputs to each top-level call ``model(x)`` — so the methods keep
calling ``ctx.model(batch)``. A method that forwards a batch made from some of the images says
which ones with :func:`rows` (``with rows([0, 0, 1, 1]): model(copies)``); a batch of ``N``
images whose rows were not declared is the explained batch itself, and any other undeclared batch
size raises (never the wrong image's extra input). The hook only acts inside the call that
attached it (a context variable): another thread's call of the same model is untouched.

``input_index`` / ``input_key`` say where the image goes when it is not the model's first
positional argument (``model(meta, image)``: ``input_index=1``; ``model(pixel_values=…)``:
``input_key="pixel_values"``); the ``forward_args`` fill the other positions in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.base.errors import InputError, MethodError


@dataclass(frozen=True)
class Constant:
    """An extra input that is the same for every image (passed unchanged, never sliced by rows)."""

    value: Any


@dataclass(frozen=True)
class _Active:
    inputs: ExtraInputs
    rows: tuple[int, ...] | None = None


_ACTIVE: ContextVar[_Active | None] = ContextVar("camlens_extra_inputs", default=None)


def _prepare(value: Any, n: int, where: str, device: torch.device | None) -> Any:
    """Check an extra input against the batch size ``n``; tensors moved to the model's device."""
    if isinstance(value, Constant):
        return value
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return Constant(value)
        if value.shape[0] != n:
            raise InputError(
                f"the extra input {where} has {value.shape[0]} row(s) (shape {tuple(value.shape)}) but there are {n} "
                f"image(s): a tensor extra input is batched along dim 0, one row per image. Pass one row per image, "
                f"or wrap a value that is the same for every image in camlens.Constant(...)"
            )
        value = value.detach()
        return value.to(device) if device is not None and value.device != device else value
    if isinstance(value, Mapping):
        return {k: _prepare(v, n, f"{where}[{k!r}]", device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return type(value)(_prepare(v, n, f"{where}[{i}]", device) for i, v in enumerate(value))
    return value


def _take(value: Any, idx: torch.Tensor | None) -> Any:
    """``value`` for the images ``idx`` (a copy of each tensor: the model may write into it)."""
    if isinstance(value, Constant):
        return value.value
    if isinstance(value, torch.Tensor):
        return value.clone() if idx is None else value[idx.to(value.device)]
    if isinstance(value, dict):
        return {k: _take(v, idx) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, idx) for v in value)
    return value


class ExtraInputs:
    """The extra inputs of one :func:`camlens.explain` call (see the module docstring).

    Args:
        args, kwargs: the other positional and keyword arguments of the model.
        n: the number of explained images (the batch size every batched extra input must have).
        input_index: the position of the image among the positional arguments.
        input_key: the keyword of the image (then ``input_index`` is not used).
        device: where batched tensors are moved (the model's device).
    """

    def __init__(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        n: int,
        input_index: int = 0,
        input_key: str | None = None,
        device: torch.device | None = None,
    ) -> None:
        if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
            raise InputError(
                f"forward_args must be a tuple or list of the model's other inputs, not {type(args).__name__}"
            )
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise InputError(f"forward_kwargs must be a dict of keyword arguments, not {type(kwargs).__name__}")
        if isinstance(input_index, bool) or not isinstance(input_index, int) or not 0 <= input_index <= len(args):
            raise InputError(
                f"input_index={input_index!r}: the image can be positional argument 0..{len(args)} of the model "
                f"({len(args)} forward_args given)"
            )
        if input_key is not None and (not isinstance(input_key, str) or input_key in (kwargs or {})):
            raise InputError(f"input_key={input_key!r} must be a keyword name not also given in forward_kwargs")
        self.n = n
        self.args = tuple(_prepare(a, n, f"forward_args[{i}]", device) for i, a in enumerate(args))
        self.kwargs = {k: _prepare(v, n, f"forward_kwargs[{k!r}]", device) for k, v in (kwargs or {}).items()}
        self.input_index = input_index
        self.input_key = input_key

    @property
    def empty(self) -> bool:
        """No extra input and the image is the first positional argument: nothing to do."""
        return not self.args and not self.kwargs and self.input_key is None and self.input_index == 0

    def call_args(self, x: Any, rows: Sequence[int] | None) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of the model's call on the image batch ``x`` made from images ``rows``
        (``None``: the explained batch itself)."""
        idx = None if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        args = [_take(a, idx) for a in self.args]
        kwargs = {k: _take(v, idx) for k, v in self.kwargs.items()}
        if self.input_key is not None:
            kwargs[self.input_key] = x
        else:
            args.insert(self.input_index, x)
        return tuple(args), kwargs

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        active = _ACTIVE.get()
        if active is None or active.inputs is not self:
            return None  # another call's forward (another thread), or outside explain: untouched
        if len(args) != 1:
            raise InputError(
                f"the model was called with {len(args)} positional argument(s) while forward_args/forward_kwargs "
                "are given: pass every input but the image through them"
            )
        x = args[0]
        b = len(x) if isinstance(x, (list, tuple)) else int(x.shape[0])
        rows = active.rows
        if rows is None and b != self.n:
            raise MethodError(
                f"a forward of {b} image(s) ran without saying which of the {self.n} explained images they come "
                "from, so the extra inputs (forward_args/forward_kwargs) cannot follow them; this method does not "
                "support models with several inputs yet: use another method, or explain one image per call"
            )
        if rows is not None and len(rows) != b:
            raise MethodError(f"internal: rows for {len(rows)} images declared for a forward of {b}")
        a, kw = self.call_args(x, rows)
        return a, {**kwargs, **kw}

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``model(x)`` runs as ``model(x, *args, **kwargs)`` (this call only)."""
        if self.empty:
            yield
            return
        handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
        token = _ACTIVE.set(_Active(self))
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            handle.remove()


@contextlib.contextmanager
def rows(images: Sequence[int] | torch.Tensor) -> Iterator[None]:
    """Within the block, a model forward is of a batch made from the explained images ``images``
    (one index per row of the batch, repeats allowed): the extra inputs are taken for those rows.
    A no-op when the call has no extra inputs."""
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    idx = images.tolist() if isinstance(images, torch.Tensor) else [int(i) for i in images]
    token = _ACTIVE.set(_Active(active.inputs, tuple(idx)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> ExtraInputs | None:
    """The extra inputs of the running call, if any."""
    a = _ACTIVE.get()
    return None if a is None else a.inputs


__all__ = ["Constant", "ExtraInputs", "active", "rows"]
