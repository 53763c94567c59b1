"""camlens.compare on every model kind: a detector (its own top detection, scored by class score x IoU),
a segmenter (a class region, scored by its summed logits) and an image–text model with a prompt (the
image–text logit). Oracles: every faithfulness number is the camlens.metrics function called directly
with the same maps and the same target; the clean score each curve starts from is computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from camlens.comparison import CompareConfig, compare
from camlens.metrics import deletion, deletion_curve, insertion, road
from camlens.targets import Detection, Segmentation
from tests.targets.test_text import tiny_clip, tiny_tokenizer

SMALL = CompareConfig(
    images=3,
    steps=3,
    road_percentages=(0.5,),
    sanity_images=1,
    sanity_layers=1,
    sensitivity_images=1,
    sensitivity_samples=1,
    bootstrap=20,
    progress=False,
)
BOXES = torch.tensor([[2.0, 2.0, 18.0, 18.0], [8.0, 6.0, 30.0, 28.0]])


class TinyDetector(nn.Module):
    """Two fixed boxes per image; box j scores sigmoid(mean of feature channel j) (labels 1 and 2)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        s = torch.sigmoid(self.conv(x).mean((2, 3)))
        return [{"boxes": BOXES.clone(), "labels": torch.tensor([1, 2]), "scores": s[i]} for i in range(len(x))]


class TinyFCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return {"out": self.classifier(self.features(x))}


def _x(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def _mean(res, method, metric) -> float:
    r = res.row(method, metric)
    assert r is not None, (method, metric)
    return float(r["mean"])


def _faithfulness_is_the_metric_functions(model, res, target, methods):
    opts = {"steps": SMALL.steps, "seed": res.seed, "batch_size": 16}
    for m in methods:
        maps = res.maps[m]
        assert _mean(res, m, "deletion") == pytest.approx(float(deletion(model, res.x, maps, target, **opts).mean()))
        assert _mean(res, m, "insertion") == pytest.approx(float(insertion(model, res.x, maps, target, **opts).mean()))
        morf = road(model, res.x, maps, target, order="morf", percentages=(0.5,), seed=res.seed, batch_size=16)
        assert _mean(res, m, "road_morf") == pytest.approx(float(morf.mean()))


@pytest.mark.slow  # a comparison of two methods on the tiny detector
def test_detector_own_top_detection_scored_by_class_score_times_iou():
    det = TinyDetector().eval()
    x = _x()
    target = Detection(score_threshold=0.0, max_boxes=1)
    gt = [BOXES[:1].numpy()] * 3
    cfg = CompareConfig(**{**vars(SMALL), "options": {"*": {"layer": "conv"}}})
    res = compare(det, x, "gradcam,saliency,cam", targets=target, gt=gt, config=cfg)
    _faithfulness_is_the_metric_functions(det, res, target, ["gradcam", "saliency", "random"])
    # the clean score is the top detection's own score (IoU with itself = 1), by hand
    s, top = torch.sigmoid(det.conv(x).mean((2, 3))).max(1)
    curve = deletion_curve(det, x, res.maps["gradcam"], target, steps=3, seed=res.seed)
    torch.testing.assert_close(curve.probs[:, 0], s.detach(), rtol=1e-6, atol=1e-6)
    # all pixels deleted: the zero image's score of the same (label, box): sigmoid(bias of that label)
    torch.testing.assert_close(curve.probs[:, -1], torch.sigmoid(det.conv.bias.detach())[top], rtol=1e-6, atol=1e-6)
    # CAM reads a classifier's head: skipped before any work, with the reason
    assert "cam" in res.flags and "classifiers" in res.flags["cam"] and "cam" not in res.ranking
    assert res.row("gradcam", "pointing_game") is not None  # localization against the given boxes


@pytest.mark.slow  # a comparison of two methods on the tiny segmenter
def test_segmenter_region_scored_by_its_summed_logits():
    fcn = TinyFCN().eval()
    x = _x()
    region = np.zeros((32, 32), bool)
    region[4:20, 6:26] = True
    target = Segmentation(1, mask=region)
    cfg = CompareConfig(**{**vars(SMALL), "options": {"*": {"layer": "features"}}})
    res = compare(fcn, x, "gradcam,saliency", targets=target, config=cfg)
    _faithfulness_is_the_metric_functions(fcn, res, target, ["gradcam", "saliency", "random"])
    with torch.no_grad():
        ref = (fcn(x)["out"][:, 1] * torch.from_numpy(region)).sum((1, 2))
    curve = deletion_curve(fcn, x, res.maps["saliency"], target, steps=3, seed=res.seed)
    torch.testing.assert_close(curve.probs[:, 0], ref, rtol=1e-5, atol=1e-4)
    # summed logits are not probabilities: the gain's best for insertion / LeRF is the clean score
    parts = []
    for metric in ("deletion", "insertion", "road_morf", "road_lerf"):
        best = 0.0 if metric in ("deletion", "road_morf") else float(ref.mean())
        mm, rr = _mean(res, "saliency", metric), _mean(res, "random", metric)
        parts.append((mm - rr) / (best - rr))
    assert _mean(res, "saliency", "faithfulness_gain") == pytest.approx(np.mean(parts), rel=1e-5)
    assert not (res.table["method"] == "model").any()


@pytest.fixture(scope="module")
def clip():
    from camlens.models.imagetext import ImageText

    return ImageText(tiny_clip(), tiny_tokenizer())


@pytest.mark.slow  # a comparison on a tiny CLIP
def test_image_text_prompt_scored_by_the_image_text_logit(clip):
    from camlens.targets import Text

    x = _x(3)
    target = Text("a red circle")
    res = compare(clip, x, "gradcam,saliency", targets=target, config=SMALL)
    _faithfulness_is_the_metric_functions(clip, res, target, ["saliency", "random"])
    with torch.no_grad():
        ids = clip.tokenizer(["a red circle"], padding=True, return_tensors="pt")
        ref = clip.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=x)
    curve = deletion_curve(clip, x, res.maps["saliency"], target, steps=3, seed=res.seed)
    torch.testing.assert_close(curve.probs[:, 0], ref.logits_per_image[:, 0], rtol=1e-5, atol=1e-5)


