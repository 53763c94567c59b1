r"""Backward rules for ReLU: plain backprop, Deconvnet and Guided Backprop, for every ReLU flavour.

For a ReLU :math:`y = \max(x, 0)` and the gradient :math:`g = \partial s / \partial y` arriving
from above, the three rules return (:math:`[\cdot]` is 1 where true, else 0):

================  ==================================  =============================================
rule              backward                            paper
================  ==================================  =============================================
``"backprop"``    :math:`g\,[x > 0]`                  the true gradient (Simonyan et al., ICLRW 2014)
``"deconvnet"``   :math:`g\,[g > 0]`                  Zeiler & Fergus, ECCV 2014
``"guided"``      :math:`g\,[x > 0]\,[g > 0]`         Springenberg et al., ICLRW 2015
================  ==================================  =============================================

**Clipped ReLUs** (``ReLU6``; ``hardtanh`` with ``min_val=0``): :math:`y = \min(\max(x, 0), u)`
with :math:`u = 6` for ReLU6. Its true derivative is :math:`[0 < x < u]` (as PyTorch's own
``hardtanh`` backward), so the forward mask :math:`[x > 0]` above becomes :math:`[0 < x < u]`
for ``backprop`` and ``guided``; ``deconvnet`` ignores the forward and stays :math:`g\,[g > 0]`.
The mask is read from the output (:math:`0 < y < u \iff 0 < x < u`), so nothing beyond what
autograd itself keeps is saved, and in-place calls are exact.

**What is intercepted.** Inside :func:`relu_rules` a :class:`~torch.overrides.TorchFunctionMode`
replaces, for tensors that require grad while grad mode is on, every call of

* ``F.relu`` (also ``inplace=True``, hence ``nn.ReLU`` and ``nn.ReLU(inplace=True)``),
  ``torch.relu``, ``torch.relu_`` (``F.relu_``), ``Tensor.relu``, ``Tensor.relu_``;
* ``F.relu6`` (``nn.ReLU6`` goes through ``F.hardtanh``), ``torch._C._nn.relu6`` / ``relu6_``;
* ``F.hardtanh`` / ``F.hardtanh_`` (``nn.Hardtanh``, ``nn.ReLU6``) **only when** ``min_val == 0``
  and ``max_val > 0`` (a clipped ReLU); other ``hardtanh`` calls are left alone;
* ``F.threshold(x, 0, 0)`` (a ReLU written as a threshold);
* ``clamp`` / ``clip`` with ``min=0`` (and ``max`` absent or ``> 0``: a clipped ReLU) and
  ``clamp_min(x, 0)``, as functions (``torch.clamp``, ``torch.clamp_min``, ``torch.clip``), tensor
  methods (``x.clamp(min=0)``, ``x.clamp_min(0)``) and in place (``clamp_``, ``clamp_min_``,
  ``clip_``): a ReLU written as a clamp. (PyTorch's own clamp backward passes the gradient at
  exactly ``x = 0``; the rules use the ReLU convention there, derivative 0 — a set of measure zero.)

Because the function calls themselves are replaced (not modules), one module object called
several times in a pass (EfficientNet-Lite0 reuses its ``nn.ReLU6``) is handled at every call.
In-place variants stay in place (the custom function marks its input dirty), so code that
relies on the side effect (``x.relu_(); return x``) behaves as before.

Not intercepted (documented limits): a clamp with a tensor bound, ``torch.maximum(x, 0)``,
ReLUs inside TorchScript / compiled graphs, and other activations (GELU, SiLU, LeakyReLU…):
for a network without any intercepted ReLU, :attr:`RuleSwitch.relu_calls` stays 0 and the
Deconvnet / Guided methods raise :class:`~camlens.base.errors.MethodError` rather than silently
returning the plain gradient.

**One graph, three rules.** The rule is not fixed at forward time: each replaced call records
the :class:`RuleSwitch` it belongs to, and its backward reads ``switch.rule`` when it runs. So
one forward graph serves the true gradient, Deconvnet and Guided Backprop, switched per backward
pass with ``switch.use(rule)``. The mode is active only inside the ``with`` block; the switch is
back at ``"backprop"`` outside ``use``, so any later backward through that graph — and every new
forward — gives the ordinary gradient.

Example::

    with relu_rules(model) as switch:
        y = model(x.requires_grad_())[:, c].sum()
    with switch.use("guided"):
        (g,) = torch.autograd.grad(y, x)
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from camlens.base.errors import MethodError

RULES = ("backprop", "deconvnet", "guided")


class RuleSwitch:
    """The rule the replaced ReLUs apply at backward time, and what the forward intercepted.

    Attributes:
        rule: ``"backprop"`` (default), ``"deconvnet"`` or ``"guided"``.
        relu_calls: how many ReLU calls were replaced (0: the network has no ReLU we can see).
        kinds: those calls by flavour, e.g. ``{"relu": 3, "relu6": 33}``.
    """

    def __init__(self) -> None:
        self.rule = "backprop"
        self.relu_calls = 0
        self.kinds: Counter[str] = Counter()

    @contextlib.contextmanager
    def use(self, rule: str) -> Iterator[RuleSwitch]:
        """Apply ``rule`` in every backward run inside the block; restore the previous rule after."""
        if rule not in RULES:
            raise MethodError(f"unknown ReLU rule {rule!r}; choose one of {', '.join(RULES)}")
        prev = self.rule
        self.rule = rule
        try:
            yield self
        finally:
            self.rule = prev


def rule_backward(grad: torch.Tensor, out: torch.Tensor, rule: str, upper: float = math.inf) -> torch.Tensor:
    """The backward of ``y = clamp(x, 0, upper)`` under ``rule``, from the forward output ``out = y``.

    ``backprop``: ``g [0 < y < upper]``; ``deconvnet``: ``g [g > 0]``;
    ``guided``: ``g [0 < y < upper] [g > 0]`` = the backprop rule applied to ``max(g, 0)``.

    Computed with ATen's own ReLU/hardtanh backward kernels (one fused pass over memory; the
    guided rule adds one ``clamp_min``), so a rule costs about what the native backward costs.
    """
    if rule == "deconvnet":
        return grad.clamp_min(0)
    if rule == "guided":
        grad = grad.clamp_min(0)
    elif rule != "backprop":
        raise ValueError(f"unknown ReLU rule {rule!r}")
    if upper == math.inf:
        return torch.ops.aten.threshold_backward(grad, out, 0)
    return torch.ops.aten.hardtanh_backward(grad, out, 0, upper)


class _RuleReLU(torch.autograd.Function):
    """``clamp(x, 0, upper)`` whose backward follows ``switch.rule`` at backward time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float, inplace: bool, switch: RuleSwitch) -> torch.Tensor:
        if inplace:
            out = x.relu_() if upper == math.inf else x.clamp_(0, upper)
            ctx.mark_dirty(x)
        else:
            out = x.relu() if upper == math.inf else x.clamp(0, upper)
        ctx.save_for_backward(out)
        ctx.upper = upper
        ctx.switch = switch
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        return rule_backward(grad, out, ctx.switch.rule, ctx.upper), None, None, None


