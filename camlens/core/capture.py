"""Capture the features at one place of a forward pass, without leaving a trace.

Three places can be captured:

* ``"output"`` of a module (a forward hook),
* ``"input"`` of a module (a forward pre-hook),
* ``"pool"``: the input of the *last global pooling call* of the forward pass, whether the
  pooling is a module (``nn.AdaptiveAvgPool2d``) or a functional call (``F.adaptive_avg_pool2d``
  in torchvision's DenseNet, ``x.mean((2, 3))``) — seen through a :class:`TorchFunctionMode`.

**Cutting the graph below the layer.** Layer methods (CAM, Grad-CAM…) only need gradients
from the score down to the captured features. With ``cut=True`` the forward starts with
autograd off; at the capture the features are replaced by a fresh leaf tensor that requires
grad, and recording starts there. Grad-CAM then costs about one inference forward plus a
backward through the head only. When a module runs several times and the *last* call is
wanted, every call is cut: the last call's output never feeds another call of the module,
so its gradient is exact. The value handed on is always a clone (with or without grad, cut or
not), so that in-place operations after the layer (``ReLU(inplace=True)``, DenseNet's
``F.relu(features, inplace=True)``) never modify the captured tensor: a method reads the same
features whichever other methods share the forward. The clone costs one copy of the feature map
(DenseNet-121, 224 px: 200 KB per image), nothing next to the forward.

**Cheap automatic capture.** The function mode costs a Python call for every torch function of
the forward (a few percent of a batch-1 forward). With ``CaptureSpec(lazy_pool=True)`` (what
:func:`camlens.explain` uses for the last call) and a model that has a global pooling *module*
(``nn.AdaptiveAvgPool2d(1)``…), the pooling modules are hooked directly and the function mode
is switched on only after the first global pooling module has run: any global pooling before
that call is followed by a later one, so the *last* call is found exactly as with the function
mode from the start. If no pooling module ran, nothing was captured and
:func:`needs_full_scan` tells the caller to run again with the function mode from the start.

Hooks and the function mode are removed in ``finally`` blocks, and the caller's grad mode
is restored, also when the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from camlens.base.errors import InputError
from camlens.core.layout import Layout, LayoutRequest
from camlens.core.precision import features_in_float32

_POOL_MODULES = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d,
    nn.AvgPool3d,
    nn.MaxPool3d,
)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)
#: per tensor rank: the adaptive and the windowed pooling functions of its spatial dimensions
_POOL_FUNCS: dict[int, tuple[tuple[Callable[..., Any], ...], tuple[Callable[..., Any], ...]]] = {
    4: ((F.adaptive_avg_pool2d, F.adaptive_max_pool2d), (F.avg_pool2d, F.max_pool2d)),
    5: ((F.adaptive_avg_pool3d, F.adaptive_max_pool3d), (F.avg_pool3d, F.max_pool3d)),
}


def _is_one(size) -> bool:
    if isinstance(size, int):
        return size == 1
    if isinstance(size, (tuple, list)):
        return all(s == 1 for s in size)
    return False


def global_pool_input(func, args, kwargs) -> torch.Tensor | None:
    """If ``func(*args, **kwargs)`` pools a 4-D ``(N, C, h, w)`` or a 5-D ``(N, C, d, h, w)`` tensor
    to one value per channel (global pooling), its input."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() not in _POOL_FUNCS:
        return None
    x = args[0]
    adaptive, windowed = _POOL_FUNCS[x.dim()]
    if func in adaptive:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return x if _is_one(size) else None
    if func in windowed:
        k = args[1] if len(args) > 1 else kwargs.get("kernel_size")
        k = (k,) * (x.dim() - 2) if isinstance(k, int) else tuple(k)
        return x if k == tuple(x.shape[2:]) else None
    if func in (torch.mean, torch.Tensor.mean, torch.amax, torch.Tensor.amax):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None:
            return None
        dims = {d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim)}
        return x if dims == set(range(2, x.dim())) else None
    return None


@dataclass
class CaptureSpec:
    """Where to capture: ``module`` (None for ``"pool"``), its dotted ``name``, ``capture`` kind
    (``"output"``, ``"input"`` or ``"pool"``) and which ``call`` (0-based; -1 for the last)."""

    module: nn.Module | None
    name: str
    capture: str = "output"
    call: int = -1
    #: ``"pool"`` with ``call=-1`` only: hook global pooling modules and watch function calls only
    #: after the first one ran (see the module docstring)
    lazy_pool: bool = False

    def describe(self) -> str:
        where = {"output": "output of", "input": "input of", "pool": "input of global pooling"}[self.capture]
        call = "" if self.call == -1 else f", call {self.call}"
        return f"{where} {self.name}{call}"


