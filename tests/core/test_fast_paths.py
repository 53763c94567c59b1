"""The fast paths of issue #7 give exactly what the slow paths give.

* Automatic layer (``"pool"`` capture) with ``lazy_pool``: pooling modules hooked, the function
  mode switched on only after the first global pooling module ran. Oracle: the same capture with
  the function mode from the start (``lazy_pool=False``), and hand-computed features.
* ``eval_mode`` on a model that is already in eval mode: nothing written, flags restored.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.base._util import eval_mode
from camlens.core.capture import CaptureSpec, capture, needs_full_scan, uses_lazy_pool


def _stack_depth() -> int:
    return torch._C._len_torch_function_stack()


class ModulePoolThenFunctional(nn.Module):
    """A global pooling module early (an SE-like gate), the final pooling functional."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.gate_pool = nn.AdaptiveAvgPool2d(1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def features(self, x):
        a = F.relu(self.c1(x))
        a = a * torch.sigmoid(self.gate_pool(a))
        return F.relu(self.c2(a))

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class UnusedPoolModule(nn.Module):
    """Declares ``nn.AdaptiveAvgPool2d(1)`` but pools functionally: the lazy pass sees nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 2)

    def features(self, x):
        return F.relu(self.c1(x))

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class TwoModulePools(nn.Module):
    """Global pooling modules twice (the first inside a gate), the last one is the head's."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.gate_pool = nn.AdaptiveMaxPool2d((1, 1))
        self.c2 = nn.Conv2d(4, 7, 3, padding=1)
        self.pool = nn.AvgPool2d(8)  # global at 8x8 inputs only
        self.fc = nn.Linear(7, 3)

    def features(self, x):
        a = F.relu(self.c1(x))
        a = a * self.gate_pool(a)
        return F.relu(self.c2(a))

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.mark.parametrize("net", [ModulePoolThenFunctional, TwoModulePools])
@pytest.mark.parametrize("cut", [True, False])
def test_lazy_pool_capture_equals_full_scan(net, cut):
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(2, 3, 8, 8)
    got = {}
    for lazy in (True, False):
        spec = CaptureSpec(None, "auto", "pool", -1, lazy_pool=lazy)
        assert uses_lazy_pool(model, spec) is lazy
        with capture(model, spec, cut=cut, need_grad=True) as cap:
            logits = model(x)
        assert _stack_depth() == 0
        (g,) = torch.autograd.grad(logits[:, 1].sum(), cap.value)
        got[lazy] = (cap.value.detach(), g, cap.pool_module)
    with torch.no_grad():
        expected = model.features(x)
    torch.testing.assert_close(got[True][0], expected)
    torch.testing.assert_close(got[False][0], expected)
    torch.testing.assert_close(got[True][1], got[False][1])
    assert got[True][2] == got[False][2]
    # the gradient of a logit w.r.t. the pooled features is W[c] / (h w) at every position
    torch.testing.assert_close(got[True][1], (model.fc.weight[1] / 64)[None, :, None, None].expand(2, -1, 8, 8))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lazy_pool_misses_unused_module_and_asks_for_full_scan():
    torch.manual_seed(0)
    model = UnusedPoolModule().eval()
    x = torch.randn(1, 3, 6, 6)
    spec = CaptureSpec(None, "auto", "pool", -1, lazy_pool=True)
    with torch.no_grad(), capture(model, spec, cut=False, need_grad=False) as cap:
        model(x)
    assert cap.value is None and needs_full_scan(model, spec, cap.value)
    # explain() runs again with the function mode from the start and finds the functional pooling
    e = camlens.explain(model, x, "gradcam", targets=1)
    with torch.no_grad():
        A = model.features(x)
    w = model.fc.weight[1] / 36
    torch.testing.assert_close(e.raw[:, 0], torch.einsum("c,nchw->nhw", w, A).relu())
    assert "functional" in e.layer


def test_lazy_pool_leaves_no_mode_on_error():
    class Boom(TwoModulePools):
        def forward(self, x):
            self.pool(self.features(x))
            raise RuntimeError("boom")

    model = Boom().eval()
    spec = CaptureSpec(None, "auto", "pool", -1, lazy_pool=True)
    with pytest.raises(RuntimeError, match="boom"), capture(model, spec, cut=True) as _:
        model(torch.randn(1, 3, 8, 8))
    assert _stack_depth() == 0
    assert torch.is_grad_enabled()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_explain_auto_layer_matches_explicit_layer_on_resnet():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    auto = camlens.explain(model, x, ["gradcam", "cam"], targets="top2")
    expl = camlens.explain(model, x, ["gradcam", "cam"], targets="top2", layer="layer4")
    for k in auto:
        torch.testing.assert_close(auto[k].raw, expl[k].raw)
    assert auto["gradcam"].layer == "input of global pooling (avgpool)"


def test_eval_mode_fast_path_and_restore():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5), nn.BatchNorm2d(3))
    model.eval()
    model[1].train()  # one module training: eval() runs, its flag comes back
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        model[2].train()  # something inside flips a flag: restored afterwards too
    assert [m.training for m in model.modules()] == [False, False, True, False]
    model.eval()
    with eval_mode(model):
        pass
    assert not any(m.training for m in model.modules())


def test_planned_backwards_free_the_graph_and_give_the_same_gradients():
    """``backwards=`` (one method: the last backward frees the graph) gives the gradients of a
    pass that keeps its graph; a request beyond the plan is a clear error, not autograd's."""
    from camlens.core.engine import ForwardPass

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 6),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    needs = frozenset({"features", "layer_grads", "input_grads", "rules"})
    spec = CaptureSpec(model[2], "2", "output")
    keep = ForwardPass.run(model, x, spec, targets="top2", needs=needs)
    plan = ForwardPass.run(model, x, spec, targets="top2", needs=needs, backwards=2)
    torch.testing.assert_close(plan.layer_grads(), keep.layer_grads())
    torch.testing.assert_close(plan.input_grads("guided"), keep.input_grads("guided"))
    torch.testing.assert_close(plan.input_grads("guided"), keep.input_grads("guided"))  # cached, no backward
    with pytest.raises(RuntimeError, match="planned 2 gradient request"):
        plan.input_grads("deconvnet")
    with pytest.raises(RuntimeError, match="second time"):  # the planned pass really freed its graph
        torch.autograd.grad(plan.scores.sum(), plan.x)
    keep.input_grads("deconvnet")  # the unplanned pass still has its graph
    # explain plans one method's requests: guided Grad-CAM (layer + guided input) equals its parts
    res = camlens.explain(model, x, ["gradcam", "guided_backprop"], targets="top2", layer="2")
    gg = camlens.explain(model, x, "guided_gradcam", targets="top2", layer="2")
    cam = F.interpolate(res["gradcam"].raw, size=x.shape[-2:], mode="bilinear", align_corners=False)
    assert torch.isfinite(gg.maps).all() and gg.raw.shape == res["guided_backprop"].raw.shape
    torch.testing.assert_close(gg.raw, res["guided_backprop"].raw * cam[:, :, None])