def _arg(args: tuple, kwargs: dict, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _parse(func, args: tuple, kwargs: dict) -> tuple[torch.Tensor, float, bool, str] | None:
    """``(input, upper, inplace, kind)`` if ``func(*args, **kwargs)`` is a (clipped) ReLU, else None."""
    if not args and "input" not in kwargs:
        return None
    x = args[0] if args else kwargs["input"]
    if func is F.relu:
        return x, math.inf, bool(_arg(args, kwargs, 1, "inplace", False)), "relu"
    if func in (torch.relu, torch.Tensor.relu):
        return x, math.inf, False, "relu"
    if func in (torch.relu_, torch.Tensor.relu_):
        return x, math.inf, True, "relu"
    if func is F.relu6:
        return x, 6.0, bool(_arg(args, kwargs, 1, "inplace", False)), "relu6"
    if func is _NN_RELU6:
        return x, 6.0, False, "relu6"
    if func is _NN_RELU6_:
        return x, 6.0, True, "relu6"
    if func in (F.hardtanh, _NN_HARDTANH, _NN_HARDTANH_):
        lo = _arg(args, kwargs, 1, "min_val", -1.0)
        hi = _arg(args, kwargs, 2, "max_val", 1.0)
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor) or lo != 0 or not hi > 0:
            return None
        inplace = func is _NN_HARDTANH_ or (func is F.hardtanh and bool(_arg(args, kwargs, 3, "inplace", False)))
        return x, float(hi), inplace, "relu6" if hi == 6 else "hardtanh"
    if func in _CLAMPS:
        inplace = func in _CLAMPS_INPLACE
        if func in _CLAMP_MINS:
            lo, hi = _arg(args, kwargs, 1, "min", None), None
        else:
            lo, hi = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor) or lo is None or lo != 0:
            return None
        if hi is not None and not hi > 0:
            return None
        return x, math.inf if hi is None else float(hi), inplace, "clamp"
    if func in _THRESHOLDS:
        th = _arg(args, kwargs, 1, "threshold", None)
        val = _arg(args, kwargs, 2, "value", None)
        if isinstance(th, torch.Tensor) or isinstance(val, torch.Tensor) or th != 0 or val != 0:
            return None
        return x, math.inf, bool(_arg(args, kwargs, 3, "inplace", False)), "threshold"
    return None


