"""ONNX files as models (``camlens.load_model("model.onnx")``): the gradient and layer methods run on
the onnx2torch conversion with the layer named by its ONNX node and equal the original nn.Module's
maps; the black-box methods run on ONNX Runtime and equal the PyTorch model's under the same seed;
an operator onnx2torch cannot convert is named, with the black-box methods still offered."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import camlens
from camlens.base.errors import CamlensError, LayerNotFoundError, MethodError
from camlens.models.card import card_of
from camlens.models.onnxmodel import OnnxModel, OnnxModelError
from camlens.models.preprocess import Preprocess

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")

SIZE = 64
#: cheap settings for the methods that sample, integrate or forward many copies
CHEAP = {"steps": 4, "n_samples": 4, "batch_size": 32, "max_channels": 24, "n_masks": 48, "cell": 8}
CHEAP_BLACKBOX = {"rise": {"n_masks": 16, "cell": 8, "seed": 3}, "occlusion": {"window": 16, "stride": 16}}


def export(model: nn.Module, path: Path, *, batch: int | None = None, fold: bool = True) -> Path:
    """``model`` written as ONNX (opset 17) by PyTorch's TorchScript exporter (the dynamo exporter
    needs onnxscript); a dynamic batch dimension unless ``batch`` fixes it; ``fold=False`` keeps the
    batch norms as nodes instead of folding them into the convolutions (another float32 rounding)."""
    x = torch.randn(batch or 2, 3, SIZE, SIZE)
    axes = None if batch else {"input": {0: "n"}, "logits": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and constant-folding notes
        torch.onnx.export(
            model.eval(), x, str(path), dynamo=False, input_names=["input"], output_names=["logits"],
            dynamic_axes=axes, opset_version=17, do_constant_folding=fold,
        )  # fmt: skip
    return path


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _methods(kind: str) -> list[str]:
    return [
        n
        for n, i in camlens.methods().items()
        if i.kind == kind
        and not i.blackbox
        and "attention" not in str(i.needs)
        and i.applies_to.text != "detectors"
        and "transformers" not in i.applies_to.text  # legrad, attnlrp: ViTs only
        and n not in ("lrp", "lrp_layer")  # refused on ONNX: rules follow the module structure (test below)
    ]


def _options(names: list[str]) -> dict[str, object]:
    opts = {k for n in names for k in camlens.methods()[n].options()}
    return {k: v for k, v in CHEAP.items() if k in opts}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> tuple[nn.Module, OnnxModel]:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    return net, camlens.load_model(export(net, tmp_path_factory.mktemp("onnx") / "resnet18.onnx"))


@pytest.fixture(scope="module")
def lite0_onnx(tmp_path_factory, lite0) -> tuple[nn.Module, OnnxModel]:
    # its batch norms kept: folded, they round differently in float32 and flip a ReLU6 gate or two on
    # the real weights (saliency then differs by ~1e-2 at a few pixels, from the exporter, not camlens)
    return lite0, camlens.load_model(export(lite0, tmp_path_factory.mktemp("onnx") / "lite0.onnx", fold=False))


X = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

#: (fixture, the nn.Module's layer and capture, the same layer as the ONNX graph names its node)
CASES = [
    ("resnet", "layer4", "output", "/layer4/layer4.1/relu_1/Relu"),
    ("lite0_onnx", "_avg_pooling", "input", "/_avg_pooling/GlobalAveragePool"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("fixture", "layer", "capture", "node"), CASES)
@pytest.mark.parametrize("kind", ["layer", "pixel"])
def test_every_layer_and_pixel_method_equals_the_modules(request, fixture, layer, capture, node, kind):
    net, om = request.getfixturevalue(fixture)
    names = _methods(kind)
    opts = {"targets": "top2" if fixture == "resnet" else None, **_options(names)}
    ref = camlens.explain(net, X, names, layer=layer, capture=capture, **opts)
    got = camlens.explain(om, X, names, layer=node, capture=capture, **opts)
    for name in names:
        assert float(ref[name].maps.abs().max()) > 1e-6, name  # a real map, not zeros
        assert _rel(got[name].maps, ref[name].maps) < 1e-4, name
        assert got[name].extras["onnx"]["path"] == "onnx2torch"
        if kind == "layer":
            assert node in got[name].layer, got[name].layer  # said with the ONNX node's name
    assert not any(p.grad is not None for p in om.parameters())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in om.modules())
    assert hooks == 0


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["resnet", "lite0_onnx"])
@pytest.mark.parametrize("method", ["rise", "occlusion"])
def test_blackbox_methods_run_on_onnx_runtime_and_equal_pytorch(request, fixture, method):
    net, om = request.getfixturevalue(fixture)
    calls = om.calls
    kw = {"targets": "top2", "progress": False, **CHEAP_BLACKBOX[method]}
    ref = camlens.explain(net, X.repeat(2, 1, 1, 1), method, **kw)
    got = camlens.explain(om, X.repeat(2, 1, 1, 1), method, **kw)
    assert om.calls > calls  # the masked batches went to the InferenceSession
    assert got.extras["onnx"] == {
        "file": str(om.path),
        "path": "onnxruntime",
        "providers": ["CPUExecutionProvider"],
        "max_batch": None,
    }
    assert float(ref.maps.abs().max()) > 1e-6
    assert _rel(got.maps, ref.maps) < 1e-4


def test_one_call_runs_each_method_its_own_way_and_names_layers_by_node(resnet):
    net, om = resnet
    out = camlens.explain(
        om, X, ["rise", "gradcam"], layer="/layer4/layer4.1/relu_1/Relu", n_masks=16, cell=8, progress=False
    )
    assert out["rise"].extras["onnx"]["path"] == "onnxruntime"
    assert out["gradcam"].extras["onnx"]["path"] == "onnx2torch"
    assert out["gradcam"].layer == "output of /layer4/layer4.1/relu_1/Relu"
    ref = camlens.explain(net, X, "gradcam", layer="layer4")
    assert _rel(out["gradcam"].maps, ref.maps) < 1e-4
    # an output tensor's name is the node's layer too; a misspelt node names the closest ones
    by_tensor = camlens.explain(om, X, "gradcam", layer="/layer4/layer4.1/relu_1/Relu_output_0")
    torch.testing.assert_close(by_tensor.maps, out["gradcam"].maps)
    with pytest.raises(LayerNotFoundError, match=r"no node or tensor named '/layer4/layer4.1/relu_1/Relx'.*"
                       r"/layer4/layer4.1/relu_1/Relu"):  # fmt: skip
        camlens.explain(om, X, "gradcam", layer="/layer4/layer4.1/relu_1/Relx")
    auto = camlens.explain(om, X, "gradcam")  # no layer: what enters the global pooling, as for the module
    assert _rel(auto.maps, ref.maps) < 1e-4


# ---------------------------------------------------------------------------------- a graph that does not convert
W = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
L = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)


def shrink_graph(path: Path, batch: int | str = "n", act: str = "Shrink") -> Path:
    """Conv 3x3 -> Shrink (soft shrinkage, an operator onnx2torch has no converter for; or ``act``
    another activation) -> global average pooling -> linear, written by hand with onnx.helper."""
    h = onnx.helper
    opts = {"lambd": 0.5, "bias": 0.5} if act == "Shrink" else {}
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node(act, ["c"], ["s"], name=act.lower(), **opts),
        h.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
        h.make_node("Flatten", ["p"], ["f"], name="flatten"),
        h.make_node("Gemm", ["f", "l"], ["y"], name="head", transB=1),
    ]
    graph = h.make_graph(
        nodes,
        "shrink",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 16, 16])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 3])],
        [onnx.numpy_helper.from_array(W, "w"), onnx.numpy_helper.from_array(L, "l")],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def shrink_module(act: nn.Module | None = None) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), act or nn.Softshrink(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3, bias=False),
    )  # fmt: skip
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(W))
        net[4].weight.copy_(torch.from_numpy(L))
    return net.eval()


X16 = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("batch", ["n", 1])
def test_unconvertible_operator_is_named_and_blackbox_methods_still_run(tmp_path, batch):
    om = camlens.load_model(shrink_graph(tmp_path / "shrink.onnx", batch))
    assert om.converted is None and "Shrink" in om.conversion_error
    with pytest.raises(MethodError, match=r"gradcam.*shrink.onnx.*cannot convert operator Shrink.*'shrink'.*"
                       r"kernelshap, lime, occlusion, rise"):  # fmt: skip
        camlens.explain(om, X16, ["rise", "gradcam"])
    kw = {"targets": "top2", "n_masks": 24, "cell": 4, "progress": False}
    got = camlens.explain(om, X16, "rise", **kw)
    ref = camlens.explain(shrink_module(), X16, "rise", **kw)
    assert float(ref.maps.abs().max()) > 1e-6
    assert _rel(got.maps, ref.maps) < 1e-4
    # a graph exported for one image at a time gets one image per session call; else the call's max_batch
    assert got.extras["onnx"]["max_batch"] == (1 if batch == 1 else None)
    calls = om.calls
    capped = camlens.explain(om, X16, "rise", max_batch=5, **kw)
    assert capped.extras["onnx"]["max_batch"] == 1 if batch == 1 else 5
    torch.testing.assert_close(capped.maps, got.maps)
    assert om.max_batch == (1 if batch == 1 else None)  # the caller's model keeps its setting:
    assert om.calls == calls + (75 if batch == 1 else 0)  # the call's cap ran on a copy


def test_hand_built_graph_converts_and_its_node_is_the_layer(tmp_path):
    om = camlens.load_model(shrink_graph(tmp_path / "relu.onnx", act="Relu"))
    net = shrink_module(nn.ReLU())
    for method in ("gradcam", "guided_backprop"):
        got = camlens.explain(str(om.path), X16, method, targets="top2", layer="relu")  # a path is loaded
        ref = camlens.explain(net, X16, method, targets="top2", layer="1")
        assert float(ref.maps.abs().max()) > 1e-3
        assert _rel(got.maps, ref.maps) < 1e-5, method
    assert got.extras["onnx"]["path"] == "onnx2torch"
    assert camlens.explain(om, X16, "gradcam", layer="relu").layer == "output of relu"
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in om.modules()) == 0


def test_sidecar_card_gives_preprocessing_names_and_default_layer(tmp_path, resnet):
    net, _ = resnet
    path = export(net, tmp_path / "r18.onnx")
    names = [f"class {i}" for i in range(10)]
    card = {"name": "tiny-r18", "preprocess": {"size": [SIZE, SIZE], "mean": [0.5] * 3, "std": [0.25] * 3},
            "class_names": names, "layer": "/layer3/layer3.1/relu_1/Relu"}  # fmt: skip
    (tmp_path / "r18.onnx.json").write_text(json.dumps(card))
    om = camlens.load_model(path)
    photo = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    exp = camlens.explain(om, photo, "gradcam")
    pp = Preprocess(size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.25,) * 3)
    ref = camlens.explain(net, photo, "gradcam", layer="layer3", preprocess=pp, class_names=names)
    assert exp.layer == "output of /layer3/layer3.1/relu_1/Relu" and exp.model_name == "tiny-r18"
    assert exp.labels() == ref.labels() and exp.labels()[0][0].startswith("class ")
    assert _rel(exp.maps, ref.maps) < 1e-4
    # arguments win over the card
    other = camlens.load_model(path, class_names=[str(i) for i in range(10)], preprocess="imagenet", card={})
    assert card_of(other).class_names[0] == "0"
    (tmp_path / "r18.onnx.json").write_text(json.dumps({"labels": []}))
    with pytest.raises(OnnxModelError, match=r"r18.onnx.json: unknown key\(s\) labels"):
        camlens.load_model(path)


def test_clear_errors(tmp_path, monkeypatch, resnet):
    with pytest.raises(CamlensError, match="no such ONNX file"):
        camlens.load_model(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(OnnxModelError, match="junk.onnx: not an ONNX model"):
        camlens.load_model(tmp_path / "junk.onnx")
    path = shrink_graph(tmp_path / "s.onnx")
    with pytest.raises(CamlensError, match="carries its own weights"):
        camlens.load_model(path, weights="random")
    with pytest.raises(OnnxModelError, match=r"takes 16x16 images.*resizes to 224x224; set its size to \[16, 16\]"):
        camlens.load_model(path, preprocess=Preprocess())
    assert card_of(camlens.load_model(path, preprocess="imagenet")).preprocess.size == (16, 16)  # a preset: its norm
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra is not installed
    with pytest.raises(CamlensError, match=r"pip install 'camlens\[onnx\]'"):
        camlens.load_model(path)


@pytest.mark.slow
def test_cli_explains_an_onnx_file(tmp_path, resnet):
    from click.testing import CliRunner

    from camlens.cli import main

    path = export(resnet[0], tmp_path / "r18.onnx")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["explain", "--model", str(path), str(photo), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert any(p.suffix == ".png" for p in out.iterdir())
    r = CliRunner().invoke(main, ["layers", str(path)])  # the layers by ONNX node name, the default found
    assert r.exit_code == 0 and "/layer4/layer4.1/relu_1/Relu" in r.output, r.output
    assert "default layer: input of global pooling" in r.output
    r = CliRunner().invoke(main, ["methods", "--model", str(path)])
    assert r.exit_code == 0 and "kernelshap" in r.output and "gradcam" in r.output, r.output
    r = CliRunner().invoke(main, ["explain", "--model", str(path), str(photo), "--method", "rise", "--out",
                                  str(tmp_path / "rise"), "--option", "n_masks=16"])  # fmt: skip
    assert r.exit_code == 0, r.output


class _SizeOf(nn.Module):
    """The input's pixel count as a one-element int64 tensor: what a converted graph's Shape node gives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([x.shape[-2] * x.shape[-1]], device=x.device)


