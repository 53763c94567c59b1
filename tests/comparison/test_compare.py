"""camlens.compare and the metrics it adds: every number in the table is the camlens.metrics function
called directly on the same maps; each new metric definition against a hand-made case."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import InputError, OutputExistsError
from camlens.comparison import CompareConfig, compare, sobel_maps
from camlens.metrics import (
    deletion,
    earth_movers_distance,
    energy_pointing_game,
    insertion,
    mask_iou,
    max_sensitivity,
    pointing_game,
    road,
    sparseness,
    top_k_precision,
)
from camlens.metrics.loceval import evaluate_maps

SMALL = CompareConfig(
    images=3,
    steps=4,
    road_percentages=(0.5,),
    sanity_images=1,
    sanity_layers=1,
    sensitivity_images=2,
    sensitivity_samples=2,
    bootstrap=50,
    progress=False,
)


# ------------------------------------------------------------------------------------------------
# hand-made cases of the new metric definitions
# ------------------------------------------------------------------------------------------------
def test_sparseness_one_hot_constant_zero_and_pairwise_gini():
    n = 64
    one_hot = torch.zeros(1, 8, 8)
    one_hot[0, 3, 5] = -2.0  # absolute values
    assert sparseness(one_hot).item() == pytest.approx(1 - 1 / n, abs=1e-6)
    assert sparseness(torch.full((1, 8, 8), 0.7)).item() == pytest.approx(0.0, abs=1e-6)
    assert sparseness(torch.zeros(1, 8, 8)).item() == 0.0
    a = np.abs(np.random.default_rng(0).standard_normal((2, 5, 7)))
    flat = a.reshape(2, -1)
    ref = np.abs(flat[:, :, None] - flat[:, None, :]).sum((1, 2)) / (2 * flat.shape[1] * flat.sum(1))
    np.testing.assert_allclose(sparseness(torch.from_numpy(a)).numpy(), ref, rtol=1e-5)


def test_ground_truth_metrics_on_hand_made_maps():
    a = torch.zeros(1, 8, 8)
    a[0, 0, 0] = 1
    b = torch.zeros(1, 8, 8)
    b[0, 3, 4] = 1
    assert earth_movers_distance(a, b, cell=1).item() == pytest.approx(5 / np.hypot(7, 7), rel=1e-5)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 2:6, 3:11] = True
    assert earth_movers_distance(mask.float(), mask).item() == pytest.approx(0, abs=1e-7)
    assert top_k_precision(mask.float(), mask).item() == 1.0
    assert top_k_precision((~mask).float(), mask).item() == 0.0
    half = torch.zeros(1, 16, 16)
    half[0, 2:6, 3:7] = 1  # half of the mask
    assert mask_iou(half, mask).item() == pytest.approx(0.5)
    assert top_k_precision(half, mask, k=16).item() == 1.0
    with pytest.raises(InputError, match="empty true mask"):
        top_k_precision(half, torch.zeros(1, 16, 16))


def test_max_sensitivity_of_a_linear_model_gradient_is_zero_and_matches_reference():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 3)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert torch.all(max_sensitivity(lin, x, "saliency", n_samples=4) == 0)
    # input x gradient moves with x: the documented noise, max relative change, computed here
    v = max_sensitivity(lin, x, "input_x_gradient", n_samples=3, radius=0.1, seed=5)
    cls = lin(x).argmax(1)
    base = camlens.explain(lin, x, "input_x_gradient", targets=cls[:, None]).maps[:, 0].flatten(1)
    g = torch.Generator().manual_seed(5)
    noise = (torch.rand((3, *x.shape), generator=g, dtype=torch.float32) * 2 - 1) * 0.1
    ref = torch.zeros(2, dtype=torch.float64)
    for s in range(3):
        new = camlens.explain(lin, x + noise[s].double(), "input_x_gradient", targets=cls[:, None]).maps[:, 0]
        ref = torch.maximum(ref, (new.flatten(1) - base).norm(dim=1) / base.norm(dim=1))
    assert torch.all(v > 0)
    torch.testing.assert_close(v, ref.float(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    ).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gt = torch.zeros(4, 16, 16, dtype=torch.bool)
    gt[:, 3:9, 4:12] = True
    out = tmp_path_factory.mktemp("compare")
    res = compare(model, x, "gradcam,saliency,attention_rollout", seed=3, gt=gt, out=out, config=SMALL)
    return model, res, out


def _mean(res, method, metric):
    r = res.row(method, metric)
    assert r is not None, (method, metric)
    return float(r["mean"])


@pytest.mark.slow  # the shared fixture runs a whole comparison and renders its report
def test_every_table_number_is_the_metric_function_on_the_same_maps(run):
    model, res, _ = run
    x, cls, seed = res.x, res.classes, res.seed
    gt = torch.zeros(3, 16, 16, dtype=torch.bool)
    gt[:, 3:9, 4:12] = True
    for m in ("gradcam", "saliency", "random"):
        maps = res.maps[m]
        opts = {"seed": seed, "batch_size": 16}
        assert _mean(res, m, "deletion") == pytest.approx(float(deletion(model, x, maps, cls, steps=4, **opts).mean()))
        assert _mean(res, m, "insertion") == pytest.approx(
            float(insertion(model, x, maps, cls, steps=4, **opts).mean())
        )
        morf = road(model, x, maps, cls, order="morf", percentages=(0.5,), **opts)
        assert _mean(res, m, "road_morf") == pytest.approx(float(morf.mean()))
        assert _mean(res, m, "sparseness") == pytest.approx(float(sparseness(maps).mean()))
        assert _mean(res, m, "pointing_game") == pytest.approx(
            float(pointing_game(None, x, maps, gt=gt, seed=seed).mean())
        )
        assert _mean(res, m, "energy_pointing_game") == pytest.approx(
            float(energy_pointing_game(None, x, maps, gt=gt).mean())
        )
        assert _mean(res, m, "mask_iou") == pytest.approx(float(mask_iou(maps, gt).mean()))
        boxes = [np.array([[4, 3, 12, 9]])] * 3
        assert _mean(res, m, "maxboxacc_v2") == pytest.approx(evaluate_maps(maps, boxes).metrics["maxboxacc_v2"])
    sens = max_sensitivity(model, x[:2], "saliency", cls[:2], radius=0.05, n_samples=2, seed=seed, batch_size=16)
    assert _mean(res, "saliency", "max_sensitivity") == pytest.approx(float(sens.mean()))
    # the normalized gain: (m - r) / (best - r), averaged over the four faithfulness metrics
    parts = []
    for metric, best in (("deletion", 0.0), ("insertion", 1.0), ("road_morf", 0.0), ("road_lerf", 1.0)):
        mm, rr = _mean(res, "gradcam", metric), _mean(res, "random", metric)
        parts.append((mm - rr) / (best - rr))
    assert _mean(res, "gradcam", "faithfulness_gain") == pytest.approx(np.mean(parts))


@pytest.mark.slow  # the shared fixture runs a whole comparison and renders its report
def test_table_intervals_flags_and_outputs(run):
    _, res, out = run
    t = res.table
    assert list(t.columns[:5]) == ["method", "metric", "mean", "low", "high"]
    assert (t["low"] <= t["mean"] + 1e-9).all() and (t["mean"] <= t["high"] + 1e-9).all()
    assert not t.duplicated(["method", "metric"]).any()
    assert "attention_rollout" in res.flags and "does not apply" in res.flags["attention_rollout"]
    assert "attention_rollout" not in res.ranking
    pd.testing.assert_frame_equal(pd.read_parquet(out / "table.parquet"), t)
    assert len(pd.read_csv(out / "table.csv")) == len(t)
    page = res.report_path.read_text()
    assert res.report_path == out / "report.html"
    assert "id=ranking" in page and f"camlens {camlens.__version__}" in page and "Adebayo" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    assert page.count("data:image/png;base64,") >= 2 + 4 * 3
    for m in res.ranking:
        assert res.verdicts.get(m)


@pytest.mark.slow  # the shared fixture runs a whole comparison and renders its report
def test_reproducible_under_a_seed_and_never_overwrites(run, tmp_path):
    model, res, out = run
    x = res.x
    again = compare(model, x, "gradcam,saliency", seed=3, config=SMALL)
    a = res.table[
        res.table["method"].isin(["gradcam", "saliency"])
        & ~res.table["metric"].isin(
            ["ms_per_image", "peak_memory_mib", "pointing_game", "energy_pointing_game", "mask_iou", "maxboxacc_v2"]
        )
    ]
    b = again.table[~again.table["metric"].isin(["ms_per_image", "peak_memory_mib"])]
    a = a.sort_values(["method", "metric"]).reset_index(drop=True)
    b = b[b["method"].isin(["gradcam", "saliency"])].sort_values(["method", "metric"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[["method", "metric", "mean"]], b[["method", "metric", "mean"]])
    with pytest.raises(OutputExistsError):
        compare(model, x, "gradcam", seed=3, out=out, config=SMALL)


def test_sobel_baseline_is_the_edge_magnitude():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, :, 3:] = 1.0  # a vertical edge between columns 2 and 3
    s = sobel_maps(x)[0]
    assert s[2, 2].item() == pytest.approx(4.0) and s[2, 3].item() == pytest.approx(4.0)
    assert s[2, 0].item() == 0 and s[2, 4].item() == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (make browser)")
def test_report_opens_offline_in_chromium_and_is_not_blank(run, tmp_path):
    from PIL import Image

    _, res, _ = run
    shot = tmp_path / "shot.png"
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--proxy-server=127.0.0.1:9",
        "--window-size=1200,1600",
        f"--screenshot={shot}",
        res.report_path.as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.std() > 10  # text, tables and figures, not a blank page
    assert (img < 128).mean() > 0.01


def test_road_is_scored_on_the_first_road_images_and_the_rest_on_all():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    cfg = CompareConfig(**{**vars(SMALL), "road_images": 2, "sanity_images": 0, "sensitivity_images": 0})
    res = compare(model, x, "saliency", seed=1, config=cfg)
    maps, cls = res.maps["saliency"], res.classes
    assert int(res.row("saliency", "road_morf")["n"]) == 2 and int(res.row("saliency", "deletion")["n"]) == 3
    opts = {"seed": 1, "percentages": (0.5,)}
    morf = road(model, x[:2], maps[:2], cls[:2], order="morf", **opts)
    lerf = road(model, x[:2], maps[:2], cls[:2], order="lerf", **opts)
    assert _mean(res, "saliency", "road_morf") == pytest.approx(float(morf.mean()))
    assert _mean(res, "saliency", "road_lerf") == pytest.approx(float(lerf.mean()))
    delete = deletion(model, x, maps, cls, steps=4, seed=1)
    assert _mean(res, "saliency", "deletion") == pytest.approx(float(delete.mean()))


def test_the_summary_columns_stay_apart_and_a_cost_has_no_interval():
    from camlens.comparison.config import CompareResult

    rows = [
        ("lime", "faithfulness_gain", 0.335, 0.22, 0.44, 32),
        ("lime", "ms_per_image", 949.123, 949.123, 949.123, 1),
        ("lime", "randomization_similarity", -0.0291, -0.21, 0.3, 2),
    ]
    t = pd.DataFrame(rows, columns=["method", "metric", "mean", "low", "high", "n"])
    res = CompareResult(t, {}, None, ["lime"], {"lime": "v"}, {}, {}, None, None, [], None, 0, CompareConfig())
    head, _, line = res.summary().splitlines()[:3]
    assert line.split()[-1] == "949" and "[9.5e+02" not in line  # one measurement: the mean alone
    assert "0.335 [0.22, 0.44]" in line and "-0.0291 [-0.21, 0.3]" in line
    for col in ("faithfulness_gain", "randomization_similarity", "ms_per_image"):
        assert f" {col}" in head  # whole names, each with a space before it
    for cell in ("0.335 [0.22, 0.44]", "-0.0291 [-0.21, 0.3]"):
        assert f" {cell}" in line  # never run into the previous column
