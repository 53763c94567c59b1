"""The method contract: one ``@register`` is all a new method needs."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import camlens
from camlens.attribution.registry import MethodOutput, get_method, register, unregister
from camlens.base.errors import MethodError
from camlens.cli import main
from camlens.core.engine import ForwardPass


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 5)
    ).eval()


@pytest.fixture
def toy():
    """A toy method: the channel sum of the features (no gradient), registered for one test."""

    @register(
        "toysum",
        paper="a test, 2026",
        summary="sum of the features over channels",
        needs=("features",),
        title="Toy Sum",
        aliases=("toy-sum",),
    )
    def toysum(ctx: ForwardPass, *, scale: float = 1.0) -> MethodOutput:
        m = ctx.layer_features.sum(1, keepdim=True) * scale  # (N, 1, h, w)
        return MethodOutput(m.expand(-1, ctx.k, -1, -1))

    yield toysum
    unregister("toysum")


def test_a_registered_method_reaches_explain_with_its_options(toy):
    net, x = _net(), torch.rand(2, 3, 8, 8)
    e = camlens.explain(net, x, "toy-sum", layer="1", scale=2.0)
    ref = net[1](net[0](x)).sum(1)  # the oracle: the ReLU features summed over channels
    assert e.method == "toysum"
    torch.testing.assert_close(e.raw[:, 0], 2 * ref)
    assert "toysum" in camlens.methods() and get_method("TOY-SUM").title == "Toy Sum"
    with pytest.raises(MethodError, match="scale"):
        camlens.explain(net, x, "toysum", layer="1", sacle=2.0)


def test_a_registered_method_reaches_the_cli_listing_and_figure_titles(toy, tmp_path):
    r = CliRunner().invoke(main, ["methods", "-v"], catch_exceptions=False)
    assert r.exit_code == 0 and "toysum" in r.output and "scale=1.0" in r.output
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        ["explain", str(img), "--model", "resnet18", "--weights", "random", "--method", "toysum", "--out", str(out)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    pngs = sorted(out.glob("*.png"))
    assert pngs and all("toysum" in p.name for p in pngs)
    assert Image.open(pngs[0]).text["Title"].startswith("Toy Sum")


def test_duplicate_names_and_aliases_raise(toy):
    def other(ctx, **kw):
        return MethodOutput(torch.zeros(1))

    for name, aliases in (("toysum", ()), ("gradcam", ()), ("fresh", ("toy-sum",)), ("GRAD-CAM", ())):
        with pytest.raises(ValueError, match="already registered"):
            register(name, paper="p", summary="s", aliases=aliases)(other)
    with pytest.raises(ValueError, match="unknown needs"):
        register("x1", paper="p", summary="s", needs=("grads",))(other)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        register("x2", paper="p", summary="s", kind="pixels")(other)  # type: ignore[arg-type]
    assert "fresh" not in camlens.methods() and "x1" not in camlens.methods()


def test_every_builtin_has_a_title_and_is_discovered_without_a_list():
    ms = camlens.methods()
    assert {"cam", "gradcam", "gradcam++", "scorecam", "eigencam", "guided_backprop", "integrated_gradients"} <= set(ms)
    assert all(i.title and i.kind in ("layer", "pixel") for i in ms.values())
    assert get_method("Grad-CAM").name == "gradcam" and get_method("ig").name == "integrated_gradients"
    with pytest.raises(MethodError, match="method must be a method name"):
        get_method(3)  # type: ignore[arg-type]
