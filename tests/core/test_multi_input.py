"""Models with several inputs (``forward_args=`` / ``forward_kwargs=``) and regression outputs.

Oracle: a model ``f(image, meta)`` explained with ``forward_args=(meta,)`` at batch 3 gives, for
every image ``i``, exactly the maps of the single-input model ``g_i(x) = f(x, meta_i)`` (``meta_i``
closed over, repeated for whatever batch the method forwards) explained on image ``i`` alone —
for every registered method that applies to a CNN, so Score-CAM's and RISE's masked batches,
SmoothGrad's noisy copies and Integrated Gradients' path (the image interpolated, ``meta`` held)
all have to hand each copy its own image's ``meta``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens.attribution.traits import methods_for
from camlens.base.errors import InputError, MethodError
from camlens.core.extra import ExtraInputs

CHEAP: dict[str, object] = {"n_masks": 24, "n_samples": 4, "steps": 5, "window": 4, "stride": 4, "batch_size": 5}


class WithMeta(nn.Module):
    """A CNN whose metadata enters twice: it scales the first features (FiLM) and adds to the logits."""

    def __init__(self, meta_dim: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.film = nn.Linear(meta_dim, 6)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.meta_head = nn.Linear(meta_dim, classes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, classes)  # the last linear layer: CAM's head

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x)) * (1 + self.film(meta))[:, :, None, None]
        h = torch.relu(self.conv2(h))
        return self.fc(self.pool(h).flatten(1)) + self.meta_head(meta)


class Closed(nn.Module):
    """``f(x, meta)`` with one image's ``meta`` closed over (repeated over the batch it is given)."""

    def __init__(self, f: WithMeta, meta: torch.Tensor) -> None:
        super().__init__()
        self.f = f
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x, self.meta.expand(len(x), -1))