@dataclass
class Captured:
    """What a capture saw: the features (a leaf when cut), how many calls matched, and for
    ``"pool"`` captures the pooling module (if any) that made the last call."""

    value: torch.Tensor | None = None
    calls: int = 0
    pool_module: str | None = None
    #: ``"pool"`` captures watching every call: the last module (execution order) whose output
    #: :func:`is_spatial_fallback` accepts, as ``(name, module)`` — the fallback layer when no
    #: global pooling ran, known without another forward
    last_spatial: tuple[str, nn.Module] | None = None
    #: ``"pool"`` captures watching every call: the last norm module with a token output
    #: ``(N, T, D)`` that ran before the last attention module (:func:`is_attention`): the
    #: automatic layer of a transformer without global pooling
    token_norm: tuple[str, nn.Module] | None = None
    #: the layout adapter applied to the captured tensor (``None``: none was asked for)
    layout: Layout | None = None
    _current_pool_module: list[str] = field(default_factory=list)
    _last_norm: tuple[str, nn.Module] | None = None


def is_spatial_fallback(module: nn.Module, output) -> bool:
    """Whether ``module``'s ``output`` can serve as the fallback layer of a network without global
    pooling: a leaf module with a spatial ``(N, C, h, w)`` (or a volume's ``(N, C, d, h, w)``)
    output, ``h, w > 1``, that is not a fixed-size adaptive pooling adapter (VGG's ``avgpool``)."""
    return (
        isinstance(output, torch.Tensor)
        and output.dim() in (4, 5)
        and output.shape[-1] > 1
        and output.shape[-2] > 1
        and not isinstance(module, _ADAPTIVE_POOLS)
        and next(iter(module.children()), None) is None
    )


_NORMS = (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))


