"""LRP through Zennit (``lrp``, ``lrp_layer``): the epsilon rule's closed form on a hand-built
network, relevance conservation on bias-free VGG16 / ResNet-18 / DenseNet / EfficientNet-Lite0,
equality with Zennit used directly, and nothing left on the model."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.attribution.lrp import MergeBatchNorms, merge_pairs
from camlens.base.errors import MethodError, NotApplicableError
from tests.api.test_hygiene import assert_untouched, snapshot
from tests.conftest import TinyCNN

zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import COMPOSITES  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402

GEN = functools.partial(torch.Generator().manual_seed)


def _x(n: int, size: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=GEN(seed))


def _bn_stats_from_batch(model: nn.Module, x: torch.Tensor, *, bias_free: bool) -> nn.Module:
    """BatchNorm statistics of a batch (activations of order one at every depth); with ``bias_free``
    the shifts are set so that every merged batch norm has a zero bias and the head has none, so
    that LRP conserves the logit exactly."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of this batch
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    if bias_free:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.bias.copy_(m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps))
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
    return model


def _resnet18(bias_free: bool = True, eps: float = 1e-5) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=6).double()
    m = _bn_stats_from_batch(m, _x(8, 32, seed=11), bias_free=bias_free)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps = eps
    return m


# ------------------------------------------------------------------------------- closed form
class TwoLayer(nn.Module):
    """flatten -> linear -> ReLU -> linear, with biases."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc1 = nn.Linear(12, 5)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) = +1 (Zennit's convention)."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def test_epsilon_rule_equals_the_closed_form_on_two_layers():
    net = TwoLayer().double().eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=GEN(1))
    eps = 0.25  # large, so that the epsilon rule differs clearly from gradient x input
    exp = camlens.explain(net, x, "lrp", targets=[[0, 2], [1, 0]], composite="epsilon_plus", epsilon=eps)
    W1, b1, W2, b2 = net.fc1.weight, net.fc1.bias, net.fc2.weight, net.fc2.bias
    with torch.no_grad():
        a0 = x.flatten(1)
        z1 = a0 @ W1.T + b1
        a1 = z1.clamp_min(0)
        z2 = a1 @ W2.T + b2
        for n, ks in enumerate([[0, 2], [1, 0]]):
            for j, k in enumerate(ks):
                # R_k = z_k at the output; R_i = a_i w_ki R_k / (z_k + eps sign z_k); same one layer down
                r1 = a1[n] * W2[k] * z2[n, k] / _stab(z2[n, k], eps)
                r0 = a0[n] * (W1.T @ (r1 / _stab(z1[n], eps)))
                torch.testing.assert_close(exp.raw[n, j].flatten(), r0, rtol=1e-12, atol=1e-14)
    gxi = camlens.explain(net, x, "input_x_gradient", targets=[[0, 2], [1, 0]]).raw
    assert not torch.allclose(gxi, exp.raw, rtol=1e-3)  # the epsilon made a difference
    assert exp.extras["signed"] and exp.extras["composite"] == "epsilon_plus"
    torch.testing.assert_close(exp.maps, exp.raw.sum(2).float())


# ------------------------------------------------------------------------------- conservation
def _conserved(exp: camlens.Explanation, rtol: float) -> None:
    assert (exp.scores.abs() > 0.1).all(), f"degenerate logits {exp.scores}"  # an oracle that cannot vanish
    torch.testing.assert_close(exp.extras["relevance_sum"], exp.scores, rtol=rtol, atol=0)


@pytest.mark.parametrize(
    "composite", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat", "epsilon_gamma_box"]
)
def test_relevance_is_conserved_on_a_bias_free_resnet18(composite):
    model = _resnet18(bias_free=True)
    exp = camlens.explain(model, _x(2, 32), "lrp", targets="top2", composite=composite)
    assert exp.extras["canonizer"] == "resnet"
    _conserved(exp, rtol=1e-5)


def test_without_the_block_canonizer_resnet_relevance_is_not_conserved():
    """The oracle can fail: without the Sum modules a residual addition copies the relevance to both branches."""
    model = _resnet18(bias_free=True)
    exp = camlens.explain(model, _x(2, 32), "lrp", targets="top2", canonizer="merge_batchnorm")
    assert ((exp.extras["conservation"] - 1).abs() > 0.05).all()


@pytest.mark.slow
def test_relevance_is_conserved_on_vgg16():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg16(num_classes=5).eval()  # torchvision initialises every bias to zero
    x = _x(1, 32).float() * 100  # zero biases: the logits scale with the input
    exp = camlens.explain(model, x, "lrp", targets="top2", composite="epsilon_gamma_box")
    assert exp.extras["canonizer"] == "vgg"
    _conserved(exp, rtol=1e-3)


def test_relevance_is_conserved_on_a_small_densenet():
    from torchvision.models import DenseNet

    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=4).double()
    model = _bn_stats_from_batch(model, _x(8, 32, seed=2), bias_free=True)
    exp = camlens.explain(model, _x(2, 32), "lrp", targets="top2")
    assert exp.extras["canonizer"] == "densenet"
    _conserved(exp, rtol=1e-5)
    # its functional global pooling spreads relevance evenly over dead positions: lost at the ReLU
    plain = camlens.explain(model, _x(2, 32), "lrp", targets="top2", canonizer="merge_batchnorm")
    assert ((plain.extras["conservation"] - 1).abs() > 0.01).any()


def _lite0_bias_free() -> tuple[nn.Module, torch.Tensor]:
    from skimage import data

    model = camlens.load_model("efficientnet_lite0").double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps))
        model._fc.bias.zero_()
    img = torch.as_tensor(data.chelsea()).permute(2, 0, 1)[None].double() / 255
    img = F.interpolate(img, size=(64, 96), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    return model, (img - mean) / std


@pytest.mark.slow
def test_relevance_is_conserved_on_efficientnet_lite0_with_its_canonizer():
    """Pretrained Lite0 with its batch-norm shifts and head bias zeroed: the canonizer (exact merge and
    a Sum module at each skip addition) conserves the logit; without the Sum modules it does not."""
    model, x = _lite0_bias_free()
    exp = camlens.explain(model, x, "lrp", targets="top2")
    assert exp.extras["canonizer"] == "efficientnet_lite"
    # measured 0.24 %: the stabilizers where a skip sum or a linear-bottleneck output nearly cancels
    _conserved(exp, rtol=1e-2)
    plain = camlens.explain(model, x, "lrp", targets="top2", canonizer="merge_batchnorm")
    assert ((plain.extras["conservation"] - 1).abs() > 0.05).all()


def test_lite0_merge_is_exact_where_zennits_is_not():
    """Lite0's batch norms (eps = 1e-3) sit after convolutions that own a padding module: every one is
    paired, and the merged model computes the same logits."""
    model = camlens.load_model("efficientnet_lite0").double()
    pairs = merge_pairs(model)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 49
    x = _x(1, 64)
    with torch.no_grad():
        before = model(x)
        handles = MergeBatchNorms().apply(model)
        merged = model(x)
        for h in handles:
            h.remove()
        after = model(x)
    torch.testing.assert_close(merged, before, rtol=1e-10, atol=1e-10)
    assert torch.equal(after, before)


# ------------------------------------------------------------------------------- against Zennit
@pytest.mark.parametrize(
    "composite", ["epsilon_plus_flat", pytest.param("epsilon_alpha2_beta1", marks=pytest.mark.slow)]
)
def test_equals_zennit_used_directly_on_resnet18(composite):
    # eps = 0: Zennit's merge leaves a factor 1/sqrt(1 + eps) per batch norm, camlens's is exact
    model = _resnet18(bias_free=False, eps=0.0)
    x = _x(2, 32)
    targets = [[1, 4], [0, 3]]
    exp = camlens.explain(model, x, "lrp", targets=targets, composite=composite)
    comp = COMPOSITES[composite](canonizers=[ResNetCanonizer()])
    with Gradient(model, comp) as attributor:
        for j in range(2):
            onehot = F.one_hot(torch.tensor([t[j] for t in targets]), 6).double()
            _, rel = attributor(x, lambda out, oh=onehot: oh * out)
            torch.testing.assert_close(exp.raw[:, j], rel, rtol=1e-9, atol=1e-12)


def test_layer_relevance_equals_zennit_at_layer4():
    model = _resnet18(bias_free=False, eps=0.0)
    x = _x(2, 32)
    exp = camlens.explain(model, x, "lrp_layer", layer="layer4", targets=[[2], [5]])
    comp = COMPOSITES["epsilon_plus"](canonizers=[ResNetCanonizer()])
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["a"] = out

    h = model.layer4.register_forward_hook(keep)
    try:
        with comp.context(model):
            xg = x.clone().requires_grad_(True)
            out = model(xg)
            onehot = F.one_hot(torch.tensor([2, 5]), 6).double()
            out.backward(onehot * out)
    finally:
        h.remove()
    torch.testing.assert_close(exp.raw[:, 0], seen["a"].grad.sum(1), rtol=1e-9, atol=1e-12)
    assert exp.layer == "output of layer4" and exp.extras["signed"]


# ------------------------------------------------------------------------------- hygiene, errors
def test_nothing_left_on_the_model_even_when_the_call_raises():
    model = _resnet18(bias_free=False)
    block = model.layer1[0]
    before = snapshot(model)
    x = _x(2, 32)
    with torch.no_grad():
        out_before = model(x)
    camlens.explain(model, x, ["lrp", "lrp_layer"], targets="top2")
    assert_untouched(model, before)
    assert "forward" not in block.__dict__ and not hasattr(block, "canonizer_sum")
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))

    calls = []

    def target(logits):  # the shared pass calls it, then lrp's own forward: raise there
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return logits[:, 0]

    with pytest.raises(RuntimeError, match="boom"):
        camlens.explain(model, x, "lrp", targets=target)
    assert_untouched(model, before)
    assert "forward" not in block.__dict__ and not hasattr(block, "canonizer_sum")
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


def test_bad_options_and_models_are_refused():
    model = _resnet18()
    with pytest.raises(MethodError, match="composite must be one of"):
        camlens.explain(model, _x(1, 32), "lrp", composite="epsilon")
    with pytest.raises(MethodError, match="canonizer must be one of"):
        camlens.explain(model, _x(1, 32), "lrp", canonizer="yes")
    from tests.core.test_layout import tiny_swin, tiny_tv_vit

    with pytest.raises(NotApplicableError, match="attnlrp"):
        camlens.explain(tiny_tv_vit(), _x(1, 32), "lrp")
    with pytest.raises(NotApplicableError, match="LayerNorm"):
        camlens.explain(tiny_swin(), _x(1, 32), "lrp")


def test_a_canonizer_that_changes_the_model_is_refused():
    """A batch norm declared after a layer that does not feed it: merging would change the logits."""

    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)
            self.bn = nn.BatchNorm2d(3)  # normalizes the input, not the conv's output
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.pool(self.conv(self.bn(x))).flatten(1))

    torch.manual_seed(0)
    net = Swapped().double().eval()
    net.bn.running_mean.fill_(0.5)
    with pytest.raises(MethodError, match="canonizer='none'"):
        camlens.explain(net, _x(1, 8), "lrp")
    camlens.explain(net, _x(1, 8), "lrp", canonizer="none")


def test_cost_estimate_counts_the_forward_lrp_runs():
    from camlens.base.progress import reporting
    from tests.attribution.test_method_cost import Counter, Recorder

    torch.manual_seed(0)
    net = TinyCNN().eval()
    x = torch.randn(2, 3, 12, 12)
    count = Counter(net)
    camlens.explain(net, x, "lrp", targets="top2")
    ran = count.close() - len(x)
    rec = Recorder()
    with reporting(rec):
        camlens.explain(net, x, "lrp", targets="top2")
    (est,) = rec.estimates
    assert est.forwards == ran == 2
