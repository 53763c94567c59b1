"""Models a user can only run: a scoring function written in NumPy gives the same maps as the
equivalent nn.Module (black-box methods only, ``max_batch`` respected), and a TorchScript module
gives the eager model's saliency / IG / SmoothGrad / RISE maps; methods that need hooks are refused
with an error naming those that work."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import InputError, MethodError

#: a convolution, a ReLU, global average pooling and a linear head, as NumPy arrays
rng = np.random.default_rng(0)
WC = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
BC = rng.normal(size=4).astype(np.float32)
WL = rng.normal(size=(3, 4)).astype(np.float32)
BL = rng.normal(size=3).astype(np.float32)


def numpy_scores(a: np.ndarray) -> np.ndarray:
    """The network written in NumPy: 3x3 convolution (zero padding 1), ReLU, mean, linear."""
    n, _, h, w = a.shape
    p = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, 4, h, w), np.float32)
    for dy in range(3):
        for dx in range(3):
            conv += np.einsum("ncij,oc->noij", p[:, :, dy : dy + h, dx : dx + w], WC[:, :, dy, dx])
    feat = np.maximum(conv + BC[None, :, None, None], 0).mean((2, 3))
    return feat @ WL.T + BL


def torch_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 3)
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(WC))
        net[0].bias.copy_(torch.from_numpy(BC))
        net[4].weight.copy_(torch.from_numpy(WL))
        net[4].bias.copy_(torch.from_numpy(BL))
    return net.eval()


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_numpy_scoring_function_gives_the_modules_rise_map_within_max_batch():
    net = torch_net()
    np.testing.assert_allclose(numpy_scores(X.numpy()), net(X).detach().numpy(), rtol=1e-4, atol=1e-5)
    sizes: list[int] = []

    def fn(a: np.ndarray) -> np.ndarray:
        assert isinstance(a, np.ndarray) and a.dtype == np.float32
        sizes.append(len(a))
        return numpy_scores(a)

    kw = dict(targets="top2", n_masks=40, cell=4, batch_size=8, progress=False)
    ref = camlens.explain(net, X, "rise", **kw)
    got = camlens.explain(fn, X, "rise", max_batch=3, **kw)
    torch.testing.assert_close(got.maps, ref.maps, rtol=1e-4, atol=1e-6)
    assert torch.equal(got.classes, ref.classes)
    assert max(sizes) == 3 and sum(sizes) == 2 + 2 * 40  # the clean pass, then every masked copy
    occ = camlens.explain(fn, X, "occlusion", targets=[[1], [2]], window=8, stride=8, progress=False)
    torch.testing.assert_close(
        occ.maps,
        camlens.explain(net, X, "occlusion", targets=[[1], [2]], window=8, stride=8, progress=False).maps,
        rtol=1e-4,
        atol=1e-5,
    )
    one_d = camlens.explain(lambda a: numpy_scores(a)[:, 0], X, "rise", n_masks=8, cell=4, weighting="logit")
    assert one_d.maps.shape == (2, 1, 16, 16)


def test_scoring_function_refuses_gradient_methods_and_bad_outputs():
    with pytest.raises(MethodError, match=r"gradcam.*scoring function.*kernelshap, lime, occlusion, rise"):
        camlens.explain(numpy_scores, X, "gradcam")
    with pytest.raises(MethodError, match="saliency"):
        camlens.explain(numpy_scores, X, ["rise", "saliency"])
    with pytest.raises(InputError, match=r"returned shape \(3, 3\) for a batch of 2"):
        camlens.explain(lambda a: numpy_scores(np.concatenate([a, a[:1]])), X, "rise", n_masks=4)
    with pytest.raises(InputError, match="not \\(N, K\\) numbers"):
        camlens.explain(lambda a: {"scores": 1}, X, "rise", n_masks=4)
    with pytest.raises(InputError, match="max_batch"):
        camlens.explain(numpy_scores, X, "rise", max_batch=0)


def _scripted(net: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still shipped
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(net), buf)
        buf.seek(0)
        return torch.jit.load(buf)  # an archive, as a user receives it


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("saliency", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"steps": 8}),
        ("smoothgrad", {"n_samples": 4}),
        ("rise", {"n_masks": 16, "cell": 4, "progress": False}),
        ("kernelshap", {"n_samples": 20, "segments": np.arange(16)[None].repeat(16, 0) // 4, "progress": False}),
    ],
)
def test_torchscript_archive_equals_the_eager_model(method, opts):
    net = torch_net()
    scripted = _scripted(net)
    ref = camlens.explain(net, X, method, targets="top2", **opts)
    got = camlens.explain(scripted, X, method, targets="top2", **opts)
    assert float(ref.maps.abs().max()) > 1e-3
    torch.testing.assert_close(got.maps, ref.maps, rtol=1e-5, atol=1e-6)
    assert not any(p.grad is not None for p in scripted.parameters())


@pytest.mark.parametrize(
    ("method", "opts"), [("gradcam", {}), ("guided_backprop", {}), ("smoothgrad", {"base": "deconvnet"})]
)
def test_torchscript_refuses_methods_that_need_hooks(method, opts):
    scripted = _scripted(torch_net())
    with pytest.raises(MethodError, match=r"TorchScript.*saliency.*eager nn.Module"):
        camlens.explain(scripted, X, method, **opts)