_NN_RELU6 = getattr(torch._C._nn, "relu6", None)
_NN_RELU6_ = getattr(torch._C._nn, "relu6_", None)
_NN_HARDTANH = getattr(torch._C._nn, "hardtanh", None)
_NN_HARDTANH_ = getattr(torch._C._nn, "hardtanh_", None)
_THRESHOLDS = tuple(f for f in (F.threshold, getattr(F, "_threshold", None)) if f is not None)
_CLAMP_MINS = frozenset({torch.clamp_min, torch.Tensor.clamp_min, torch.clamp_min_, torch.Tensor.clamp_min_})
_CLAMPS_INPLACE = frozenset(
    {torch.clamp_, torch.Tensor.clamp_, torch.clip_, torch.Tensor.clip_, torch.clamp_min_, torch.Tensor.clamp_min_}
)
_CLAMPS = _CLAMP_MINS | _CLAMPS_INPLACE | {torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip}
_CANDIDATES = frozenset(
    f
    for f in (
        F.relu,
        torch.relu,
        torch.Tensor.relu,
        torch.relu_,
        torch.Tensor.relu_,
        F.relu6,
        _NN_RELU6,
        _NN_RELU6_,
        F.hardtanh,
        _NN_HARDTANH,
        _NN_HARDTANH_,
        *_THRESHOLDS,
        *_CLAMPS,
    )
    if f is not None
)


def _leaf_or_leaf_view(x: torch.Tensor) -> bool:
    """In place on these is an autograd error: let the native op raise it, before any change."""
    return x.is_leaf or (x._base is not None and x._base.is_leaf)


class _RuleMode(TorchFunctionMode):
    def __init__(self, switch: RuleSwitch) -> None:
        super().__init__()
        self.switch = switch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CANDIDATES and "out" not in kwargs:
            parsed = _parse(func, args, kwargs)
            if parsed is not None:
                x, upper, inplace, kind = parsed
                if (
                    isinstance(x, torch.Tensor)
                    and x.is_floating_point()
                    and x.requires_grad
                    and torch.is_grad_enabled()
                    and not (inplace and _leaf_or_leaf_view(x))
                ):
                    self.switch.relu_calls += 1
                    self.switch.kinds[kind] += 1
                    return _RuleReLU.apply(x, upper, inplace, self.switch)
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_rules(model: torch.nn.Module | None = None) -> Iterator[RuleSwitch]:
    """While active, every ReLU flavour in a forward pass back-propagates by ``switch.rule``.

    Yields a fresh :class:`RuleSwitch` (rule ``"backprop"``); select a rule for a backward pass
    with ``switch.use("guided")``. The mode is popped on exit, also on exceptions; the model
    itself is never modified (``model`` is accepted for symmetry with the other contexts).
    """
    switch = RuleSwitch()
    with _RuleMode(switch):
        yield switch


__all__ = ["RULES", "RuleSwitch", "relu_rules", "rule_backward"]
