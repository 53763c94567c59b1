"""``monai:`` zoo names: MONAI's DenseNet / ResNet / SE-ResNet with ``spatial_dims=3``, random or the
user's weights (channel and class counts read from the file), a card whose default layer is the
features entering the global pooling (CAM's identity holds there), a clear error without MONAI, and
``camlens explain scan.nii.gz --model monai:densenet121_3d --weights FILE``."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import camlens
from camlens.base.errors import CamlensError, WeightsNotFoundError
from camlens.cli import main as cli_main
from camlens.models.medical import monai_models, sizes_from_state

pytest.importorskip("monai")


def test_names_and_unknown_names():
    assert {"monai:densenet121_3d", "monai:resnet18_3d", "monai:seresnet50_3d"} <= set(monai_models())
    with pytest.raises(CamlensError, match="densenet121_3d"):
        camlens.load_model("monai:densenet121_3", weights="random")
    with pytest.raises(WeightsNotFoundError, match="weights='random'"):
        camlens.load_model("monai:resnet10_3d")
    with pytest.raises(CamlensError, match="unexpected option"):
        camlens.load_model("monai:resnet10_3d", weights="random", spatial_dims=2)


def test_missing_monai_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)  # import fails as if not installed
    with pytest.raises(CamlensError, match=r"pip install 'camlens\[medical\]'"):
        camlens.load_model("monai:resnet10_3d", weights="random")


def test_weights_file_round_trip_reads_channels_and_classes(tmp_path):
    net = camlens.load_model("monai:resnet10_3d", weights="random", in_channels=2, num_classes=3)
    card = net.camlens
    assert card.extra["inputs"] == "volumes (N, C, D, H, W)" and card.extra["weights"] == "random"
    assert (card.layer, card.capture) == ("avgpool", "input")
    with torch.no_grad():  # weights of its own, not the seeded random network's
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = tmp_path / "net.pth"
    torch.save(net.state_dict(), path)
    assert sizes_from_state(net.state_dict()) == (2, 3)
    back = camlens.load_model("monai:resnet10_3d", weights=path)
    assert back.camlens.extra["in_channels"] == 2 and back.camlens.extra["num_classes"] == 3
    assert "weights" not in back.camlens.extra
    for (k, a), b in zip(net.state_dict().items(), back.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    x = torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(x), net(x))


@pytest.mark.parametrize(("name", "head"), [("resnet10_3d", "fc"), ("seresnet50_3d", "last_linear")])
def test_card_layer_is_the_pooled_features_and_cam_identity_holds(name, head):
    net = camlens.load_model(f"monai:{name}", weights="random", num_classes=3)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cam = camlens.explain(net, x, "cam", targets="top2")
    assert cam.layer == f"input of {net.camlens.layer}" and cam.shape == (2, 2, 16, 16, 16)
    auto = camlens.explain(torch.nn.Sequential(net), x, "cam", targets=cam.classes)  # no card: found by itself
    assert auto.layer == f"input of global pooling (0.{net.camlens.layer})"
    torch.testing.assert_close(auto.raw, cam.raw)
    logits = net(x).detach().gather(1, cam.classes)
    bias = getattr(net, head).bias.detach()[cam.classes]
    torch.testing.assert_close(cam.raw.mean((2, 3, 4)) + bias, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_explains_a_nifti_scan_with_a_monai_densenet(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).uniform(0, 0.1, (32, 32, 32)).astype(np.float32)
    data[20:26, 4:10, 8:14] += 1.0
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    nib.Nifti1Image(data, aff).to_filename(str(tmp_path / "scan.nii.gz"))
    net = camlens.load_model("monai:densenet121_3d", weights="random", num_classes=4)
    torch.save(net.state_dict(), tmp_path / "dn.pth")
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "scan.nii.gz"), "--model", "monai:densenet121_3d"]
    args += ["--weights", str(tmp_path / "dn.pth"), "--method", "gradcam", "--topk", "2", "--out", str(out)]
    res = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    saved = nib.load(str(out / "scan_gradcam_top2.nii.gz"))
    assert saved.shape == (32, 32, 32)
    np.testing.assert_allclose(saved.affine, aff, atol=1e-6)
    summary = json.loads((out / "scan.json").read_text())
    rows = summary["methods"]["gradcam"]
    assert len(rows) == 2 and {r["class"] for r in rows} <= {0, 1, 2, 3}  # 4 classes read from the file
