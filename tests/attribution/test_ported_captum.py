"""Closed-form attribution cases in the spirit of Captum's own test suite (re-implemented here,
not copied): saliency, input x gradient and Integrated Gradients on tiny linear / ReLU / quadratic
networks whose attributions are known by hand, and a cross-check against the installed Captum
where both libraries compute the same quantity.

Where camlens deliberately differs from Captum, the test says so:

* **Trapezoid IG weights.** camlens's ``quadrature="trapezoid"`` puts ``steps`` equally spaced
  nodes on [0, 1] (both ends included, spacing ``1/(steps-1)``) with weights that sum to 1 (the
  trapezoid rule). Captum's ``"riemann_trapezoid"`` uses the same nodes but step sizes ``1/steps``
  (halved at the ends), which sum to ``(steps-1)/steps``: its attributions are scaled by that
  factor and miss completeness by ``1/steps`` of ``f(x) - f(baseline)``.
* **Saliency's sign.** Captum's ``Saliency`` returns ``|grad|`` by default; camlens's ``raw`` is the
  signed gradient (``maps`` reduce it, ``absmax`` by default). The cross-check uses ``abs=False``.
* **Guided backprop.** Captum only overrides ``nn.ReLU`` modules; camlens intercepts every ReLU
  flavour, so they agree only on nets whose ReLUs are all modules (as here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")


class Flat(nn.Module):
    """``(N, C, H, W)`` -> ``f(x.flatten(1))`` returning ``(N, K)`` scores."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x.flatten(1))


def linear_net(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return Flat(lin).eval()


@pytest.fixture
def lin():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2 * 3 * 3, generator=g)
    b = torch.randn(3, generator=g)
    return linear_net(w, b), w, b, torch.randn(2, 2, 3, 3, generator=g)


def test_saliency_of_linear_model_is_the_weight_row(lin):
    net, w, _, x = lin
    e = camlens.explain(net, x, "saliency", targets=[[0, 2], [1, 0]])
    for n, row in enumerate([[0, 2], [1, 0]]):
        for k, c in enumerate(row):
            torch.testing.assert_close(e.raw[n, k], w[c].view(2, 3, 3))
    torch.testing.assert_close(e.maps, e.raw.abs().amax(2))  # default reduction: max |grad| over channels


def test_input_x_gradient_of_linear_model(lin):
    net, w, _, x = lin
    e = camlens.explain(net, x, "input_x_gradient", targets=1)
    torch.testing.assert_close(e.raw[:, 0], x * w[1].view(2, 3, 3))


@pytest.mark.parametrize("quadrature,steps", [("gauss_legendre", 1), ("gauss_legendre", 7), ("trapezoid", 2)])
def test_integrated_gradients_of_linear_model_is_exact(lin, quadrature, steps):
    """IG of a linear score is ``(x - x') * w`` for any quadrature (the integrand is constant)."""
    net, w, _, x = lin
    base = torch.full_like(x, 0.3)
    e = camlens.explain(net, x, "integrated_gradients", targets=2, baseline=base, steps=steps, quadrature=quadrature)
    torch.testing.assert_close(e.raw[:, 0], (x - base) * w[2].view(2, 3, 3))
    assert float(e.extras["completeness_error"].abs().max()) < 1e-4


def test_integrated_gradients_of_quadratic_is_exact():
    """``f(x) = sum_i a_i x_i^2``: ``IG_i = a_i (x_i^2 - x'_i^2)``; the integrand is linear in the
    path parameter, so two Gauss-Legendre nodes (or the trapezoid rule) are exact."""
    a = torch.tensor([1.0, -2.0, 0.5, 3.0])
    net = Flat(lambda v: (a * v * v).sum(1, keepdim=True)).eval()
    x = torch.tensor([[[[1.0, 2.0], [-1.0, 0.5]]]])
    base = torch.tensor([[[[0.5, 0.0], [1.0, -0.5]]]])
    ref = (a * (x.flatten() ** 2 - base.flatten() ** 2)).view(1, 1, 2, 2)
    for quad, steps in [("gauss_legendre", 2), ("trapezoid", 3)]:
        e = camlens.explain(net, x, "integrated_gradients", targets=0, baseline=base, steps=steps, quadrature=quad)
        torch.testing.assert_close(e.raw[:, 0], ref)


def test_integrated_gradients_relu_kink_known_answer():
    """Captum's classic two-input case ``f(x1, x2) = ReLU(ReLU(x1) - 1 - ReLU(x2))`` at (3, 1), baseline 0:
    along the path the ReLU opens at t = 1/2, so ``IG = (3 * 1/2, -1 * 1/2) = (1.5, -0.5)``, summing to
    f(x) - f(0) = 1. The integrand jumps at the kink; the quadrature error shrinks like 1/steps."""

    def f(v):
        return torch.relu(torch.relu(v[:, :1]) - 1 - torch.relu(v[:, 1:2]))

    net = Flat(f).eval()
    x = torch.tensor([[[[3.0, 1.0]]]])
    e = camlens.explain(net, x, "integrated_gradients", targets=0, steps=200, quadrature="gauss_legendre")
    torch.testing.assert_close(e.raw[0, 0, 0, 0], torch.tensor([1.5, -0.5]), atol=0.02, rtol=0)
    e = camlens.explain(net, x, "integrated_gradients", targets=0, steps=201, quadrature="trapezoid")
    torch.testing.assert_close(e.raw[0, 0, 0, 0], torch.tensor([1.5, -0.5]), atol=0.02, rtol=0)