class _ShapeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.size, self.conv, self.relu, self.head = (
            _SizeOf(),
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Linear(4, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.size(x)  # runs once, before the layer, and its first axis (1) looks like a batch of 1
        return self.head(self.relu(self.conv(x)).sum((2, 3)) / n.sum().to(x.dtype))  # used whole, as a shape


@pytest.mark.parametrize("method", ["ablationcam", "reciprocam"])
def test_layers_above_the_target_never_replay_a_shape_computation(method):
    """Ablation-/Recipro-CAM run only the layers above the target by replaying the outputs of those
    below; an integer output (a shape) is not features and is recomputed, never repeated per row."""
    torch.manual_seed(0)
    net, x = _ShapeNet().eval(), torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    fast = camlens.explain(net, x, method, layer="relu", targets="top2", batch_size=4)
    whole = camlens.explain(net, x, method, layer="relu", targets="top2", batch_size=4, skip_below=False)
    assert fast.extras["head"].startswith("layers above the target only")
    assert float(whole.maps.abs().max()) > 1e-4
    torch.testing.assert_close(fast.maps, whole.maps, rtol=1e-5, atol=1e-6)


def test_lrp_is_refused_on_an_onnx_graph_naming_why(tmp_path):
    """LRP's rules follow the network's modules; an onnx2torch rebuild has other modules, so its
    relevance would differ from the original network's (by 250x on ResNet-18): refused, not wrong."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "r.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 64, 64), str(path), dynamo=False, opset_version=17)
    model = camlens.load_model(str(path))
    with pytest.raises(camlens.CamlensError, match="original nn.Module"):
        camlens.explain(model, torch.randn(1, 3, 64, 64), "lrp")
