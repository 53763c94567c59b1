"""camlens.compare on real models: the randomization flag on EfficientNet-Lite0 (Adebayo et al. 2018),
the tetromino benchmark with a CNN trained here, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from camlens.base.errors import InputError, OutputExistsError
from camlens.cli import main
from camlens.comparison import CompareConfig, compare
from camlens.data import tetromino, tetromino_arrays

CHEAP = dict(steps=2, road_percentages=(0.5,), sensitivity_images=0, bootstrap=20, progress=False)


@pytest.mark.slow
def test_randomization_flag_fires_for_guided_backprop_not_gradcam_on_lite0(lite0, cat):
    from camlens.core.inputs import prepare_inputs

    x, _, _ = prepare_inputs([cat], lite0)
    cfg = CompareConfig(images=1, sanity_images=1, sanity_layers=3, **CHEAP)
    res = compare(lite0, x, "gradcam,guided_backprop", config=cfg)
    sim = {m: float(res.row(m, "randomization_similarity")["mean"]) for m in ("gradcam", "guided_backprop")}
    assert "guided_backprop" in res.flags and "insensitive" in res.flags["guided_backprop"], sim
    assert "gradcam" not in res.flags, sim
    assert res.ranking == ["gradcam", "guided_backprop"]  # flagged methods rank last
    assert "do not use for this model" in res.verdicts["guided_backprop"]


def test_tetromino_dataset_files_masks_and_errors(tmp_path):
    ds = tetromino(tmp_path / "t", 3, scenario="xor", background="correlated", seed=4)
    assert len(ds) == 6 and ds.masks.shape == (6, 64, 64) and ds.masks.sum((1, 2)).tolist() == [512] * 6
    assert all(p.is_file() for p in ds.paths) and (tmp_path / "t" / "masks.npy").is_file()
    assert ds.classes == ["opposite_sign", "same_sign"]
    np.testing.assert_array_equal(np.load(tmp_path / "t" / "masks.npy"), ds.masks)
    a, b = tetromino_arrays(6, "xor", "correlated", seed=4), tetromino_arrays(6, "xor", "correlated", seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    # xor: class 1 iff the two tetrominoes have opposite signs
    for img, lab, m in zip(a.images, a.labels, a.masks, strict=True):
        t_sign = np.sign(img[8:16, 8:32].mean())  # the T's top bar
        l_sign = np.sign(img[32:56, 40:48].mean())  # the L's stem
        assert (t_sign != l_sign) == bool(lab)
        assert m[8:16, 8:32].all() and m[32:56, 40:48].all()
    lin = tetromino_arrays(4, "linear", seed=0)
    assert lin.masks[0, 8:16, 8:32].all() and not lin.masks[0, 40:, 40:].any()  # class 0: the T, top-left
    with pytest.raises(OutputExistsError):
        tetromino(tmp_path / "t", 3, scenario="xor")
    with pytest.raises(InputError, match="scenario"):
        tetromino_arrays(2, "diagonal")


def _train_tiny_cnn(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 2),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        for i in range(0, len(x), 32):
            loss = nn.functional.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.mark.slow
def test_tetromino_linear_input_x_gradient_beats_random_and_sobel_is_reported():
    train = tetromino_arrays(64, "linear", seed=1)
    x = torch.from_numpy(train.images)[:, None]
    y = torch.from_numpy(train.labels)
    net = _train_tiny_cnn(x, y)
    test = tetromino_arrays(8, "linear", seed=2)
    xt = torch.from_numpy(test.images)[:, None]
    assert (net(xt).argmax(1).numpy() == test.labels).mean() >= 0.9
    cfg = CompareConfig(images=8, truth=True, sanity_images=1, sanity_layers=1, **CHEAP)
    res = compare(net, xt, "input_x_gradient", gt=test.masks, config=cfg)
    prec = {m: float(res.row(m, "top_k_precision")["mean"]) for m in ("input_x_gradient", "random", "sobel")}
    assert prec["input_x_gradient"] > prec["random"] + 0.2, prec
    assert res.row("sobel", "emd") is not None and res.row("input_x_gradient", "emd") is not None
    assert "sobel" in res.summary() and "random" in res.summary()


def test_cli_compare_parses_then_calls_compare_with_the_tetromino_masks(tmp_path, monkeypatch):
    import camlens.comparison as comparison

    seen = {}

    class Fake:
        elapsed_s = 1.0
        reused = ""

        def summary(self):
            return "1  gradcam  (summary)"

    def fake(model, data, methods, seed, *, out, config, targets=None):
        seen.update(model=model, data=data, methods=methods, seed=seed, out=out, config=config)
        return Fake()

    monkeypatch.setattr(comparison, "compare", fake)
    ds = tetromino(tmp_path / "data", 2, seed=0)
    out = tmp_path / "out"
    args = [
        "compare",
        str(ds.root),
        "--methods",
        "gradcam,saliency",
        "--images",
        "3",
        "--steps",
        "5",
        "--truth",
        "--quiet",
        "--seed",
        "7",
        "--layer",
        "_conv_head",
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "(summary)" in r.output and "report.html" in r.output
    assert seen["methods"] == "gradcam,saliency" and seen["seed"] == 7 and seen["out"] == str(out)
    cfg = seen["config"]
    assert (cfg.images, cfg.steps, cfg.truth, cfg.progress) == (3, 5, True, False)
    assert cfg.method_options("gradcam") == {"layer": "_conv_head"}
    assert [str(p) for p in seen["data"].paths] == [str(p) for p in ds.paths]
    np.testing.assert_array_equal(seen["data"].masks, ds.masks)
    r2 = CliRunner().invoke(main, ["compare", str(tmp_path / "out"), "--truth", "--out", str(out)])
    assert r2.exit_code != 0


def test_cli_compare_gt_takes_the_images_and_boxes_of_a_boxes_file(tmp_path, monkeypatch):
    """`camlens compare --gt BOXES`: the same boxes files as `localize --gt`; DATA and --gt exclude
    each other."""
    import camlens.comparison as comparison
    from camlens.data import synthetic
    from camlens.metrics.loceval import read_boxes

    seen = {}

    class Fake:
        elapsed_s = 1.0
        reused = ""

        def summary(self):
            return "(summary)"

    def fake(model, data, methods, seed, *, out, config, targets=None):
        seen["data"] = data
        return Fake()

    monkeypatch.setattr(comparison, "compare", fake)
    ds = synthetic(tmp_path / "val", 2, image_size=32, seed=1)
    out = str(tmp_path / "out")
    base = ["compare", "--model", "resnet18", "--weights", "random", "--quiet", "--out", out]
    r = CliRunner().invoke(main, [*base, "--gt", str(ds.csv)])
    assert r.exit_code == 0, r.output
    want = read_boxes(ds.csv)
    assert [str(p) for p in seen["data"].paths] == [str(g.path) for g in want]
    for got, g in zip(seen["data"].boxes, want, strict=True):
        np.testing.assert_array_equal(got, g.boxes())
    both = CliRunner().invoke(main, [*base, "--gt", str(ds.csv), str(ds.root)])
    assert both.exit_code == 2 and "not both" in both.output
    neither = CliRunner().invoke(main, base)
    assert neither.exit_code == 2