def is_attention(module: nn.Module) -> bool:
    """An attention module: ``nn.MultiheadAttention`` or a class named ``*Attention``
    (timm ``Attention``, Hugging Face ``ViTAttention``/``ViTSelfAttention``, …)."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


def is_norm(module: nn.Module) -> bool:
    """A normalization module (torch's LayerNorm/GroupNorm/RMSNorm, timm's ``RmsNorm``, …)."""
    return isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()


def _note_norm(out: Captured, name: str):
    def post(module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 3:
            out._last_norm = (name, module)

    return post


def _note_attention(out: Captured):
    def pre(module, args) -> None:
        if out._last_norm is not None:
            out.token_norm = out._last_norm

    return pre


def _is_global_pool_module(module: nn.Module) -> bool:
    """A pooling module that pools any input to one value per channel (``nn.AdaptiveAvgPool2d(1)``,
    ``nn.AdaptiveAvgPool3d(1)`` and friends)."""
    return isinstance(module, _ADAPTIVE_POOLS) and _is_one(module.output_size)


#: pooling module -> (the functional call it makes, the attribute holding its size argument)
_POOL_CALLS: dict[type, tuple[Callable[..., Any], str]] = {
    nn.AdaptiveAvgPool2d: (F.adaptive_avg_pool2d, "output_size"),
    nn.AdaptiveMaxPool2d: (F.adaptive_max_pool2d, "output_size"),
    nn.AvgPool2d: (F.avg_pool2d, "kernel_size"),
    nn.MaxPool2d: (F.max_pool2d, "kernel_size"),
    nn.AdaptiveAvgPool3d: (F.adaptive_avg_pool3d, "output_size"),
    nn.AdaptiveMaxPool3d: (F.adaptive_max_pool3d, "output_size"),
    nn.AvgPool3d: (F.avg_pool3d, "kernel_size"),
    nn.MaxPool3d: (F.max_pool3d, "kernel_size"),
}


def _module_pools_globally(module: nn.Module, x) -> bool:
    """Whether ``module(x)`` is a global pooling call, judged as :func:`global_pool_input` judges
    the functional call the module makes."""
    call = next((c for kind, c in _POOL_CALLS.items() if isinstance(module, kind)), None)  # subclasses too
    if call is None:
        return False
    func, attr = call
    arg = getattr(module, attr)
    return global_pool_input(func, (x, arg), {}) is not None


def uses_lazy_pool(model: nn.Module, spec: CaptureSpec) -> bool:
    """Whether :func:`capture` watches function calls only after a pooling module ran."""
    return (
        spec.capture == "pool"
        and spec.lazy_pool
        and spec.call == -1
        and any(_is_global_pool_module(m) for m in model.modules())
    )


def needs_full_scan(model: nn.Module, spec: CaptureSpec, captured_value) -> bool:
    """After a forward under :func:`capture`: nothing was captured, but a global pooling function
    call may have gone unseen (no pooling module ran): run again with ``lazy_pool=False``."""
    return captured_value is None and uses_lazy_pool(model, spec)


class _PoolMode(TorchFunctionMode):
    def __init__(self, on_pool) -> None:
        super().__init__()
        self.on_pool = on_pool

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = global_pool_input(func, args, kwargs)
        if x is not None:
            args = (self.on_pool(x), *args[1:])
        return func(*args, **kwargs)


def _pop_pool(out: Captured):
    def post(module, args, output) -> None:
        out._current_pool_module.pop()

    return post


def _note_spatial(out: Captured, name: str):
    def post(module, args, output) -> None:
        if is_spatial_fallback(module, output):
            out.last_spatial = (name, module)

    return post


@dataclass(frozen=True)
class _Take:
    """What a capture does with the tensor at the watched call: record it (adapted to ``(N, D, h, w)``
    by ``layout``; a leaf when ``cut``) and hand the model a copy, or ``replace(features)``."""

    out: Captured
    spec: CaptureSpec
    cut: bool
    need_grad: bool
    layout: LayoutRequest | None
    replace: Callable[[torch.Tensor], torch.Tensor] | None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        out, spec = self.out, self.spec
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"the {spec.describe()} is a {type(t).__name__}, not a tensor; choose another layer "
                "(`camlens layers MODEL` lists candidates) or capture='input'"
            )
        idx, out.calls = out.calls, out.calls + 1
        if spec.call >= 0 and idx != spec.call:
            return t
        t = features_in_float32(t)  # a forward under autocast (precision="bf16"): maps computed in float32
        if out._current_pool_module:
            out.pool_module = out._current_pool_module[-1]
        layout = None if spec.capture == "pool" else self.layout
        if self.replace is not None:
            return _replaced(t, self.replace, out, layout, spec)
        if layout is not None:
            lay = layout.layout(tuple(t.shape), f"the {spec.describe()}")
            out.layout = lay
            if lay.adapted:
                feats, prefix = lay.to_nchw(t)
                if self.cut:
                    feats = self._leaf(feats)
                    prefix = prefix.detach() if prefix is not None else None
                out.value = feats
                return lay.from_nchw(feats, prefix)
        if self.cut:
            out.value = leaf = self._leaf(t)
            # hand on a clone, also without grad: an in-place op after the layer (ReLU(inplace=True),
            # DenseNet's F.relu(features, inplace=True)) must not rewrite the captured features
            return leaf.clone()
        out.value = t
        return t.clone()

    def _leaf(self, t: torch.Tensor) -> torch.Tensor:
        """The cut: a new leaf, and autograd on from here when gradients will be taken."""
        leaf = t.detach().requires_grad_(self.need_grad)
        torch.set_grad_enabled(self.need_grad)
        return leaf


@contextlib.contextmanager
def capture(
    model: nn.Module,
    spec: CaptureSpec,
    *,
    cut: bool = False,
    need_grad: bool = True,
    layout: LayoutRequest | None = None,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[Captured]:
    """Context manager: while active, a forward of ``model`` records the features at ``spec``.

    Args:
        cut: start the forward with autograd off and record only from the capture on
            (layer methods). With ``cut=False`` the graph below the layer is kept (pixel methods).
        need_grad: whether the captured features must require grad (False: CAM, Score-CAM).
        layout: adapt token ``(N, T, D)`` and channels-last ``(N, h, w, D)`` captures of a module's
            output or input to ``(N, D, h, w)`` (see :mod:`camlens.core.layout`): the captured value is the
            ``(N, D, h, w)`` tensor (the leaf when cut) and the model goes on with the same values
            rebuilt from it, so gradients are taken with respect to the reshaped features.
        replace: hand the model ``replace(features)`` instead of the features at the captured call
            (``(N, D, h, w)`` after the ``layout`` adapter, rebuilt to the module's layout), for methods
            that score modified features through the layers above (Ablation-CAM, Recipro-CAM); the
            captured value stays the model's own. Use with an explicit ``spec.call``.
    """
    out = Captured()
    take = _Take(out, spec, cut, need_grad, layout, replace)
    prev_grad = torch.is_grad_enabled()
    try:
        with contextlib.ExitStack() as stack:
            if cut:
                torch.set_grad_enabled(False)
            stack.enter_context(_watch(model, spec, take))
            yield out
    finally:
        torch.set_grad_enabled(prev_grad)


@contextlib.contextmanager
def _watch(model: nn.Module, spec: CaptureSpec, take: _Take) -> Iterator[None]:
    """The hooks (and, for global pooling, the function mode) that hand the watched call to ``take``;
    all removed on exit, also on error."""
    handles: list = []
    try:
        if spec.capture in ("output", "input"):
            if spec.module is None:
                raise InputError(f"capture={spec.capture!r} needs a module; {spec.name} has none")
            handles.append(_module_hook(spec, take))
            yield
        elif spec.capture == "pool" and uses_lazy_pool(model, spec):
            with _lazy_pool(model, take, handles):
                yield
        elif spec.capture == "pool":
            _scan_hooks(model, take.out, handles)
            with _PoolMode(take):
                yield
        else:
            raise InputError(f"capture must be 'output', 'input' or 'pool', not {spec.capture!r}")
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _lazy_pool(model: nn.Module, take: _Take, handles: list) -> Iterator[None]:
    """Hook the pooling modules; the function mode starts only after one of them pooled globally
    (so a network whose pooling module ran needs no function mode at all)."""
    out, mode = take.out, _PoolMode(take)
    active: list[bool] = []  # [True] once the function mode is on

    def pre_lazy(m, args, n):
        out._current_pool_module.append(n)
        if not active and args and _module_pools_globally(m, args[0]):
            return (take(args[0]), *args[1:])
        return None

    def post_lazy(m, args, output):
        out._current_pool_module.pop()
        if not active and args and _module_pools_globally(m, args[0]):
            mode.__enter__()
            active.append(True)

    for name, m in model.named_modules():
        if isinstance(m, _POOL_MODULES):
            handles.append(m.register_forward_pre_hook(lambda m, a, n=name: pre_lazy(m, a, n)))
            handles.append(m.register_forward_hook(post_lazy))
    try:
        yield
    finally:
        if active:
            mode.__exit__(None, None, None)


def _scan_hooks(model: nn.Module, out: Captured, handles: list) -> None:
    """Watching every call: note the pooling module running, the last spatial module, the last norm
    and the attention modules (the fallbacks when the network has no global pooling)."""
    for name, m in model.named_modules():
        if isinstance(m, _POOL_MODULES):
            handles.append(m.register_forward_pre_hook(lambda m, a, n=name: out._current_pool_module.append(n)))
            handles.append(m.register_forward_hook(_pop_pool(out)))
        if name and next(iter(m.children()), None) is None:
            handles.append(m.register_forward_hook(_note_spatial(out, name)))
            if is_norm(m):
                handles.append(m.register_forward_hook(_note_norm(out, name)))
        if name and is_attention(m):
            handles.append(m.register_forward_pre_hook(_note_attention(out)))


def _module_hook(spec: CaptureSpec, take: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The hook that hands ``spec.module``'s output (or first input) to ``take``; its handle."""
    assert spec.module is not None
    if spec.capture == "output":
        return spec.module.register_forward_hook(lambda m, a, o: take(o))

    def pre(m, args):
        if not args:
            raise InputError(f"{spec.name} was called without positional input; use capture='output'")
        return (take(args[0]), *args[1:])

    return spec.module.register_forward_pre_hook(pre)


def _replaced(t: torch.Tensor, replace, out: Captured, layout: LayoutRequest | None, spec: CaptureSpec):
    """``replace`` applied to the captured features ``t`` (through the layout adapter, if any)."""
    if layout is not None:
        lay = layout.layout(tuple(t.shape), f"the {spec.describe()}")
        out.layout = lay
        if lay.adapted:
            feats, prefix = lay.to_nchw(t)
            out.value = feats
            return lay.from_nchw(replace(feats), prefix)
    out.value = t
    return replace(t)


def count_calls(model: nn.Module, spec: CaptureSpec, x: torch.Tensor) -> int:
    """How many times ``spec`` fires in one forward of ``x`` (inference only)."""
    probe = CaptureSpec(spec.module, spec.name, spec.capture, -1)
    with torch.inference_mode(), capture(model, probe, cut=False, need_grad=False) as c:
        model(x.clone())  # never the caller's tensor (in-place first layers)
    return c.calls
