"""Models a user can only run: a scoring function (a NumPy model, a scikit-learn pipeline, a remote
service) and TorchScript archives.

* :class:`ScoringFunction` turns a callable ``fn(batch) -> (N, K) scores`` into an ``nn.Module``
  without parameters, so that the black-box methods (``rise``, ``occlusion``, ``lime``,
  ``kernelshap``; they only call the model on perturbed copies of the input) run on it unchanged.
  ``fn`` receives a float32 ``(B, C, H, W)`` NumPy array (``input="torch"``: a CPU/GPU tensor) with
  ``B <= max_batch``, and returns anything :func:`numpy.asarray` takes (or a tensor) of shape
  ``(B, K)`` or ``(B,)``. Its outputs are treated as logits: ``weighting="prob"`` (RISE's default)
  applies a softmax; pass ``weighting="logit"`` to use the scores as they are.
* A TorchScript module (``torch.jit.load`` / ``torch.jit.script`` / ``torch.jit.trace``) runs its
  own graph: autograd works through it, but module hooks and the ReLU-rule overrides do not, so
  the methods that capture a layer (the CAM family, Score-CAM, attention) or switch ReLU backward
  rules (Deconvnet, Guided Backprop) are refused with an error naming those that work.

:func:`unsupported` says which methods a model kind refuses, and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.base.errors import InputError, MethodError

INPUT_KINDS = ("numpy", "torch")


class ScoringFunction(nn.Module):
    """``fn`` as a model: ``forward(x)`` calls ``fn`` on chunks of at most ``max_batch`` images and
    stacks the ``(B, K)`` scores as a float32 tensor on ``x``'s device. No gradient flows through it."""

    def __init__(self, fn: Callable[[Any], Any], *, max_batch: int | None = None, input: str = "numpy") -> None:
        super().__init__()
        if not callable(fn):
            raise InputError(f"a scoring function must be callable, not {type(fn).__name__}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise InputError(f"max_batch must be a positive integer or None, not {max_batch!r}")
        if input not in INPUT_KINDS:
            raise InputError(f"input must be one of {', '.join(INPUT_KINDS)}, not {input!r}")
        self.fn = fn
        self.max_batch = max_batch
        self.input = input
        self.calls = 0  # how many times fn was called (one per chunk)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        arg = x.detach() if self.input == "torch" else x.detach().float().cpu().numpy()
        out = self.fn(arg)
        self.calls += 1
        try:
            t = out.detach() if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"the scoring function returned {type(out).__name__}, not (N, K) numbers: return a NumPy array, "
                "a list of lists or a tensor of scores, one row per image"
            ) from exc
        t = t.to(device=x.device, dtype=torch.float32)
        if t.dim() == 1:
            t = t[:, None]
        if t.dim() != 2 or t.shape[0] != x.shape[0]:
            raise InputError(
                f"the scoring function returned shape {tuple(t.shape)} for a batch of {x.shape[0]} image(s); "
                f"it must return ({x.shape[0]}, K) scores, one row per image"
            )
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.max_batch or x.shape[0]
        return torch.cat([self._call(c) for c in x.split(step)])

    @property
    def gradients_missing(self) -> str:
        """Why the gradient and layer methods cannot run, in the words of a refusal."""
        return "a scoring function does not have"

    def extra_repr(self) -> str:
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"fn={name}, max_batch={self.max_batch}, input={self.input!r}"


def is_scripted(model: Any) -> bool:
    """Whether ``model`` is a TorchScript module (scripted, traced or loaded with ``torch.jit.load``)."""
    return isinstance(model, torch.jit.ScriptModule)


def model_kind(model: Any) -> str:
    """``"function"``, ``"torchscript"`` or ``"module"``."""
    if isinstance(model, ScoringFunction):
        return "function"
    return "torchscript" if is_scripted(model) else "module"


#: the methods SmoothGrad may wrap on a TorchScript module (plain gradients: no ReLU rule)
PLAIN_GRADIENT_BASES = ("saliency", "input_x_gradient", "integrated_gradients")


def _runs_on_script(info: Any, options: dict[str, Any], resolve: Callable[[str], str]) -> bool:
    """Black-box, or plain input gradients (no layer capture, no ReLU rules, no attention)."""
    if info.blackbox:
        return True
    if not set(info.needs) <= {"input_grads"} or info.kind != "pixel":
        return False
    base = options.get("base")  # smoothgrad wraps another method: a guided base needs the ReLU rules
    return base is None or resolve(str(base)) in PLAIN_GRADIENT_BASES


def unsupported(
    model: Any,
    infos: Iterable[Any],
    options: dict[str, dict[str, Any]],
    all_infos: Iterable[Any],
    resolve: Callable[[str], str] = str,
) -> MethodError | None:
    """A :class:`MethodError` naming the methods this kind of model cannot run and those it can
    (``infos``/``all_infos``: registry entries; ``options``: each method's options; ``resolve``:
    a method name or alias -> its registered name), or ``None``."""
    kind = model_kind(model)
    if kind == "module":
        return None
    infos, all_infos = list(infos), list(all_infos)
    if isinstance(model, ScoringFunction):
        bad = [i.name for i in infos if not i.blackbox]
        ok = [i.name for i in all_infos if i.blackbox]
        if bad:
            return MethodError(
                f"{', '.join(bad)} need(s) the model's gradients or layers, which {model.gradients_missing}; "
                f"use a black-box method: {', '.join(ok)} (or pass the nn.Module itself)"
            )
        return None
    bad = [i.name for i in infos if not _runs_on_script(i, options.get(i.name, {}), resolve)]
    ok = [i.name for i in all_infos if _runs_on_script(i, {}, resolve)]
    if bad:
        return MethodError(
            f"{', '.join(bad)} need(s) hooks on the model's layers or ReLUs, which a TorchScript module does not "
            f"support; use {', '.join(ok)}, or explain the eager nn.Module (the Python model before "
            "torch.jit.script/trace)"
        )
    return None


__all__ = ["ScoringFunction", "is_scripted", "model_kind", "unsupported"]