def test_saturating_model_gradient_is_zero_but_ig_is_not():
    """Captum's ``1 - ReLU(1 - x)`` (= min(x, 1)) at x = 3: the gradient is 0 (saturated) while IG from
    0 attributes the whole f(3) - f(0) = 1 (the motivating example of the IG paper)."""
    net = Flat(lambda v: 1 - torch.relu(1 - v)).eval()
    x = torch.tensor([[[[3.0]]]])
    sal = camlens.explain(net, x, "saliency", targets=0).raw
    assert float(sal.abs().max()) == 0.0
    ig = camlens.explain(net, x, "integrated_gradients", targets=0, steps=301, quadrature="trapezoid").raw
    assert abs(float(ig.sum()) - 1.0) < 0.01


def test_trapezoid_weights_sum_to_one_where_captum_does_not():
    """Deliberate difference (see the module docstring): camlens's weights sum to 1, Captum's to (n-1)/n."""
    from camlens.attribution.gradients import quadrature_rule

    for n in (2, 5, 50):
        t, w = quadrature_rule("trapezoid", n)
        assert abs(w.sum() - 1.0) < 1e-12 and t[0] == 0.0 and t[-1] == 1.0
    captum_utils = pytest.importorskip("captum.attr._utils.approximation_methods")
    step_sizes, _ = captum_utils.approximation_parameters("riemann_trapezoid")
    assert abs(sum(step_sizes(50)) - 49 / 50) < 1e-12


# ------------------------------------------------------------------ cross-checks with Captum
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


@pytest.fixture
def cnn_case():
    return SmallCNN().eval(), torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_cross_check_captum_saliency_input_x_gradient_guided(cnn_case):
    attr = pytest.importorskip("captum.attr")
    net, x = cnn_case
    t = torch.tensor([1, 3])
    got = camlens.explain(net, x, ["saliency", "input_x_gradient", "guided_backprop", "deconvnet"], targets=t)
    torch.testing.assert_close(got["saliency"].raw[:, 0], attr.Saliency(net).attribute(x, target=t, abs=False))
    torch.testing.assert_close(got["input_x_gradient"].raw[:, 0], attr.InputXGradient(net).attribute(x, target=t))
    torch.testing.assert_close(got["guided_backprop"].raw[:, 0], attr.GuidedBackprop(net).attribute(x, target=t))
    torch.testing.assert_close(got["deconvnet"].raw[:, 0], attr.Deconvolution(net).attribute(x, target=t))


def test_cross_check_captum_integrated_gradients(cnn_case):
    attr = pytest.importorskip("captum.attr")
    net, x = cnn_case
    t = torch.tensor([0, 2])
    ig = attr.IntegratedGradients(net)
    ours = camlens.explain(net, x, "integrated_gradients", targets=t, steps=16, quadrature="gauss_legendre").raw
    theirs = ig.attribute(x, target=t, n_steps=16, method="gausslegendre")
    torch.testing.assert_close(ours[:, 0], theirs, rtol=1e-4, atol=1e-6)
    # trapezoid: the same nodes, Captum's weights scaled by (n-1)/n (the deliberate difference)
    n = 9
    ours = camlens.explain(net, x, "integrated_gradients", targets=t, steps=n, quadrature="trapezoid").raw
    theirs = ig.attribute(x, target=t, n_steps=n, method="riemann_trapezoid")
    torch.testing.assert_close(ours[:, 0] * (n - 1) / n, theirs, rtol=1e-4, atol=1e-6)


def test_cross_check_captum_guided_gradcam_with_bilinear_upsampling(cnn_case):
    """camlens upsamples the Grad-CAM factor of guided Grad-CAM bilinearly (smooth, as in the
    paper's figures); Captum's ``GuidedGradCam`` defaults to nearest. With ``interpolate_mode=
    "bilinear"`` the two agree; with Captum's default they do not."""
    attr = pytest.importorskip("captum.attr")
    net, x = cnn_case
    t = torch.tensor([1, 2])
    ours = camlens.explain(net, x, "guided_gradcam", targets=t, layer="relu1").raw[:, 0]
    ggc = attr.GuidedGradCam(net, net.relu1)
    torch.testing.assert_close(ours, ggc.attribute(x, target=t, interpolate_mode="bilinear"), rtol=1e-4, atol=1e-6)
    # at relu1 the map already has the input resolution; a coarser layer shows the difference
    net2 = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(6, 4)
    ).eval()
    ours = camlens.explain(net2, x, "guided_gradcam", targets=t, layer="1").raw[:, 0]
    ggc = attr.GuidedGradCam(net2, net2[1])
    torch.testing.assert_close(ours, ggc.attribute(x, target=t, interpolate_mode="bilinear"), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours, ggc.attribute(x, target=t), rtol=1e-3, atol=1e-6)