def test_cli_prompt_needs_an_image_text_model_and_help_names_the_budgets(tmp_path):
    from camlens.cli import main
    from camlens.comparison import DEFAULT_BUDGETS

    r = CliRunner().invoke(main, ["compare", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for method, opts in DEFAULT_BUDGETS.items():
        assert method in text and all(f"{k}={v}" in text for k, v in opts.items()), method
    assert "--no-budgets" in text and "--prompt" in text
    x = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(x)
    r = CliRunner().invoke(
        main, ["compare", str(x), "--model", "resnet18", "--weights", "random", "--prompt", "dog", "--quiet"]
    )
    assert r.exit_code == 2 and "image–text model" in r.output


def test_cli_no_budgets_clears_them(tmp_path, monkeypatch):
    import camlens.comparison as comparison
    from camlens.cli import main

    seen = {}

    class Fake:
        elapsed_s, reused = 1.0, "gradcam: faithfulness"

        def summary(self):
            return "(summary)"

    def fake(model, data, methods, seed, *, out, config, targets=None):
        seen.update(config=config, targets=targets)
        return Fake()

    monkeypatch.setattr(comparison, "compare", fake)
    x = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(x)
    base = ["compare", str(x), "--model", "resnet18", "--weights", "random", "--quiet", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, [*base, "--no-budgets"])
    assert r.exit_code == 0, r.output
    assert seen["config"].method_options("rise") == {"progress": False} and seen["targets"] is None
    assert "reused: gradcam: faithfulness" in r.output
    CliRunner().invoke(main, base)
    assert seen["config"].method_options("rise") == {"progress": False, "n_masks": 64}


def test_a_zoo_detector_defaults_to_its_own_top_detection():
    from camlens.models.card import ModelCard, attach_card

    det = attach_card(TinyDetector().eval(), ModelCard("tiny-det", extra={"task": "detection"}))
    x = _x()
    cfg = CompareConfig(**{**vars(SMALL), "sanity_images": 0, "sensitivity_images": 0})
    res = compare(det, x, "saliency", config=cfg)
    _faithfulness_is_the_metric_functions(det, res, Detection(score_threshold=0.0, max_boxes=1), ["saliency"])


def test_a_target_that_selects_nothing_is_a_clear_error():
    from camlens.base.errors import TargetError

    with pytest.raises(TargetError, match=r"3 image\(s\) have nothing to score.*score_threshold=2"):
        deletion(TinyDetector().eval(), _x(), "random", Detection(score_threshold=2.0), steps=2)
