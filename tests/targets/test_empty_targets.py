"""Issue 28, items 7-8: a target that selects nothing (no detection, an empty box list, a box
outside the image, an all-zero mask, a zero reference embedding) is a TargetError naming what was
empty and the fix, or - where a batch mixes explainable and empty images - a warning and
``extras["skipped"]``; never an unannounced zero map."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import NonFiniteError, TargetError
from camlens.targets import Detection, Segmentation, Similarity

BOXES = torch.tensor([[2.0, 2.0, 10.0, 10.0], [4.0, 4.0, 14.0, 12.0]])


class TinyDetector(nn.Module):
    """Two fixed boxes per image; box j scores sigmoid(mean of feature channel j) * gain[n]
    (``gain`` per image, so one image of a batch can have no detection above a threshold)."""

    def __init__(self, gain=(1.0,)) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.gain = gain

    def forward(self, x):
        a = self.conv(x)
        s = torch.sigmoid(a.mean((2, 3)))  # (N, 2)
        return [
            {"boxes": BOXES.clone(), "labels": torch.tensor([1, 2]), "scores": s[i] * self.gain[i % len(self.gain)]}
            for i in range(len(x))
        ]


def _x(n=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_detection_with_no_detection_above_threshold_is_a_target_error():
    with pytest.raises(TargetError, match=r"score_threshold=2.*best detection scores 0\.\d+.*lower"):
        camlens.explain(TinyDetector(), _x(), "gradcam", targets=Detection(score_threshold=2.0), layer="conv")


def test_detection_empty_box_list_is_a_target_error():
    with pytest.raises(TargetError, match="no box given"):
        camlens.explain(TinyDetector(), _x(), "gradcam", targets=Detection(np.zeros((0, 4))), layer="conv")


@pytest.mark.parametrize("box", [[20, 2, 30, 10], [-9, 2, -1, 10], [2, 16, 10, 20]])
def test_detection_box_outside_the_image_is_a_target_error(box):
    with pytest.raises(TargetError, match=r"entirely outside the image \(16x16 px"):
        camlens.explain(TinyDetector(), _x(), "gradcam", targets=Detection([box]), layer="conv")


@pytest.mark.parametrize("box", [[1, 2, 3], [[1, 2, 3]], [1, 2, 3, 4, 5, 6, 7, 8]])
def test_detection_box_of_wrong_length_is_a_target_error(box):
    with pytest.raises(TargetError, match=r"4 numbers \(x0, y0, x1, y1\)"):
        Detection(box)


def test_detection_mixed_batch_skips_the_empty_image_with_a_warning():
    """Image 1's scores are scaled by 0.01: nothing reaches 0.3 there; image 0 is explained as alone."""
    m = TinyDetector(gain=(1.0, 0.01))
    x = _x(2)
    with pytest.warns(UserWarning, match=r"1 of 2 image\(s\) have nothing to explain.*image 1: no detection"):
        e = camlens.explain(m, x, "gradcam", targets=Detection(score_threshold=0.3), layer="conv")
    assert e.extras["skipped"] == [1]
    assert "score_threshold=0.3" in e.extras["skipped_reasons"][1]
    alone = camlens.explain(TinyDetector(), x[:1], "gradcam", targets=Detection(score_threshold=0.3), layer="conv")
    torch.testing.assert_close(e.raw[0], alone.raw[0])
    assert float(alone.raw.abs().max()) > 0
    assert float(e.raw[1].abs().max()) == 0.0
    # a method blind to the score (Eigen-CAM: the features' principal component) still gives zeros there
    with pytest.warns(UserWarning, match="have nothing to explain"):
        sc = camlens.explain(m, x, "eigencam", targets=Detection(score_threshold=0.3), layer="conv")
    assert float(sc.raw[1].abs().max()) == 0.0 and float(sc.raw[0].abs().max()) > 0
    # a batch where every image is explainable warns about nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e2 = camlens.explain(m, x, "gradcam", targets=Detection(score_threshold=0.0), layer="conv")
    assert "skipped" not in e2.extras


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


def test_segmentation_all_zero_mask_is_a_target_error():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TargetError, match="mask selects no pixel"):
        camlens.explain(TinyFCN(), x, "gradcam", targets=Segmentation(1, np.zeros((8, 8))), layer="features")
    with pytest.raises(NonFiniteError, match="mask holds NaN"):
        camlens.explain(TinyFCN(), x, "gradcam", targets=Segmentation(1, np.full((8, 8), np.nan)), layer="features")


def test_segmentation_class_predicted_nowhere_is_a_target_error():
    m = TinyFCN().eval()
    with torch.no_grad():
        m.classifier.bias[2] = -1e4  # class 2 is predicted nowhere
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TargetError, match="no pixel is predicted as class 2"):
        camlens.explain(m, x, "gradcam", targets=Segmentation(2), layer="features")


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_similarity_zero_reference_and_string_reference_are_clear_errors():
    with pytest.raises(TargetError, match="zero vector.*undefined"):
        Similarity(torch.zeros(4))
    with pytest.raises(TargetError, match="reference embedding 1 is the zero vector"):
        Similarity(torch.stack([torch.ones(4), torch.zeros(4)]))
    with pytest.raises(TargetError, match="numeric embedding"):
        Similarity("a photo of a cat")
    with pytest.raises(NonFiniteError, match="reference holds NaN"):
        Similarity(torch.tensor([1.0, float("nan"), 0.0, 0.0]))


def test_similarity_reference_image_embedded_to_zero_is_a_target_error():
    m = Embedder().eval()
    with torch.no_grad():
        m.conv.weight.zero_()
        m.conv.bias.zero_()
    with pytest.raises(TargetError, match="embedding of reference image 0 is the zero vector"):
        camlens.explain(m, torch.randn(1, 3, 8, 8), "saliency", targets=Similarity(torch.randn(3, 8, 8)))


def test_infinite_target_scores_are_refused_like_nan_scores():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(NonFiniteError, match=r"target scores are NaN or Inf \(image 0 target 0\).*callable"):
            camlens.explain(m, x, "gradcam", targets=lambda lg, bad=bad: lg[:, 0] * bad, layer="0")


def test_nonfinite_scores_name_their_source_input_or_overflow():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(NonFiniteError, match=r"target scores are NaN or Inf.*model's output holds NaN or Inf.*float32"):
        seg = TinyFCN().eval()
        with torch.no_grad():
            seg.classifier.bias[1] = float("inf")  # the logits overflow
        camlens.explain(seg, x, "gradcam", targets=Segmentation(1, np.ones((8, 8))), layer="features")
    bad = x.clone()
    bad[0, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"target scores are NaN or Inf.*the input holds NaN"):
        camlens.explain(TinyFCN(), bad, "gradcam", targets=Segmentation(1, np.ones((8, 8))), layer="features")
