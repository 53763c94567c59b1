"""Which methods apply to which model (the registry's ``applies_to``), the early refusal, and the cost
estimates (the registry's ``cost`` hook) against the forwards the methods really run."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import camlens
from camlens.attribution.registry import ModelTraits, applicable, get_method, register, unregister
from camlens.attribution.traits import model_traits
from camlens.base.errors import NotApplicableError
from camlens.base.progress import Estimate, Reporter, format_seconds, reporting
from camlens.targets import Detection, Segmentation
from tests.conftest import TinyCNN
from tests.core.test_attention import TinyAttnNet
from tests.core.test_layout import tiny_swin

ATTENTION_METHODS = {n for n, i in camlens.methods().items() if {"attention", "attention_grads"} & i.needs}


class Counter:
    """Counts the images the model forwards (a forward pre-hook on the root module)."""

    def __init__(self, model: nn.Module):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        x = args[0]
        self.n += len(x) if isinstance(x, (list, tuple)) or x.dim() == 4 else 1

    def close(self) -> int:
        self.handle.remove()
        return self.n


class Recorder(Reporter):
    def __init__(self):
        self.estimates: list[Estimate] = []
        self.progress: list[tuple[str, int, int]] = []

    def estimate(self, est: Estimate) -> None:
        self.estimates.append(est)

    def advance(self, method: str, done: int, total: int) -> None:
        self.progress.append((method, done, total))


def wide_cnn(channels: int = 12) -> nn.Module:
    """float32 TinyCNN whose last layer has dead channels (all zero after the ReLU) and duplicate
    channels, so that Score-CAM's deduplication matters."""
    torch.manual_seed(0)
    net = TinyCNN(c2=channels).eval()
    with torch.no_grad():
        net.conv2.bias[:3] = -1e3  # dead: one shared all-zero mask
        net.conv2.weight[4] = net.conv2.weight[5]  # duplicates: one mask
        net.conv2.bias[4] = net.conv2.bias[5]
    return net


# ------------------------------------------------------------------------------- applicability
def test_method_lists_by_model_kind():
    cnn = applicable(model_traits(TinyCNN()))
    assert not ATTENTION_METHODS & set(cnn) and "drise" not in cnn
    assert {"gradcam", "cam", "scorecam", "rise", "saliency"} <= set(cnn)
    vit = applicable(model_traits(TinyAttnNet()))
    assert {"attention_rollout", "generic_attention"} == ATTENTION_METHODS and set(vit) >= ATTENTION_METHODS
    assert "drise" not in vit and "gradcam" in vit
    swin = applicable(model_traits(tiny_swin()))  # windowed attention: rollout does not apply
    assert not ATTENTION_METHODS & set(swin)
    det = applicable(model_traits(TinyCNN(), Detection()))
    assert "drise" in det and "cam" not in det and "gradcam" in det
    seg = applicable(model_traits(TinyCNN(), Segmentation(1)))
    assert "drise" not in seg and "cam" not in seg and "gradcam" in seg
    assert model_traits(TinyCNN()).describe() == "TinyCNN (a CNN classifier)"


def test_methods_that_declare_nothing_apply_to_every_model():
    @register("tmp_plain", paper="-", summary="-")
    def plain(ctx):  # pragma: no cover - never run
        raise AssertionError

    @register("tmp_attn", paper="-", summary="-", needs=("attention",))
    def attn(ctx):  # pragma: no cover - never run
        raise AssertionError

    try:
        kinds = [ModelTraits(t, a) for t in ("classification", "detection", "segmentation", "other") for a in (0, 1)]
        assert all(get_method("tmp_plain").applies(t) for t in kinds)
        assert [get_method("tmp_attn").applies(t) for t in kinds] == [bool(t.attention) for t in kinds]
        assert get_method("tmp_plain").cost is None and get_method("tmp_plain").boxes  # a layer method
    finally:
        unregister("tmp_plain")
        unregister("tmp_attn")


@pytest.mark.parametrize(
    "method, words",
    [("attention_rollout", "no global self-attention.*gradcam"), ("drise", "Detection"), ("generic_attention", "")],
)
def test_explain_refuses_before_any_forward(method, words):
    net = TinyCNN().eval()
    count = Counter(net)
    with pytest.raises(NotApplicableError, match=f"{method} does not apply to TinyCNN.*{words}") as err:
        camlens.explain(net, torch.randn(1, 3, 12, 12), method)
    assert count.close() == 0  # refused before the shared forward pass
    offered = str(err.value).split("Methods for this model: ")[1]
    listed = offered.rstrip(".").split(", ")
    assert "cam" in listed and "gradcam" in listed and "attention_rollout" not in listed and "drise" not in listed


