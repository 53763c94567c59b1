"""ReLU backward rules (camlens.core.rules) against the notebooks' 3x3 example and native autograd, for
every ReLU flavour; restoration of the global function mode, also on exceptions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camlens.base.errors import MethodError
from camlens.core.rules import RULES, relu_rules

# The notebooks' example (001_*.txt): ReLU input, incoming gradient, and the three expected outputs.
X = [[1.0, -1.0, 5.0], [2.0, -5.0, -7.0], [-3.0, 2.0, 4.0]]
G = [[-2.0, 3.0, -1.0], [6.0, -3.0, 1.0], [2.0, -1.0, 3.0]]
EXPECTED = {
    "backprop": [[-2.0, 0.0, -1.0], [6.0, 0.0, 0.0], [0.0, -1.0, 3.0]],
    "deconvnet": [[0.0, 3.0, 0.0], [6.0, 0.0, 1.0], [2.0, 0.0, 3.0]],
    "guided": [[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
}


def _side_effect_relu_(t):
    u = t * 1
    u.relu_()  # return value ignored: the caller relies on the in-place side effect
    return u


def _view_relu_(t):
    u = t * 1
    u[:].relu_()  # in place on a view of u
    return u


_shared = nn.ReLU6()

# name -> f(x). In-place flavours act on a non-leaf copy (``x * 1``), as inside a network.
RELU_FLAVOURS = {
    "nn.ReLU": lambda t: nn.ReLU()(t),
    "nn.ReLU(inplace)": lambda t: nn.ReLU(inplace=True)(t * 1),
    "F.relu": F.relu,
    "F.relu(inplace)": lambda t: F.relu(t * 1, inplace=True),
    "F.relu_": lambda t: F.relu_(t * 1),
    "torch.relu": torch.relu,
    "torch.relu_": lambda t: torch.relu_(t * 1),
    "Tensor.relu": lambda t: t.relu(),
    "Tensor.relu_": lambda t: (t * 1).relu_(),
    "relu_ side effect": _side_effect_relu_,
    "relu_ on a view": _view_relu_,
    "F.threshold(0,0)": lambda t: F.threshold(t, 0.0, 0.0),
}
# ReLU6 flavours: the example's inputs all lie below 6, so it applies unchanged (mask 0 < x < 6).
RELU6_FLAVOURS = {
    "nn.ReLU6": lambda t: nn.ReLU6()(t),
    "nn.ReLU6(inplace)": lambda t: nn.ReLU6(inplace=True)(t * 1),
    "F.relu6": F.relu6,
    "F.relu6(inplace)": lambda t: F.relu6(t * 1, inplace=True),
    "F.hardtanh(0,6)": lambda t: F.hardtanh(t, 0.0, 6.0),
    "F.hardtanh_(0,6)": lambda t: F.hardtanh_(t * 1, 0.0, 6.0),
    "nn.Hardtanh(0,6)": lambda t: nn.Hardtanh(0.0, 6.0)(t),
    "shared ReLU6 module": lambda t: _shared(t),
}
ALL = {**RELU_FLAVOURS, **RELU6_FLAVOURS}


def rule_grads(f, x, g, rules=RULES):
    """Forward once under relu_rules, then one backward per rule on the same graph."""
    x = x.clone().requires_grad_(True)
    with relu_rules() as switch:
        y = f(x)
    out = {}
    for rule in rules:
        with switch.use(rule):
            (out[rule],) = torch.autograd.grad(y, x, g, retain_graph=True)
    return out, switch, y


@pytest.mark.parametrize("flavour", list(ALL))
def test_notebook_3x3_example_for_every_flavour(flavour):
    out, switch, y = rule_grads(ALL[flavour], torch.tensor(X), torch.tensor(G))
    for rule, expected in EXPECTED.items():
        assert out[rule].tolist() == expected, rule
    assert switch.relu_calls == 1
    assert y.tolist() == [[max(v, 0.0) for v in row] for row in X]  # the forward is unchanged


def _sample(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 50, generator=g, dtype=torch.float64) * 5
    x[0, :6] = torch.tensor([0.0, 6.0, -0.0, 5.999, 6.001, 12.0], dtype=torch.float64)  # edges of the masks
    return x, torch.randn(4, 50, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("flavour", list(ALL))
def test_rules_against_native_autograd_and_closed_forms(flavour):
    """backprop == PyTorch's own gradient of the same op (no rules); deconvnet == relu(g);
    guided == backprop * [g > 0]. Inputs include 0, 6 and values above 6."""
    f = ALL[flavour]
    x, g = _sample(0)
    out, _, _ = rule_grads(f, x, g)
    xr = x.clone().requires_grad_(True)
    (native,) = torch.autograd.grad(f(xr), xr, g)
    assert torch.equal(out["backprop"], native)
    upper = 6.0 if flavour in RELU6_FLAVOURS else float("inf")
    mask = (x > 0) & (x < upper)
    assert torch.equal(out["backprop"], torch.where(mask, g, 0.0))
    assert torch.equal(out["deconvnet"], g.clamp(min=0))
    assert torch.equal(out["guided"], torch.where(mask & (g > 0), g, 0.0))


def test_inplace_flavours_stay_in_place():
    x = torch.tensor(X, requires_grad=True)
    with relu_rules() as switch:
        u = x * 1
        ptr = u.data_ptr()
        v = u.relu_()
        w = x * 1 + 3
        F.relu6(w, inplace=True)
    assert v is u and u.data_ptr() == ptr and u.min() >= 0
    assert w.max() <= 6 and w.min() >= 0  # the side effect happened
    assert switch.relu_calls == 2 and dict(switch.kinds) == {"relu": 1, "relu6": 1}


def test_not_a_relu_is_left_alone():
    x = torch.tensor(X, requires_grad=True)
    with relu_rules() as switch:
        a = F.hardtanh(x)  # (-1, 1): not a clipped ReLU
        b = F.threshold(x, 1.0, 0.0)  # not a ReLU
        c = torch.clamp(x, min=-1)  # a clamp at another bound is not a ReLU (clamp(min=0) is: issue 28)
        with torch.no_grad():
            F.relu(x)  # no graph: nothing to change, not counted
        F.relu(x.detach())
    assert switch.relu_calls == 0
    assert type(a.grad_fn).__name__.startswith("Hardtanh")
    assert type(b.grad_fn).__name__.startswith("Threshold")
    assert type(c.grad_fn).__name__.startswith("Clamp")


class _GuidedReLU6Ref(torch.autograd.Function):
    """Reference guided ReLU6 written independently: g * [0 < x < 6] * [g > 0]."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ((x > 0) & (x < 6) & (g > 0)).to(g.dtype)


