"""Honest figures (issue 12 items 8-11): signed maps diverge around zero, titles claim only true ranks,
show() displays in notebooks and scripts, tensor inputs are shown de-normalized."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

import camlens
from camlens import viz
from camlens.attribution.registry import ModelTraits, applicable
from camlens.viz import render_map

#: every method that applies to a CNN classifier (attention methods and AttnLRP need a transformer, D-RISE a detector)
ALL_METHODS = sorted(applicable(ModelTraits()))


def _panels(fig):
    return [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]


def _colorbars(fig):
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


# ------------------------------------------------------------------------------------------ item 8
def test_signed_rendering_is_centred_at_zero():
    img = np.full((4, 4, 3), 100, np.uint8)
    m = np.zeros((4, 4))
    m[0, 0], m[3, 3] = 2.0, -1.0
    out, sc = render_map(img, m, alpha=0.5)
    assert (sc.kind, sc.lo, sc.hi, sc.cmap) == ("diverging", -2.0, 2.0, "RdBu_r")
    assert (out[1, 1] == 100).all()  # zero leaves the photo untouched
    assert out[0, 0, 0] > out[0, 0, 2]  # positive: red
    assert out[3, 3, 2] > out[3, 3, 0]  # negative: blue
    # all negative (CAM of an absent class): blue everywhere, never the min-max "all red"
    neg, sc = render_map(img, -np.ones((4, 4)) - np.eye(4))
    assert (neg[..., 2] > neg[..., 0]).all() and (sc.kind, sc.lo, sc.hi) == ("negative", -2.0, 0.0)
    red_jet = viz.overlay(img, -np.ones((4, 4)) - np.eye(4))
    assert (red_jet[..., 0] > red_jet[..., 2]).any()  # what min-max jet did instead


def test_unsigned_pixel_rendering_leaves_near_zero_pixels_untinted():
    img = np.full((8, 8, 3), 90, np.uint8)
    m = np.zeros((8, 8))
    m[2, 2] = 5.0
    out, _ = render_map(img, m, pixel=True)
    assert (out[6, 6] == 90).all()  # no blue tint where the attribution is zero
    flat, _ = render_map(img, m, pixel=False)  # the layer rendering blends jet everywhere
    assert flat[6, 6, 2] > 90


@pytest.mark.parametrize(
    ("method", "signed"),
    [
        ("cam", True),
        ("gradcam", False),
        ("integrated_gradients", True),
        ("input_x_gradient", True),
        ("saliency", False),
        ("scorecam", False),
        ("guided_backprop", False),
    ],
)
def test_signed_is_decided_by_the_method(tiny, tiny_x, method, signed):
    exp = camlens.explain(tiny, tiny_x, method=method, **({"steps": 8} if method == "integrated_gradients" else {}))
    assert exp.signed is signed
    assert exp.extras.get("signed", False) is signed


def test_signed_follows_options(tiny, tiny_x):
    assert camlens.explain(tiny, tiny_x, method="gradcam", relu=False).signed
    assert not camlens.explain(tiny, tiny_x, method="input_x_gradient", reduce="abssum").signed


def test_show_and_saved_png_are_one_rendering(lite0, cat, tmp_path):
    exp = camlens.explain(lite0, cat, method="saliency")
    fig = exp.figure()
    panel = _panels(fig)[1]
    shown = panel.images[0].get_array()
    want, _ = render_map(cat, exp.maps[0, 0], pixel=True)
    np.testing.assert_array_equal(np.asarray(shown), want)
    (png,) = exp.save(tmp_path, formats="png")
    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    band = arr.shape[0] - cat.shape[0]
    np.testing.assert_allclose(arr[band + 5 : -5, 5:-5].astype(float), want[5:-5, 5:-5].astype(float), atol=40)
    assert np.abs(arr[band:].astype(float) - want).mean() < 3  # the same image (up to PNG resampling)


def test_colorbar_symmetric_for_signed_maps(tiny, tiny_x):
    fig = camlens.explain(tiny, tiny_x[:1], method="cam", targets=[[0, 1]]).figure()
    cbs = _colorbars(fig)
    assert len(cbs) == 2
    lo, hi = cbs[0].get_ylim()
    assert lo == pytest.approx(-hi) and hi > 0
    fig = camlens.explain(tiny, tiny_x[:1], method="gradcam").figure()
    lo, hi = _colorbars(fig)[0].get_ylim()
    assert lo >= 0


# ------------------------------------------------------------------------------------------ item 9
def test_titles_and_file_names_use_the_true_rank(lite0, cat, tmp_path):
    top = camlens.predict(lite0, cat, topk=5)[0]
    third = top[2][0]
    exp = camlens.explain(lite0, cat, targets=[third])
    assert exp.ranks.tolist() == [[3]]
    title = _panels(exp.figure())[1].get_title()
    assert title.startswith("3rd: ") and "1st" not in title
    paths = exp.save(tmp_path)
    names = sorted(p.name for p in paths)
    assert not any("top1" in n for n in names)  # explicit targets: files named after the class
    assert json.loads(next(p for p in paths if p.suffix == ".json").read_text())["ranks"] == [3]
    with pytest.raises(camlens.CamlensError, match="not the top-k"):
        exp.save(tmp_path / "r", suffix="rank")
    auto = camlens.explain(lite0, cat, targets="top2")
    assert auto.ranks.tolist() == [[1, 2]]
    assert sorted(p.name for p in auto.save(tmp_path / "t", formats="png")) == [
        "image0_gradcam_top1.png",
        "image0_gradcam_top2.png",
    ]


def test_rank_unknown_means_no_rank(tiny, tiny_x):
    exp = camlens.explain(tiny, tiny_x, targets=lambda logits: logits[:, 0] - logits[:, 1])
    assert exp.ranks is None
    assert viz.target_label(exp, 0, 0).startswith("custom target")
    exp = camlens.explain(tiny, tiny_x, targets=[2, 0, 1])
    exp.ranks = None  # e.g. a hand-built explanation
    assert ":" not in viz.target_label(exp, 0, 0)


def test_eigencam_names_no_class(tiny, tiny_x, tmp_path):
    exp = camlens.explain(tiny, tiny_x[:1], method="eigencam", targets="top2")
    titles = [a.get_title() for a in _panels(exp.figure())]
    assert titles[1] == "class-agnostic (same map for every class)" and len(titles) == 2
    pngs = exp.save(tmp_path, formats="png")
    assert [p.name for p in pngs] == ["image0_eigencam.png"]


def test_ordinals():
    assert [viz.ordinal(r) for r in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ item 10
def test_show_displays_in_a_notebook_even_when_not_last(tiny, tiny_x, monkeypatch):
    shown = []
    fake_display = types.ModuleType("IPython.display")
    fake_display.display = lambda obj: shown.append(obj)
    monkeypatch.setattr(viz.notebook, "in_notebook", lambda: True)
    monkeypatch.setitem(sys.modules, "IPython.display", fake_display)
    exp = camlens.explain(tiny, tiny_x)
    assert exp.show() is None  # `exp.show(); exp.save(...)`: displayed by the call itself
    assert len(shown) == 1 and shown[0].__class__.__name__ == "Figure"


def test_show_opens_a_window_with_an_interactive_backend(tiny, tiny_x, monkeypatch):
    import matplotlib.pyplot as plt

    calls = []
    monkeypatch.setattr(viz.notebook, "in_notebook", lambda: False)
    monkeypatch.setattr(viz.notebook, "interactive_backend", lambda: True)
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append("show"))
    exp = camlens.explain(tiny, tiny_x)
    assert viz.display_figure(exp.figure()) == "window" and calls == ["show"]
    plt.close("all")


def test_show_with_agg_displays_nothing_and_does_not_fail(tiny, tiny_x):
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg" and not viz.interactive_backend()
    exp = camlens.explain(tiny, tiny_x)
    assert viz.display_figure(exp.figure()) == "none"
    assert exp.show() is None


def test_rich_reprs(tiny, tiny_x):
    exp = camlens.explain(tiny, tiny_x)
    png = exp._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    html = exp._repr_html_()
    assert "Explanation(method=&#x27;gradcam&#x27;" in html and "data:image/png;base64," in html


def test_in_notebook_false_in_plain_python():
    assert viz.in_notebook() is False


# ------------------------------------------------------------------------------------------ item 11
def test_tensor_input_is_shown_de_normalized(lite0, cat):
    from camlens.core.inputs import prepare_inputs

    x, _, _ = prepare_inputs(cat, lite0)
    exp = camlens.explain(lite0, x)
    fig = exp.figure()
    first = _panels(fig)[0]
    assert first.get_title() == "image0 (input, de-normalized)"
    shown = np.asarray(first.images[0].get_array())
    ref = np.asarray(Image.fromarray(cat).resize((224, 224), Image.BILINEAR), dtype=float)
    assert shown.shape == (224, 224, 3) and np.abs(shown - ref).mean() < 6  # the photo, not grey
    assert "_avg_pooling" in fig._suptitle.get_text() and "input of" not in fig._suptitle.get_text()
    assert "features before _avg_pooling" in fig._suptitle.get_text()


def test_unknown_preprocessing_is_min_max_scaled(tiny, tiny_x):
    exp = camlens.explain(tiny, tiny_x)
    first = _panels(exp.figure(index=0))[0]
    assert first.get_title() == "image0 (input, min-max scaled)"
    arr = np.asarray(first.images[0].get_array())
    assert arr.min() == 0 and arr.max() == 255


# ------------------------------------------------------------------------------------------ figures
@pytest.mark.slow
def test_figures_of_every_method_for_the_cat_and_an_absent_class(lite0, cat, tmp_path):
    """Saves every method's figure for the cat's top class and for an absent class (the class with the
    lowest logit), as show() draws it and as the saved PNGs (run with --basetemp to look at them)."""
    img = cat[::2, ::2].copy()
    absent = camlens.predict(lite0, img, topk=1000)[0][-1][0]
    # Score-CAM, SmoothGrad, Integrated Gradients, RISE, occlusion: cheap settings
    opts = {"max_channels": 32, "n_samples": 4, "steps": 8, "n_masks": 64, "window": 56, "stride": 56}
    for target, tag in ((None, "cat"), (absent, "absent")):
        res = camlens.explain(lite0, img, method=ALL_METHODS, targets=target, **opts)  # one shared pass
        for method, exp in res.items():
            viz.save_figure(exp.figure(), tmp_path / f"show_{tag}_{method}.png", dpi=60)
            exp.sources = [f"{tag}"]
            exp.save(tmp_path / "saved", formats="png")
            if tag == "absent" and method == "cam":
                assert exp.signed and float(exp.maps.mean()) < 0 and exp.ranks.tolist() == [[1000]]
    assert len(list(tmp_path.glob("show_*.png"))) == 2 * len(ALL_METHODS)