def test_cli_methods_for_a_model(monkeypatch):
    from camlens.cli import info, main

    monkeypatch.setattr(info, "load_model_opts", lambda *a: TinyCNN())
    r = CliRunner().invoke(main, ["methods", "--model", "tiny"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    listed = {line.split()[0] for line in r.output.splitlines()[4:] if line and line.split()[0] in camlens.methods()}
    assert listed == set(applicable(model_traits(TinyCNN())))
    assert "not for this model: attention_rollout" in r.output


# ------------------------------------------------------------------------------- cost estimates
@pytest.mark.parametrize(
    "method, options",
    [
        ("scorecam", {}),
        ("scorecam", {"max_channels": 5}),
        ("scorecam", {"dedupe": False, "batch_size": 3}),
        ("rise", {"n_masks": 20}),
        ("occlusion", {"window": 5, "stride": 3}),
        ("integrated_gradients", {"steps": 6, "batch_size": 4}),
        ("smoothgrad", {"n_samples": 5, "batch_size": 4}),
    ],
)
def test_estimate_counts_the_forwards_the_method_runs(method, options):
    net = wide_cnn()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    count = Counter(net)
    camlens.explain(net, x, method, targets="top2", **options)  # no reporter: nothing estimated
    ran = count.close() - len(x)  # less the shared forward pass
    rec = Recorder()
    with reporting(rec):
        camlens.explain(net, x, method, targets="top2", **options)
    (est,) = rec.estimates
    assert est.method == method and est.forwards == ran
    if method == "scorecam" and not options:
        assert ran < 2 * 12  # dead and duplicate channels share a forward
    # progress: the images forwarded so far, non-decreasing, ending at done == total
    done = [d for _, d, _ in rec.progress]
    assert done == sorted(done) and rec.progress[-1] == (method, ran, ran)
    assert est.seconds > 0 and not rec.progress[0][1] > ran


def test_scorecam_suggests_max_channels_above_64_channels():
    rec = Recorder()
    x = torch.randn(1, 3, 12, 12)
    with reporting(rec):
        camlens.explain(wide_cnn(100), x, "scorecam")
        camlens.explain(wide_cnn(100), x, "scorecam", max_channels=32)
        camlens.explain(wide_cnn(60), x, "scorecam")
    big, capped, narrow = rec.estimates
    assert big.cheaper == {"max_channels": 64} and 0 < big.cheaper_seconds < big.seconds
    assert re.fullmatch(r"scorecam: ≈\d+ masked forwards, ~.+ here; --option max_channels=64 for ~.+", big.text())
    assert capped.cheaper is None and narrow.cheaper is None and capped.forwards <= 32 + 4


def test_no_reporter_no_hook_and_nothing_left():
    net = wide_cnn()
    x = torch.randn(1, 3, 12, 12)
    with reporting(Recorder()):
        camlens.explain(net, x, "rise", n_masks=4)
    assert not net._forward_pre_hooks and not net._forward_hooks


def test_format_seconds():
    assert [format_seconds(s) for s in (0.04, 8.4, 185, 7200)] == ["0.0 s", "8 s", "3 min", "2.0 h"]


@pytest.mark.slow
def test_cli_prints_the_estimate_with_the_max_channels_hint(monkeypatch, tmp_path):
    from camlens.cli import explain as cli_explain
    from camlens.cli import main

    wide = nn.Sequential(
        nn.Conv2d(3, 128, 3, stride=8, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 5)
    ).eval()
    monkeypatch.setattr(cli_explain, "load_model_seeded", lambda *a: wide)
    args = ["explain", "--format", "npy", "--out", tmp_path, "--overwrite", "--topk", "1"]
    r = CliRunner().invoke(main, [str(a) for a in [*args, "--method", "scorecam"]], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = r"estimate: scorecam: ≈1[0-3]\d masked forwards, ~.+ here; --option max_channels=64 for ~"
    assert re.search(line, r.stderr), r.stderr
    # a cheap method (no declared cost) and a small Score-CAM print no estimate
    for method in (["--method", "gradcam"], ["--method", "scorecam", "--option", "max_channels=8"]):
        r = CliRunner().invoke(main, [str(a) for a in [*args, *method]], catch_exceptions=False)
        assert r.exit_code == 0 and "estimate" not in r.stderr, r.output
    r = CliRunner().invoke(main, [str(a) for a in [*args, "--method", "generic_attention"]])
    assert r.exit_code == 2 and "generic_attention does not apply to Sequential" in r.output


def test_estimate_text_names_the_backwards():
    est = Estimate("integrated_gradients", 136, "forwards", 12.0, backwards=128)
    assert est.text() == "integrated_gradients: ≈136 forwards + 128 backwards, ~12 s here"
