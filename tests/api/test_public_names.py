"""One name per meaning across the public API (issue 23): ``inputs`` for the images of a call,
``gt`` for ground truth, ``explain_options`` for what is passed on to :func:`camlens.explain`, one
default batch of explained images; the 0.2 spellings still work with a DeprecationWarning."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import camlens
from camlens.base.defaults import EXPLAIN_BATCH
from camlens.base.errors import InputError
from camlens.metrics.loceval import GTImage, evaluate_model
from camlens.metrics.runner import evaluate
from tests.conftest import TinyCNN


def _imgs(n=2):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) for _ in range(n)]


def _net():
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_metrics_evaluate_takes_inputs_and_the_old_images_keyword_with_a_warning():
    net, imgs = _net(), _imgs()
    kw = dict(methods=["gradcam"], metrics=["deletion"], steps=4, progress=False)
    new = evaluate(net, inputs=imgs, **kw)
    with pytest.warns(DeprecationWarning, match="inputs="):
        old = evaluate(net, images=imgs, **kw)
    assert new.rows == old.rows and len(new.rows) == 4  # 2 images x (gradcam, the random baseline)
    with pytest.raises(InputError, match="inputs= only"):
        evaluate(net, imgs, images=imgs, **kw)
    with pytest.raises(InputError, match="needs the images"):
        evaluate(net, **kw)


def test_evaluate_model_takes_gt_and_the_old_ground_truth_keyword_with_a_warning(tmp_path):
    from PIL import Image

    paths = []
    for i, a in enumerate(_imgs()):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    gt = [GTImage(p, [("1", np.array([2.0, 3.0, 15.0, 12.0]))]) for p in paths]
    net = _net()
    new = evaluate_model(net, gt=gt, method="gradcam")
    with pytest.warns(DeprecationWarning, match="gt="):
        old = evaluate_model(net, ground_truth=gt, method="gradcam")
    assert new.metrics == old.metrics


def test_explain_dataset_takes_explain_options_and_the_old_method_options_with_a_warning(tmp_path):
    net, imgs = _net(), _imgs(3)
    kw = dict(progress=False, batch_size=2, num_workers=0)
    new = camlens.explain_dataset(net, imgs, "scorecam", tmp_path / "a", explain_options={"batch_size": 1}, **kw)
    with pytest.warns(DeprecationWarning, match="explain_options="):
        old = camlens.explain_dataset(net, imgs, "scorecam", tmp_path / "b", method_options={"batch_size": 1}, **kw)
    assert np.array_equal(new.map(0), old.map(0)) and np.array_equal(new.map(2), old.map(2))
    # a list of images in memory is a dataset of them: the maps are explain()'s
    ref = camlens.explain(net, imgs, "scorecam", batch_size=1, progress=False)
    for i in range(3):
        np.testing.assert_allclose(new.map(i), ref.maps[i, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_one_default_batch_of_explained_images():
    from camlens.cli import main
    from camlens.comparison.config import CompareConfig
    from camlens.pipeline.run import DatasetConfig, StreamOptions

    assert DatasetConfig().batch_size == StreamOptions().batch_size == CompareConfig().batch_size == EXPLAIN_BATCH
    assert inspect.signature(evaluate_model).parameters["batch_size"].default == EXPLAIN_BATCH
    for cmd in ("explain", "localize"):
        command = main.get_command(None, cmd)
        opt = next(p for p in command.params if p.name == "batch_size")
        assert opt.default == EXPLAIN_BATCH, cmd


def test_the_metrics_take_the_request_a_caller_holds():
    """``explain_options`` may be the ExplainRequest itself: its layer and method options are used,
    the metric supplies the method and the targets; the maps equal the keyword spelling's."""
    from camlens.metrics._common import explain_maps

    net = _net().double()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    classes = torch.tensor([0, 2, 1])
    req = camlens.ExplainRequest(methods=("cam",), layer="act1", options={"relu": False})
    a = explain_maps(net, x, "gradcam", classes, 2, req)
    b = explain_maps(net, x, "gradcam", classes, 2, {"layer": "act1", "relu": False})
    ref = camlens.explain(net, x, "gradcam", targets=classes.tolist(), layer="act1", relu=False).maps[:, 0]
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    torch.testing.assert_close(a, ref.float())
    assert (a < 0).any()  # relu=False reached the method (the default clamps at 0)
    del_req = camlens.metrics.deletion(net, x, "gradcam", classes, steps=4, explain_options=req)
    del_kw = camlens.metrics.deletion(
        net, x, "gradcam", classes, steps=4, explain_options={"layer": "act1", "relu": False}
    )
    torch.testing.assert_close(del_req, del_kw)
    san_req = camlens.metrics.sanity_randomization(net, x, "gradcam", classes, explain_options=req)
    kw = {"layer": "act1", "relu": False}
    san_kw = camlens.metrics.sanity_randomization(net, x, "gradcam", classes, explain_options=kw)
    assert san_req.steps == san_kw.steps and len(san_req.steps) > 1
    for name in ("spearman", "ssim"):
        torch.testing.assert_close(san_req.values[name]["gradcam"], san_kw.values[name]["gradcam"], rtol=0, atol=0)
