"""Mixed precision: ``explain(..., precision="bf16")`` runs the forwards under autocast, computes the
maps in float32, says so in ``extras``, leaves no trace, and stays within the tolerance measured by
``benchmarks/precision.py`` per model family (CNN: EfficientNet-Lite0, ResNet-18; ViT: a tiny ViT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import camlens
from camlens.base.errors import InputError
from camlens.base.io import sample_image
from camlens.core.inputs import prepare_inputs
from tests.api.test_hygiene import assert_untouched, snapshot

#: the tolerances held here (worst case over the bundled photos measured by benchmarks/precision.py
#: on CPU bf16, with margin): Pearson of each map with its fp32 map, largest |difference| of the
#: min-max normalised maps. Layer maps stay close; input gradients through a bf16 network do not
#: (saliency on Lite0: r = 0.63 measured), which is why explain() warns for pixel methods.
TOLERANCE = {
    "cnn": {"gradcam": (0.99, 0.15), "saliency": (0.5, 0.9)},
    "vit": {"gradcam": (0.99, 0.1)},
}


class GapNet(nn.Module):
    """conv -> ReLU -> global average pooling -> linear: Grad-CAM = ReLU(CAM) / (h w) exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def _minmax_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    def mm(t):
        f = t.flatten(-2)
        lo, hi = f.amin(-1, keepdim=True), f.amax(-1, keepdim=True)
        return (f - lo) / (hi - lo).clamp_min(1e-12)

    return float((mm(a) - mm(b)).abs().max())


def test_unknown_precision_names_the_choices():
    with pytest.raises(InputError, match="'fp32', 'bf16', 'fp16'"):
        camlens.explain(GapNet(), torch.rand(1, 3, 8, 8), "gradcam", precision="half")


def test_fp16_on_cpu_is_refused_with_the_fix():
    with pytest.raises(InputError, match="precision='bf16'"):
        camlens.explain(GapNet(), torch.rand(1, 3, 8, 8), "gradcam", precision="fp16")


def test_bf16_forward_runs_under_autocast_and_maps_are_float32():
    model = GapNet().eval()
    seen = []
    h = model.conv.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    x = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    try:
        exp = camlens.explain(model, x, ["gradcam", "cam"], targets="top2", precision="bf16")
    finally:
        h.remove()
    assert seen == [torch.bfloat16]  # the convolution ran in bf16
    g, c = exp["gradcam"], exp["cam"]
    assert g.extras["precision"] == "bf16" and g.raw.dtype == torch.float32 and g.maps.dtype == torch.float32
    # the closed form on the same features: Grad-CAM = ReLU(CAM) / (h w), up to the bf16 rounding of
    # the head's weights in the backward (8 mantissa bits: 2^-8 relative)
    torch.testing.assert_close(g.raw, c.raw.clamp_min(0) / 100, rtol=0, atol=2**-7 * float(g.raw.abs().max()))
    ref = camlens.explain(model, x, "gradcam", targets="top2")
    assert "precision" not in ref.extras
    assert (g.raw - ref.raw).abs().max() <= 0.02 * ref.raw.abs().max()  # bf16: ~3 significant digits


def test_pixel_methods_in_reduced_precision_warn():
    with pytest.warns(UserWarning, match="saliency at precision='bf16'"):
        camlens.explain(GapNet(), torch.rand(1, 3, 8, 8), ["gradcam", "saliency"], precision="bf16")


def test_bf16_leaves_no_trace_also_when_the_forward_raises():
    model = GapNet().train()
    before = snapshot(model)
    x = torch.rand(1, 3, 8, 8)
    with pytest.warns(UserWarning):  # saliency in bf16
        camlens.explain(model, x, ["gradcam", "saliency", "scorecam"], precision="bf16")
    assert_untouched(model, before)
    assert not torch.is_autocast_enabled("cpu")

    class Boom(GapNet):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("boom")

    bad = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        camlens.explain(bad, x, "gradcam", precision="bf16")
    assert not torch.is_autocast_enabled("cpu")  # the autocast entered for the failed forward is left
    assert not bad._forward_hooks and not bad._forward_pre_hooks


def _family_case(model: nn.Module, x: torch.Tensor, method: str, family: str) -> None:
    ref = camlens.explain(model, x, method)
    low = camlens.explain(model, x, method, precision="bf16")
    r, q = ref.maps, low.maps
    if r.dim() == 5:
        r, q = r.abs().sum(2), q.abs().sum(2)
    p_min, d_max = TOLERANCE[family][method]
    for i in range(r.shape[0]):
        assert _pearson(r[i], q[i]) >= p_min, (method, i)
    assert _minmax_diff(r, q) <= d_max
    assert torch.equal(ref.classes, low.classes)  # the same top-1 classes


@pytest.mark.slow
def test_cnn_tolerance_lite0(lite0):
    x, _, _ = prepare_inputs([sample_image("chelsea"), sample_image("coffee")], lite0)
    _family_case(lite0, x, "gradcam", "cnn")
    with pytest.warns(UserWarning, match="precision='fp32' for pixel methods"):
        _family_case(lite0, x, "saliency", "cnn")


@pytest.mark.slow
def test_cnn_tolerance_resnet18():
    model = camlens.load_model("resnet18", weights="random")
    x, _, _ = prepare_inputs([sample_image("astronaut"), sample_image("rocket")], model)
    _family_case(model, x, "gradcam", "cnn")


@pytest.mark.slow
def test_vit_tolerance_tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000).eval()
    x, _, _ = prepare_inputs([sample_image("chelsea"), sample_image("coffee")], model)
    _family_case(model, x, "gradcam", "vit")


@pytest.mark.slow
def test_cli_precision_and_exact_decode_reach_the_outputs(tmp_path):
    from PIL import Image

    from camlens.cli import main

    p = tmp_path / "cat.jpg"
    Image.fromarray(sample_image("chelsea")).resize((900, 600)).save(p, quality=90)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "explain",
            str(p),
            "--method",
            "gradcam",
            "--topk",
            "1",
            "--format",
            "json,png",
            "--precision",
            "bf16",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(next(out.glob("*.json")).read_text())
    assert summary["extras"]["precision"] == "bf16"
    assert summary["image_size"] == [600, 900]  # decoded at 1/2 scale, reported in the photo's pixels
    assert Image.open(next(out.glob("*.png"))).size[0] < 900  # the overlay drawn on the decoded image
    exact = tmp_path / "exact"
    args = ["explain", str(p), "--method", "gradcam", "--topk", "1", "--format", "png", "--exact-decode", "-q"]
    r = CliRunner().invoke(main, [*args, "--out", str(exact)])
    assert r.exit_code == 0, r.output
    assert Image.open(next(exact.glob("*.png"))).size[0] >= 900  # decoded in full
    r = CliRunner().invoke(main, ["explain", "--precision", "half", str(p)])
    assert r.exit_code != 0 and "fp32" in r.output


def test_dataset_run_records_precision_in_its_signature(tmp_path):
    from PIL import Image

    from camlens.pipeline.run import explain_dataset

    for i in range(2):
        Image.fromarray(sample_image("coffee")).save(tmp_path / f"c{i}.png")
    model = GapNet()
    res = explain_dataset(model, str(tmp_path), "gradcam", out=tmp_path / "store", precision="bf16", progress=False)
    assert len(res.table) == 2
    assert res.run["signature"]["options"]["precision"] == "'bf16'"
