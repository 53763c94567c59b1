"""explain() leaves no trace on the user's model, also when something raises."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import camlens
from tests.conftest import TinyCNN

ALL_LAYER_METHODS = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam"]


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for m in model.modules()
        ],
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"])
    assert after["hooks"] == before["hooks"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    assert torch.is_grad_enabled()


class BNNet(TinyCNN):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.bn(self.conv1(x)))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def bnnet():
    torch.manual_seed(0)
    m = BNNet()
    m.train()  # a model in training mode, with a mix: one submodule in eval
    m.conv2.eval()
    m.conv1.weight.requires_grad_(False)  # a partly frozen model
    return m


def test_model_state_restored_after_every_method(bnnet):
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(bnnet)
    res = camlens.explain(bnnet, x, method=ALL_LAYER_METHODS, targets="top2")
    assert len(res) == len(ALL_LAYER_METHODS)
    assert_untouched(bnnet, before)  # BatchNorm running stats untouched (eval during the call)


def test_restored_when_the_forward_raises(bnnet):
    before = snapshot(bnnet)

    def boom(module, args, out):
        raise RuntimeError("boom")

    h = bnnet.fc.register_forward_hook(boom)
    before["hooks"] = snapshot(bnnet)["hooks"]
    try:
        with pytest.raises(RuntimeError, match="boom"):
            camlens.explain(bnnet, torch.randn(1, 3, 16, 16), method="gradcam")
        with pytest.raises(RuntimeError, match="boom"):
            camlens.explain(bnnet, torch.randn(1, 3, 16, 16), method="gradcam", layer="conv2")
    finally:
        h.remove()
    before["hooks"] = snapshot(bnnet)["hooks"]
    assert_untouched(bnnet, {**before, "hooks": snapshot(bnnet)["hooks"]})
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in bnnet.modules())


def test_restored_when_a_method_raises(bnnet):
    before = snapshot(bnnet)
    with pytest.raises(camlens.base.errors.TargetError):
        camlens.explain(bnnet, torch.randn(1, 3, 16, 16), method="gradcam", targets=99)
    with pytest.raises(camlens.base.errors.MethodError):
        camlens.explain(bnnet, torch.randn(1, 3, 16, 16), method="cam", targets=lambda z: z[:, 0])
    assert_untouched(bnnet, before)


def test_grad_flows_only_to_the_captured_layer(tiny, tiny_x):
    """Grad-CAM: no parameter gets a gradient computed, and the layers below the capture run
    without recording an autograd graph."""
    fired = []
    hs = [p.register_hook(lambda g, n=n: fired.append(n)) for n, p in tiny.named_parameters()]
    recorded = {}

    def record(name):
        def hook(module, args, out) -> None:
            recorded[name] = out.requires_grad

        return hook

    hs.append(tiny.conv1.register_forward_hook(record("conv1")))
    hs.append(tiny.fc.register_forward_hook(record("fc")))
    try:
        camlens.explain(tiny, tiny_x, method=["gradcam", "gradcam++"], targets="top2", layer="conv2")
    finally:
        for h in hs:
            h.remove()
    assert fired == []
    assert recorded == {"conv1": False, "fc": True}


def test_works_under_no_grad_and_inference_mode(tiny, tiny_x):
    ref = camlens.explain(tiny, tiny_x, method="gradcam", layer="conv2").raw
    with torch.no_grad():
        a = camlens.explain(tiny, tiny_x, method="gradcam", layer="conv2").raw
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        x_inf = tiny_x.clone()
        b = camlens.explain(tiny, x_inf, method="gradcam", layer="conv2").raw
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)


def test_two_calls_in_a_row_and_two_models_interleaved(tiny, tiny_x):
    torch.manual_seed(5)
    other = TinyCNN().double().eval()
    a1 = camlens.explain(tiny, tiny_x, method="gradcam").raw
    b1 = camlens.explain(other, tiny_x, method="gradcam").raw
    a2 = camlens.explain(tiny, tiny_x, method="gradcam").raw
    b2 = camlens.explain(other, tiny_x, method="gradcam").raw
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(b1, b2)
    assert not torch.allclose(a1, b1)


def test_two_models_in_two_threads(tiny, tiny_x):
    torch.manual_seed(5)
    other = TinyCNN().double().eval()
    expected = {id(m): camlens.explain(m, tiny_x, method=["gradcam", "cam"])["gradcam"].raw for m in (tiny, other)}
    errors, got = [], {}

    def run(m):
        try:
            for _ in range(20):
                got[id(m)] = camlens.explain(m, tiny_x, method=["gradcam", "cam"])["gradcam"].raw
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in (tiny, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v)


def test_reused_module_call_selection():
    """One ReLU module called twice: the last call by default, or the one chosen with call=."""

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = self.act(self.c2(self.act(self.c1(x))))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    m = Reuse().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    last = camlens.explain(m, x, method="gradcam", layer="act")
    auto = camlens.explain(m, x, method="gradcam")  # functional mean((2,3)) is the global pooling
    torch.testing.assert_close(last.raw, auto.raw)
    first = camlens.explain(m, x, method="gradcam", layer="act", call=0, targets=last.classes)
    also_first = camlens.explain(m, x, method="gradcam", layer="act", call=-2, targets=last.classes)
    torch.testing.assert_close(first.raw, also_first.raw)
    # reference for the first call by plain autograd
    xr = x.clone()
    a1 = m.act(m.c1(xr)).requires_grad_(True)
    logits = m.fc(m.act(m.c2(a1)).mean((2, 3)))
    g = torch.autograd.grad(logits.gather(1, last.classes).sum(), a1)[0]
    ref = (g.mean((2, 3))[:, :, None, None] * a1).sum(1).relu()
    torch.testing.assert_close(first.raw[:, 0], ref.detach())
    assert "call 0" in first.layer


def test_image_inputs_under_inference_mode(lite0, cat):
    with torch.inference_mode():
        e = camlens.explain(lite0, cat, method="gradcam")
    assert e.maps.shape == (1, 1, 224, 224) and e.maps.max() > 0
