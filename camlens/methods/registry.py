"""The method registry. Adding a method is adding one decorated function in one file.

A method is ``fn(ctx: ForwardPass, **options) -> MethodOutput``. It declares what it needs from
the shared forward pass, so that a list of methods costs one forward and only the backward
passes they need:

* ``"features"``: the captured layer features ``ctx.features`` ``(N, C, h, w)``;
* ``"layer_grads"``: ``ctx.layer_grads()``, d score / d features, ``(N, K, C, h, w)``;
* ``"layer_grads:NAME"``: only a reduction of them, ``ctx.layer_grad_sums(NAME)`` (``"mean"``
  ``(N, K, C)``, ``"sqmean"`` ``(N, K)``, or one registered with
  :func:`camlens.engine.layer_grad_reduction`): all declared reductions are computed in one
  chunked sweep and the full tensor is never built (see :mod:`camlens.engine`);
* ``"input_grads"``: ``ctx.input_grads(rule)``, d score / d input, ``(N, K, C, H, W)``;
* ``"rules"``: the forward runs under :func:`camlens.rules.relu_rules` so that the ReLU
  backward rule can be switched per backward pass (Deconvnet, Guided Backprop).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MethodError

NEEDS = frozenset({"features", "layer_grads", "input_grads", "rules"})


@dataclass
class MethodOutput:
    """``raw``: ``(N, K, h, w)`` for layer methods or ``(N, K, C, H, W)`` for pixel methods;
    ``maps``: ``(N, K, H, W)`` at input resolution (``None``: upsample ``raw`` bilinearly)."""

    raw: torch.Tensor
    maps: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    paper: str
    summary: str
    kind: str
    needs: frozenset
    fn: Callable[..., MethodOutput] = field(repr=False)

    def options(self) -> dict[str, Any]:
        """Keyword options and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY or p.default is not p.empty}

    def __str__(self) -> str:
        return f"{self.name:<18} {self.kind:<6} {self.paper}"


_REGISTRY: dict[str, MethodInfo] = {}
_ALIASES = {
    "grad-cam": "gradcam",
    "gradcampp": "gradcam++",
    "gradcam_pp": "gradcam++",
    "grad-cam++": "gradcam++",
    "score-cam": "scorecam",
    "eigen-cam": "eigencam",
    "layer-cam": "layercam",
    "xgrad-cam": "xgradcam",
    "hires-cam": "hirescam",
    "hirescam++": "hirescam",
    "guided": "guided_backprop",
    "guided-backprop": "guided_backprop",
    "guided-gradcam": "guided_gradcam",
    "ig": "integrated_gradients",
    "vanilla": "saliency",
    "gradient": "saliency",
}


def register(
    name: str, *, paper: str, summary: str, kind: str = "layer", needs: tuple[str, ...] = ("features", "layer_grads")
):
    """Decorator registering a method under ``name``."""
    bad = {n for n in needs if n not in NEEDS and not (n.startswith("layer_grads:") and len(n) > 12)}
    if bad:
        raise ValueError(f"unknown needs {bad}")
    if kind not in ("layer", "pixel"):
        raise ValueError("kind must be 'layer' or 'pixel'")

    def deco(fn):
        _REGISTRY[name] = MethodInfo(name, paper, summary, kind, frozenset(needs), fn)
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    _load_builtin()
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise MethodError(f"unknown method {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}.")


def methods() -> dict[str, MethodInfo]:
    """All registered methods by name, with their paper and summary."""
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def _load_builtin() -> None:
    import importlib

    for mod in ("cam", "gradcam", "scorecam", "eigencam", "gradients", "guided"):
        try:
            importlib.import_module(f"camlens.methods.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"camlens.methods.{mod}":
                raise
