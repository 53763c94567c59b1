"""Issue 19, defect 1: a method's result never depends on which other methods share the call.

With ``cut=True, need_grad=False`` (only CAM / Score-CAM / Eigen-CAM requested) the capture used to
hand the captured tensor itself to the rest of the network, so an in-place operation right after
the layer (``ReLU(inplace=True)``; torchvision's DenseNet does ``F.relu(features, inplace=True)``)
rewrote the features those methods read. The oracle: the same method computed together with any
other method (whose forward takes another capture path) — and, for Eigen-CAM, a hand reference
from the features of a hook-free forward.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import camlens

INFOS = camlens.methods()
METHODS = sorted(INFOS)
PAIRS = list(itertools.combinations(METHODS, 2))
#: keep the slow methods cheap (each option goes only to the methods that take it)
OPTIONS = {"steps": 2, "n_samples": 1, "max_channels": 3, "n_masks": 6, "cell": 4, "window": 8, "stride": 8}


def inplace_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(8, 10),
    ).eval()


class _Case:
    """One model, input and layer; results of single-method calls are cached."""

    def __init__(self, model: nn.Module, x: torch.Tensor, layer: str) -> None:
        self.model, self.x, self.layer = model, x, layer
        self._single: dict[str, object] = {}

    def run(self, method):
        names = [method] if isinstance(method, str) else method
        takes = set().union(*(INFOS[m].options() for m in names))
        opts = {k: v for k, v in OPTIONS.items() if k in takes}
        try:
            return camlens.explain(self.model, self.x, method, layer=self.layer, **opts)
        except camlens.CamlensError as e:  # e.g. CAM's head check on a pre-ReLU layer
            return e

    def single(self, m: str):
        if m not in self._single:
            self._single[m] = self.run(m)
        return self._single[m]


def _same(alone, shared, what: str) -> None:
    if isinstance(alone, Exception) or isinstance(shared, Exception):
        assert type(alone) is type(shared), f"{what}: alone -> {alone!r}, shared -> {shared!r}"
        return
    torch.testing.assert_close(shared.raw, alone.raw, msg=lambda m: f"{what} raw: {m}")
    torch.testing.assert_close(shared.maps, alone.maps, msg=lambda m: f"{what} maps: {m}")


def _check_pair(case: _Case, pair: tuple[str, str]) -> None:
    both = case.run(list(pair))
    if isinstance(both, Exception):  # the pair may fail only because one of its methods fails alone
        alone = [case.single(m) for m in pair]
        assert any(type(a) is type(both) for a in alone), f"{pair} raises {both!r}, alone: {alone!r}"
        return
    for m in pair:
        _same(case.single(m), both[m], f"{m} with {pair}")


@pytest.fixture(scope="module")
def inplace_case() -> _Case:
    return _Case(inplace_net(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), "2")


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_inplace_relu_after_layer_method_independent_of_partner(inplace_case, pair):
    _check_pair(inplace_case, pair)


def test_issue_reproduction_eigencam_and_scorecam():
    net = inplace_net()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for m in ("eigencam", "scorecam"):
        a = camlens.explain(net, x, m, layer="2").raw
        b = camlens.explain(net, x, [m, "gradcam"], layer="2")[m].raw
        torch.testing.assert_close(a, b)
    # independent reference: the features of a hook-free forward (conv output, before the ReLU)
    with torch.no_grad():
        A = net[:3](x)
    M = A[0].flatten(1).T.double()
    v = torch.linalg.svd(M, full_matrices=False).Vh[0]
    proj = (M @ v).view(16, 16)
    ref = (proj if proj.sum() >= 0 else -proj).relu()
    torch.testing.assert_close(camlens.explain(net, x, "eigencam", layer="2").raw[0, 0], ref.float())


def test_cam_on_pre_relu_layer_raises_alone_as_in_company():
    """CAM of the conv output (before the in-place ReLU that feeds the pooling) is not CAM of this
    head: it must fail its head check alone too, not silently return the CAM of ReLU(A)."""
    net = inplace_net()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(camlens.CamlensError):
        camlens.explain(net, x, "cam", layer="2")
    with pytest.raises(camlens.CamlensError):
        camlens.explain(net, x, ["cam", "gradcam"], layer="2")


def test_caller_features_untouched_and_model_output_unchanged():
    """The clone handed on changes nothing the network computes."""
    net = inplace_net()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    e = camlens.explain(net, x, "eigencam", layer="2", targets=None)
    torch.testing.assert_close(e.scores[:, 0], ref.gather(1, ref.argmax(1, keepdim=True))[:, 0])


@pytest.fixture(scope="module")
def densenet_case() -> _Case:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.densenet121(weights=None).eval()
    return _Case(model, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)), "features")


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_densenet_features_method_independent_of_partner(densenet_case, pair):
    _check_pair(densenet_case, pair)


def test_densenet_eigencam_reads_features_before_the_inplace_relu():
    """DenseNet-121 ``layer="features"``: Eigen-CAM of ``model.features(x)`` itself (hand reference),
    not of ``ReLU(features)``."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.densenet121(weights=None).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        A = model.features(x)
    got = camlens.explain(model, x, "eigencam", layer="features").raw[0, 0]
    M = A[0].flatten(1).T.double()
    v = torch.linalg.svd(M, full_matrices=False).Vh[0]
    proj = (M @ v).view(A.shape[-2:])
    ref = (proj if proj.sum() >= 0 else -proj).relu()
    torch.testing.assert_close(got, ref.float())
