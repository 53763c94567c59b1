"""CUDA-only checks (``pytest -m cuda``; skipped without a GPU): the same maps as on the CPU, the
precisions a GPU runs (bf16, fp16) within the tolerance held on the CPU, no memory left behind, and
the dataset pipeline on the device. ``python -m benchmarks.gpu`` runs them first."""

from __future__ import annotations

import warnings

import pytest
import torch

import camlens
from camlens.base.io import sample_image
from camlens.core.inputs import prepare_inputs
from tests.core.test_precision import TOLERANCE, _minmax_diff, _pearson

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def pair():
    cpu = camlens.load_model("efficientnet_lite0")
    gpu = camlens.load_model("efficientnet_lite0", device="cuda")
    x, _, _ = prepare_inputs([sample_image("chelsea"), sample_image("coffee")], cpu)
    return cpu, gpu, x


@pytest.mark.parametrize(
    "method,targets,opts",
    [
        ("gradcam", None, {}),
        ("gradcam", "top100", {}),
        ("guided_backprop", None, {}),
        ("scorecam", None, {"max_channels": 32}),
    ],
)
def test_maps_on_cuda_match_the_cpu(pair, method, targets, opts):
    cpu, gpu, x = pair
    a = camlens.explain(cpu, x, method, targets, **opts)
    b = camlens.explain(gpu, x.cuda(), method, targets, **opts)
    assert b.maps.device.type == "cuda"
    assert torch.equal(a.classes, b.classes.cpu())
    torch.testing.assert_close(b.maps.cpu(), a.maps, rtol=1e-3, atol=1e-3 * float(a.maps.abs().max()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cuda_within_the_tolerance(pair, precision):
    _, gpu, x = pair
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    for method in ("gradcam", "saliency"):
        ref = camlens.explain(gpu, x.cuda(), method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # saliency in reduced precision: warned, measured here
            low = camlens.explain(gpu, x.cuda(), method, precision=precision)
        assert low.extras["precision"] == precision
        r, q = ref.maps.cpu(), low.maps.cpu()
        if r.dim() == 5:
            r, q = r.abs().sum(2), q.abs().sum(2)
        p_min, d_max = TOLERANCE["cnn"][method]
        assert min(_pearson(r[i], q[i]) for i in range(r.shape[0])) >= p_min
        assert _minmax_diff(r, q) <= d_max


def test_no_cuda_memory_left_behind(pair):
    _, gpu, x = pair
    xc = x.cuda()
    camlens.explain(gpu, xc, "gradcam", "top5")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(20):
        camlens.explain(gpu, xc, ["gradcam", "guided_backprop"], "top5", precision="bf16")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base + 1024 * 1024
    assert all(p.grad is None for p in gpu.parameters())


def test_dataset_pipeline_on_cuda(tmp_path):
    from PIL import Image

    from camlens.pipeline.run import explain_dataset

    for i, name in enumerate(("chelsea", "coffee", "astronaut", "rocket")):
        Image.fromarray(sample_image(name)).resize((1600, 1200)).save(tmp_path / f"p{i}.jpg", quality=90)
    model = camlens.load_model("efficientnet_lite0", device="cuda")
    res = explain_dataset(model, str(tmp_path), "gradcam", out=tmp_path / "store", batch_size=2, progress=False)
    t = res.table
    assert len(t) == 4 and set(t["height"]) == {1200} and set(t["width"]) == {1600}