def test_one_module_called_several_times_gets_the_rule_at_every_call():
    torch.manual_seed(0)
    lin = nn.ModuleList(nn.Linear(8, 8).double() for _ in range(3))
    act = nn.ReLU6()  # one module object, three calls

    def net(x, a):
        for layer in lin:
            x = a(layer(x) * 4)
        return x.sum(1)

    x = torch.randn(5, 8, dtype=torch.float64)
    ones = torch.ones(5, dtype=torch.float64)
    out, switch, _ = rule_grads(lambda t: net(t, act), x, ones, rules=("guided",))
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(net(xr, _GuidedReLU6Ref.apply).sum(), xr)
    assert switch.relu_calls == 3
    assert ref.abs().sum() > 0
    torch.testing.assert_close(out["guided"], ref, rtol=0, atol=0)


def test_restored_after_exit_and_after_exception():
    x = torch.tensor(X, requires_grad=True)
    g = torch.tensor(G)
    with pytest.raises(RuntimeError, match="boom"), relu_rules():
        F.relu(x)
        raise RuntimeError("boom")
    assert torch._C._len_torch_function_stack() == 0
    y = F.relu(x)
    assert type(y.grad_fn).__name__ == "ReluBackward0"  # the native op again
    (grad,) = torch.autograd.grad(y, x, g)
    assert grad.tolist() == EXPECTED["backprop"]


def test_graph_outlives_the_context_with_ordinary_gradient():
    """A graph recorded under the rules back-propagates the true gradient outside ``use``, and
    ``use`` restores the previous rule also when the code inside raises."""
    x = torch.tensor(X, requires_grad=True)
    with relu_rules() as switch:
        y = F.relu(x)
    with pytest.raises(RuntimeError), switch.use("guided"):
        raise RuntimeError("backward failed")
    assert switch.rule == "backprop"
    (grad,) = torch.autograd.grad(y, x, torch.tensor(G), retain_graph=True)
    assert grad.tolist() == EXPECTED["backprop"]
    with switch.use("guided"):
        (grad,) = torch.autograd.grad(y, x, torch.tensor(G))
    assert grad.tolist() == EXPECTED["guided"]


def test_unknown_rule_is_a_clear_error():
    with relu_rules() as switch, pytest.raises(MethodError, match="deconvnet"), switch.use("lrp"):
        pass


def test_inplace_on_a_leaf_raises_the_native_error_without_modifying_it():
    x = torch.tensor(X, requires_grad=True)
    for f in (lambda: x.relu_(), lambda: F.relu(x[:2], inplace=True)):
        with pytest.raises(RuntimeError, match="leaf Variable"), relu_rules():
            f()
    assert x.tolist() == X