class MetaFirst(nn.Module):
    """The same network taking ``(meta, image)``: the image is positional argument 1."""

    def __init__(self, f: WithMeta) -> None:
        super().__init__()
        self.f = f

    def forward(self, meta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.f(x, meta)


def _model() -> WithMeta:
    torch.manual_seed(0)
    return WithMeta().double().eval()


def _data(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 16, 16, dtype=torch.float64, generator=g)
    meta = torch.randn(n, 2, dtype=torch.float64, generator=g) * 2
    return x, meta


def _options(name: str) -> dict[str, object]:
    opts = camlens.methods()[name].options()
    # CAM's head check compares mean(A)·W + b with the logits, which meta_head shifts
    return {k: v for k, v in CHEAP.items() if k in opts} | ({"check_head": False} if "check_head" in opts else {})


CNN_METHODS = sorted(methods_for(WithMeta()))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", CNN_METHODS)
def test_extra_input_maps_equal_closed_over_model_per_image(name):
    f = _model()
    x, meta = _data()
    meta_before = meta.clone()
    targets = [[0, 1], [1, 2], [3, 0]]
    f.conv1.train()  # a mixed train/eval model: both flags come back as they were
    exp = camlens.explain(f, x, name, targets=targets, forward_args=(meta,), **_options(name))
    assert torch.equal(meta, meta_before)
    assert _hooks(f) == 0
    assert f.conv1.training and not f.conv2.training and not f.training
    assert all(p.grad is None for p in f.parameters())
    f.conv1.eval()
    for i in range(len(x)):
        g = Closed(f, meta[i : i + 1]).eval()
        alone = camlens.explain(g, x[i : i + 1], name, targets=[targets[i]], **_options(name))
        torch.testing.assert_close(exp.maps[i], alone.maps[0], rtol=1e-7, atol=1e-9, msg=f"{name}: image {i}")


def test_the_oracle_can_fail_other_rows_meta_gives_other_maps():
    f = _model()
    x, meta = _data()
    exp = camlens.explain(f, x, "smoothgrad", targets=0, forward_args=(meta,), **_options("smoothgrad"))
    wrong = camlens.explain(Closed(f, meta[1:2]), x[:1], "smoothgrad", targets=0, **_options("smoothgrad"))
    assert not torch.allclose(exp.maps[0], wrong.maps[0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_forward_kwargs_and_input_index_give_the_same_maps(method):
    f = _model()
    x, meta = _data()
    by_arg = camlens.explain(f, x, method, targets="top2", forward_args=(meta,))
    by_kw = camlens.explain(f, x, method, targets="top2", forward_kwargs={"meta": meta})
    first = MetaFirst(f).eval()
    by_index = camlens.explain(first, x, method, targets="top2", forward_args=(meta,), input_index=1)
    torch.testing.assert_close(by_kw.maps, by_arg.maps)
    torch.testing.assert_close(by_index.maps, by_arg.maps)
    torch.testing.assert_close(by_arg.classes, by_kw.classes)


def test_input_key_passes_the_image_by_keyword():
    f = _model()
    x, meta = _data()
    ref = camlens.explain(f, x, "gradcam", targets=1, forward_args=(meta,))
    got = camlens.explain(f, x, "gradcam", targets=1, forward_kwargs={"meta": meta}, input_key="x")
    torch.testing.assert_close(got.maps, ref.maps)


def test_constant_extra_input_is_passed_unchanged():
    f = _model()
    x, meta = _data()
    one = meta[:1]
    ref = camlens.explain(f, x, "rise", targets=0, forward_args=(one.expand(3, -1).clone(),), n_masks=16)
    got = camlens.explain(f, x, "rise", targets=0, forward_args=(camlens.Constant(one),), n_masks=16)
    torch.testing.assert_close(got.maps, ref.maps)


def test_extra_input_batch_mismatch_is_a_clear_error():
    f = _model()
    x, meta = _data()
    with pytest.raises(InputError, match=r"forward_args\[0\] has 2 row\(s\).*3 image\(s\).*Constant"):
        camlens.explain(f, x, "gradcam", forward_args=(meta[:2],))
    with pytest.raises(InputError, match=r"forward_kwargs\['meta'\] has 1 row"):
        camlens.explain(f, x, "gradcam", forward_kwargs={"meta": meta[:1]})
    assert _hooks(f) == 0


def test_hook_removed_and_model_untouched_when_the_model_raises():
    f = _model()
    x, _ = _data()
    bad = torch.randn(3, 7, dtype=torch.float64)  # wrong feature size for film: the model raises
    with pytest.raises(RuntimeError):
        camlens.explain(f, x, "gradcam", forward_args=(bad,))
    assert _hooks(f) == 0
    assert all(p.grad is None for p in f.parameters())


def test_undeclared_batch_of_copies_is_refused_not_guessed():
    f = _model()
    x, meta = _data()
    extra = ExtraInputs((meta,), n=3)
    with extra.attached(f), pytest.raises(MethodError, match="without saying which"):
        f(x[:2])  # two images: which two of the three? never guessed
    with extra.attached(f):
        torch.testing.assert_close(f(x), f.forward(x, meta))  # the explained batch itself
    f(x, meta)  # detached: the model runs as it always did
    assert _hooks(f) == 0


class Regressor(nn.Module):
    def __init__(self, keepdim: bool) -> None:
        super().__init__()
        self.net = WithMeta(classes=1)
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        y = self.net(x, meta)
        return y if self.keepdim else y[:, 0]


@pytest.mark.parametrize("keepdim", [False, True])
def test_regression_output_is_explained_with_no_target(keepdim):
    torch.manual_seed(1)
    r = Regressor(keepdim).double().eval()
    x, meta = _data()
    exp = camlens.explain(r, x, "gradcam", forward_args=(meta,))
    assert exp.maps.shape == (3, 1, 16, 16)
    torch.testing.assert_close(exp.scores[:, 0], r(x, meta).reshape(-1).detach())
    assert torch.isnan(exp.probs).all()  # a softmax over one output would say 1.0: no probability
    # Grad-CAM's weights by hand: d y / d A averaged over space
    feats = {}
    h = r.net.pool.register_forward_hook(lambda m, i, o: feats.update(A=i[0]))
    try:
        y = r(x, meta).reshape(-1)
    finally:
        h.remove()
    A = feats["A"]
    (G,) = torch.autograd.grad(y.sum(), A)
    ref = torch.relu((G.mean((2, 3), keepdim=True) * A).sum(1)).detach()
    torch.testing.assert_close(exp.raw[:, 0], ref)
