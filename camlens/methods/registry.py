"""The method registry: adding a method is adding one decorated function in one file.

A method is a :class:`MethodFn`, ``fn(ctx: ForwardPass, **options) -> MethodOutput``. It declares
what it needs from the shared forward pass (:data:`Need`), so that a list of methods costs one
forward and only the backward passes they need:

* ``"features"``: the captured layer features ``ctx.features`` ``(N, C, h, w)``;
* ``"layer_grads"``: ``ctx.layer_grads()``, d score / d features, ``(N, K, C, h, w)``;
* ``"layer_grads:NAME"``: only a reduction of them, ``ctx.layer_grad_sums(NAME)`` (``"mean"``
  ``(N, K, C)``, ``"sqmean"`` ``(N, K)``, or one registered with
  :func:`camlens.engine.layer_grad_reduction`): all declared reductions are computed in one
  chunked sweep and the full tensor is never built (see :mod:`camlens.engine`);
* ``"input_grads"``: ``ctx.input_grads(rule)``, d score / d input, ``(N, K, C, H, W)``;
* ``"rules"``: the forward runs under :func:`camlens.rules.relu_rules` so that the ReLU
  backward rule can be switched per backward pass (Deconvnet, Guided Backprop);
* ``"attention"``: ``ctx.attention()``, every self-attention matrix ``(N, heads, T, T)``;
* ``"attention_grads"``: ``ctx.attention_grads()``, d score / d each attention matrix (the whole
  forward keeps its graph).

Example (a complete method; put it in any module of :mod:`camlens.methods`, or in your own code)::

    @register("gradmean", paper="…", summary="mean gradient per channel", title="Grad-Mean",
              aliases=("grad-mean",))
    def gradmean(ctx: ForwardPass, *, relu: bool = True) -> MethodOutput:
        w = ctx.layer_grads().mean((-2, -1), keepdim=True)          # (N, K, C, 1, 1)
        m = (w * ctx.layer_features[:, None]).sum(2)                # (N, K, h, w)
        return MethodOutput(m.clamp_min(0) if relu else m)

Every module of this package (but ``registry`` and private ``_*`` modules) is imported on first
use, so a new built-in method is one new file and nothing else: its name, aliases and figure title
reach :func:`camlens.explain`, the CLI's ``--method``, ``camlens methods`` and the figures.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from ..errors import MethodError

if TYPE_CHECKING:  # typing only: `import camlens` loads this registry without importing torch
    import torch

    from ..engine import ForwardPass

Need = Literal["features", "layer_grads", "input_grads", "rules", "attention", "attention_grads"]
Kind = Literal["layer", "pixel"]
NEEDS: frozenset[str] = frozenset(get_args(Need))
KINDS: frozenset[str] = frozenset(get_args(Kind))


@dataclass
class MethodOutput:
    """``raw``: ``(N, K, h, w)`` for layer methods or ``(N, K, C, H, W)`` for pixel methods;
    ``maps``: ``(N, K, H, W)`` at input resolution (``None``: upsample ``raw`` bilinearly)."""

    raw: torch.Tensor
    maps: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class MethodFn(Protocol):
    """The contract of a method function: the shared pass first, then keyword options."""

    def __call__(self, ctx: ForwardPass, /, **options: Any) -> MethodOutput: ...


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its ``name``, ``paper``, one-line ``summary``, ``kind``, what it
    ``needs`` from the forward pass, the figure ``title`` and the other names it answers to."""

    name: str
    paper: str
    summary: str
    kind: Kind
    needs: frozenset[str]
    fn: Callable[..., MethodOutput] = field(repr=False)
    title: str = ""
    aliases: tuple[str, ...] = ()
    #: the method only runs forwards of the model (no gradient, no hook): it also explains a scoring
    #: function or a model served elsewhere (see :mod:`camlens.models.blackbox`)
    blackbox: bool = False

    def options(self) -> dict[str, Any]:
        """Keyword options and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY or p.default is not p.empty}

    def __str__(self) -> str:
        return f"{self.name:<18} {self.kind:<6} {self.paper}"


_REGISTRY: dict[str, MethodInfo] = {}
_ALIASES: dict[str, str] = {}
_LOADED: list[bool] = []


def _key(name: str) -> str:
    return name.strip().lower()


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """A module imported twice (``importlib.reload``) registers the same function again: allowed."""
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (
        getattr(b, "__module__", None),
        getattr(b, "__qualname__", None),
    )


def register(
    name: str,
    *,
    paper: str,
    summary: str,
    kind: Kind = "layer",
    needs: tuple[Need | str, ...] = ("features", "layer_grads"),
    title: str | None = None,
    aliases: tuple[str, ...] = (),
    blackbox: bool = False,
) -> Callable[[Callable[..., MethodOutput]], Callable[..., MethodOutput]]:
    """Decorator registering a method under ``name`` (and ``aliases``), titled ``title`` in figures;
    ``blackbox``: it only calls ``ctx.model`` on inputs (no gradient, no hook).

    Raises:
        ValueError: an unknown ``needs`` or ``kind``, or a name or alias already taken by another
            method (names are case-insensitive).
    """
    bad = {n for n in needs if n not in NEEDS and not (n.startswith("layer_grads:") and len(n) > 12)}
    if bad:
        raise ValueError(f"unknown needs {sorted(bad)}; choose from {sorted(NEEDS)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    key = _key(name)
    keys = [_key(a) for a in aliases]

    def deco(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        for k in (key, *keys):
            owner = _REGISTRY.get(k) or _REGISTRY.get(_ALIASES.get(k, ""))
            if owner is not None and not (owner.name == key and _same_function(owner.fn, fn)):
                raise ValueError(
                    f"method name {k!r} is already registered by {owner.fn.__module__}.{owner.fn.__qualname__}; "
                    "choose another name or alias"
                )
        _REGISTRY[key] = MethodInfo(
            key, paper, summary, kind, frozenset(needs), fn, title or name, tuple(keys), blackbox=blackbox
        )
        for a in keys:
            _ALIASES[a] = key
        return fn

    return deco


def unregister(name: str) -> None:
    """Remove a method and its aliases (for tests and plug-ins that replace a method)."""
    info = _REGISTRY.pop(_key(name), None)
    if info is not None:
        for a in info.aliases:
            _ALIASES.pop(a, None)


def get_method(name: str) -> MethodInfo:
    """The method registered under ``name`` or one of its aliases (case-insensitive)."""
    _load_builtin()
    if not isinstance(name, str):
        raise MethodError(
            f"method must be a method name (a string such as 'gradcam') or a list of names, not {name!r}; "
            f"registered: {', '.join(sorted(_REGISTRY))}"
        )
    key = _key(name)
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
    """Import every method module of this package once (plug-in discovery, not a cycle dodge)."""
    if _LOADED:
        return
    _LOADED.append(True)
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name != "registry" and not mod.name.startswith("_"):
            importlib.import_module(f"{__package__}.{mod.name}")
