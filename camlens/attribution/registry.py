"""The method registry: adding a method is adding one decorated function in one file.

A method is a :class:`MethodFn`, ``fn(ctx: ForwardPass, **options) -> MethodOutput``. It declares
what it needs from the shared forward pass (:data:`Need`), so that a list of methods costs one
forward and only the backward passes they need:

* ``"features"``: the captured layer features ``ctx.features`` ``(N, C, h, w)``;
* ``"layer_grads"``: ``ctx.layer_grads()``, d score / d features, ``(N, K, C, h, w)``;
* ``"layer_grads:NAME"``: only a reduction of them, ``ctx.layer_grad_sums(NAME)`` (``"mean"``
  ``(N, K, C)``, ``"sqmean"`` ``(N, K)``, or one registered with
  :func:`layer_grad_reduction` here; the caller looks them up with :func:`reductions_for` and
  hands them to the pass): all declared reductions are computed in one
  chunked sweep and the full tensor is never built (see :mod:`camlens.core.engine`);
* ``"input_grads"``: ``ctx.input_grads(rule)``, d score / d input, ``(N, K, C, H, W)``;
* ``"rules"``: the forward runs under :func:`camlens.core.rules.relu_rules` so that the ReLU
  backward rule can be switched per backward pass (Deconvnet, Guided Backprop);
* ``"attention"``: ``ctx.attention()``, every self-attention matrix ``(N, heads, T, T)``;
* ``"attention_grads"``: ``ctx.attention_grads()``, d score / d each attention matrix (the whole
  forward keeps its graph).

Example (a complete method; put it in any module of :mod:`camlens.attribution`, or in your own code)::

    @register("gradmean", paper="…", summary="mean gradient per channel", title="Grad-Mean",
              aliases=("grad-mean",))
    def gradmean(ctx: ForwardPass, *, relu: bool = True) -> MethodOutput:
        w = ctx.layer_grads().mean((-2, -1), keepdim=True)          # (N, K, C, 1, 1)
        m = (w * ctx.layer_features[:, None]).sum(2)                # (N, K, h, w)
        return MethodOutput(m.clamp_min(0) if relu else m)

**Which models** (``applies_to=``): a cheap predicate over :class:`ModelTraits` (the model's task
and whether it has global self-attention, known without a forward pass), used by the web app's
method list, ``camlens methods --model`` and :func:`camlens.explain`'s early refusal. A method that
declares nothing applies to every model, except that one needing ``"attention"`` or
``"attention_grads"`` applies to :data:`ATTENTION_MODELS`.

**What it costs** (``cost=``): ``cost(ctx, **options) -> Cost``, called after the shared forward
pass with the method's options (defaults filled in): the images the method will forward
(``Cost.forwards``: masked copies, path points, noisy samples), for the estimate printed before slow
work and the progress of the web app. Methods that forward nothing beyond the shared pass declare
nothing.

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

from camlens.base.errors import MethodError

if TYPE_CHECKING:  # typing only: `import camlens` loads this registry without importing torch
    import torch

    from camlens.core.engine import ForwardPass

Task = Literal["classification", "detection", "segmentation", "other"]


@dataclass(frozen=True)
class ModelTraits:
    """What an applicability check may look at, known without running the model
    (:func:`camlens.attribution.traits.model_traits`): the ``task`` (a zoo card's, or the target
    object's: a :class:`~camlens.targets.Detection` makes it ``"detection"``; ``"other"`` for
    similarity and custom target objects), whether it has global self-attention modules camlens
    can capture (``attention``: ViT, DeiT, Hugging Face ViT; not windowed Swin), whether it has
    windowed attention instead (``windowed``: Swin, MaxViT), and its ``name``."""

    task: Task = "classification"
    attention: bool = False
    name: str = "model"
    windowed: bool = False

    def describe(self) -> str:
        """``"resnet18 (a CNN classifier)"``."""
        kind = {"detection": "detector", "segmentation": "segmenter", "other": "model"}.get(self.task, "classifier")
        windowed = "windowed-attention transformer"
        arch = (
            "transformer"
            if self.attention
            else windowed
            if self.windowed
            else "CNN"
            if self.task == "classification"
            else ""
        )
        return f"{self.name} (a{'n' if (arch or kind)[0] in 'aeiou' else ''} {(arch + ' ' + kind).strip()})"


@dataclass(frozen=True)
class Applies:
    """Which models a method applies to: a cheap ``test`` over :class:`ModelTraits`, the words for
    it (``text``, shown by ``camlens methods``) and the fix the refusal names (``hint``)."""

    test: Callable[[ModelTraits], bool]
    text: str
    hint: str = ""
    #: the fix for a model with windowed attention (Swin, MaxViT), when it differs from ``hint``
    windowed_hint: str = ""

    def __call__(self, traits: ModelTraits) -> bool:
        return bool(self.test(traits))

    def hint_for(self, traits: ModelTraits) -> str:
        """The fix a refusal names for a model with these traits."""
        return self.windowed_hint if traits.windowed and self.windowed_hint else self.hint


ANY_MODEL = Applies(lambda t: True, "any model")
CLASSIFIERS = Applies(
    lambda t: t.task == "classification",
    "classifiers",
    "it reads a classifier's (N, num_classes) logits and head; use gradcam, which works on any head and task",
)
DETECTORS = Applies(
    lambda t: t.task == "detection",
    "detectors",
    "pass targets=camlens.targets.Detection(...) (a zoo detector uses its own detections by default), "
    "or use rise for other targets",
)
ATTENTION_MODELS = Applies(
    lambda t: t.attention,
    "ViT-like transformers (global self-attention; not Swin)",
    "this model has no global self-attention module camlens captures (nn.MultiheadAttention, timm Attention, "
    "Hugging Face ViT-style); use a layer method such as gradcam",
    "this model has no global self-attention: it attends within (shifted) windows of each stage's token map "
    "(Swin, MaxViT), the windows move between blocks and patch merging changes the grid between stages, so there "
    "is no attention matrix over one token sequence to roll out; explain it with the CAM family on a stage "
    "output instead: gradcam (or gradcam++, layercam, scorecam…) at the automatic layer (the last stage), or an "
    "earlier stage for a finer map, e.g. layer='features.5' on torchvision swin_t or layer='layers.2' on timm "
    "swin_* (`camlens layers MODEL` lists them)",
)


@dataclass(frozen=True)
class Cost:
    """What a method will run beyond the shared forward pass: ``forwards`` images through the model
    (``unit`` names them for the user), ``backwards`` of them also back-propagated to the input
    (about two forwards each), and ``cheaper``: option values that would cut the cost a lot (the
    estimate suggests them with their own estimate), or ``None``."""

    forwards: int
    unit: str = "forwards"
    backwards: int = 0
    cheaper: dict[str, Any] | None = None


Need = Literal["features", "layer_grads", "input_grads", "rules", "attention", "attention_grads"]
Kind = Literal["layer", "pixel"]
NEEDS: frozenset[str] = frozenset(get_args(Need))
KINDS: frozenset[str] = frozenset(get_args(Kind))


@dataclass
class MethodOutput:
    """``raw``: ``(N, K, h, w)`` for layer methods or ``(N, K, C, H, W)`` for pixel methods;
    ``maps``: ``(N, K, H, W)`` at input resolution (``None``: upsample ``raw`` bilinearly). For
    volume inputs ``(N, C, D, H, W)`` (methods registered with ``volumes=True``) every spatial
    ``(h, w)`` is ``(d, h, w)`` and the upsampling trilinear."""

    raw: torch.Tensor
    maps: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class MethodFn(Protocol):
    """The contract of a method function: the shared pass first, then keyword options."""

    def __call__(self, ctx: ForwardPass, /, **options: Any) -> MethodOutput: ...


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its ``name``, ``paper``, one-line ``summary``, ``kind``, what it
    ``needs`` from the forward pass, the figure ``title``, the other names it answers to, the
    models it ``applies_to``, its ``cost`` hook (``None``: nothing beyond the shared pass) and
    whether a box around its maps means something (``boxes``)."""

    name: str
    paper: str
    summary: str
    kind: Kind
    needs: frozenset[str]
    fn: Callable[..., MethodOutput] = field(repr=False)
    title: str = ""
    aliases: tuple[str, ...] = ()
    applies_to: Applies = ANY_MODEL
    cost: Callable[..., Cost] | None = field(default=None, repr=False)
    boxes: bool = True
    #: the method only runs forwards of the model (no gradient, no hook): it also explains a scoring
    #: function or a model served elsewhere (see :mod:`camlens.models.blackbox`)
    blackbox: bool = False
    #: the method also explains volumes and clips ``(N, C, D, H, W)`` (3-D features, 3-D masks…);
    #: :func:`camlens.explain` refuses the others on such inputs before any work
    volumes: bool = False

    def options(self) -> dict[str, Any]:
        """Keyword options and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY or p.default is not p.empty}

    def applies(self, traits: ModelTraits) -> bool:
        """Whether this method can run on a model with these traits (cheap; no forward pass)."""
        return self.applies_to(traits)

    def estimate(self, ctx: ForwardPass, options: dict[str, Any] | None = None) -> Cost | None:
        """The declared :class:`Cost` with these options (defaults filled in), or ``None``."""
        if self.cost is None:
            return None
        opts = {k: v for k, v in self.options().items() if v is not inspect.Parameter.empty}
        return self.cost(ctx, **(opts | dict(options or {})))

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
    applies_to: Applies | None = None,
    cost: Callable[..., Cost] | None = None,
    boxes: bool | None = None,
    blackbox: bool = False,
    volumes: bool = False,
) -> Callable[[Callable[..., MethodOutput]], Callable[..., MethodOutput]]:
    """Decorator registering a method under ``name`` (and ``aliases``), titled ``title`` in figures,
    for the models ``applies_to`` accepts (default: every model; :data:`ATTENTION_MODELS` for a
    method that needs the attention matrices), costing ``cost(ctx, **options)`` (see the module
    docstring). ``boxes``: whether a box around the map's hot region means something, so that the
    web app draws one by default (default: layer methods yes, pixel methods no — a box cut from
    pixel noise; smooth black-box maps such as RISE's say yes). ``blackbox``: it only calls
    ``ctx.model`` on inputs (no gradient, no hook), so it also explains a scoring function.
    ``volumes``: it handles 3-D inputs ``(N, C, D, H, W)`` and features ``(N, C, d, h, w)`` too,
    returning ``(N, K, d, h, w)`` (or ``(N, K, D, H, W)``) maps; the others are refused on volumes.

    Raises:
        ValueError: an unknown ``needs`` or ``kind``, or a name or alias already taken by another
            method (names are case-insensitive).
    """
    bad = {n for n in needs if n not in NEEDS and not (n.startswith("layer_grads:") and len(n) > 12)}
    if bad:
        raise ValueError(f"unknown needs {sorted(bad)}; choose from {sorted(NEEDS)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    if applies_to is None:
        applies = ATTENTION_MODELS if {"attention", "attention_grads"} & set(needs) else ANY_MODEL
    else:
        applies = applies_to
    box = kind == "layer" if boxes is None else bool(boxes)
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
            key,
            paper,
            summary,
            kind,
            frozenset(needs),
            fn,
            title or name,
            tuple(keys),
            applies,
            cost,
            box,
            blackbox,
            volumes,
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


#: ``reducer(G, A) -> (N, Kc, ...)``: a reduction of a chunk ``G`` ``(N, Kc, C, *spatial)`` of layer
#: gradients with the features ``A`` ``(N, C, *spatial)`` (see :mod:`camlens.core.engine`)
LayerReducer = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
_REDUCTIONS: dict[str, LayerReducer] = {}


def layer_grad_reduction(name: str) -> Callable[[LayerReducer], LayerReducer]:
    """Declare a reduction of the layer gradients under ``name``: a method that declares
    ``needs=(..., f"layer_grads:{name}")`` reads it with ``ctx.layer_grad_sums(name)``. The pass
    gets it through :func:`reductions_for` (the engine knows only ``full``, ``mean``, ``sqmean``)."""

    def deco(fn: LayerReducer) -> LayerReducer:
        if name in _REDUCTIONS and not _same_function(_REDUCTIONS[name], fn):
            raise ValueError(f"a layer-gradient reduction named {name!r} is already registered")
        _REDUCTIONS[name] = fn
        return fn

    return deco


def reductions_for(needs: frozenset[str] | set[str]) -> dict[str, LayerReducer]:
    """The declared reductions ``needs`` asks for (``"layer_grads:NAME"``), by name.

    Raises:
        MethodError: a reduction that is neither built into the engine nor declared.
    """
    from camlens.core.engine import BUILTIN_REDUCTIONS  # torch is loaded by now: a call means work

    _load_builtin()
    wanted = {n.split(":", 1)[1] for n in needs if n.startswith("layer_grads:")}
    unknown = sorted(wanted - set(_REDUCTIONS) - set(BUILTIN_REDUCTIONS))
    if unknown:
        known = sorted({*_REDUCTIONS, *BUILTIN_REDUCTIONS})
        raise MethodError(
            f"unknown layer-gradient reduction(s) {', '.join(unknown)}; declare them with "
            f"@layer_grad_reduction (known: {', '.join(known)})"
        )
    return {n: _REDUCTIONS[n] for n in sorted(wanted) if n in _REDUCTIONS}


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


def applicable(traits: ModelTraits) -> dict[str, MethodInfo]:
    """The registered methods that apply to a model with ``traits``, by name."""
    return {n: i for n, i in methods().items() if i.applies(traits)}


def _load_builtin() -> None:
    """Import every method module of this package once (plug-in discovery, not a cycle dodge)."""
    if _LOADED:
        return
    _LOADED.append(True)
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name != "registry" and not mod.name.startswith("_"):
            importlib.import_module(f"{__package__}.{mod.name}")
