"""The forward pass as a named step (issue 23, "one-way flow"): the constructor only sets fields,
``ForwardPass.run`` runs the model once; frames are passed in; layer-gradient reductions are declared
by the methods layer and reach the pass through the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens.attribution.registry import layer_grad_reduction, reductions_for
from camlens.base.errors import MethodError
from camlens.core.capture import CaptureSpec
from camlens.core.engine import BUILTIN_REDUCTIONS, ForwardPass, PassRequest
from camlens.models.tasks import Frames
from tests.conftest import TinyCNN


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def _spec(model: nn.Module) -> CaptureSpec:
    name = "net.act2"
    return CaptureSpec(model.get_submodule(name), name, "output", -1)


def test_constructor_runs_nothing_and_run_runs_the_model_once():
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(2, 3, 32, 32)
    req = PassRequest(targets="top2", needs=frozenset({"features", "layer_grads:mean"}))
    bare = ForwardPass(model, x, _spec(model), req)
    assert model.calls == 0
    assert bare.features is None and not hasattr(bare, "scores")
    ctx = ForwardPass.run(model, x, _spec(model), req)
    assert model.calls == 1
    assert ctx.features is not None and ctx.scores.shape == (2, 2)
    # the scores are those of the model's own top-2 classes
    with torch.no_grad():
        ref = model.net(x).topk(2, dim=1).values
    torch.testing.assert_close(ctx.scores.detach(), ref)


def test_run_takes_request_fields_as_keywords_and_overrides():
    model = TinyCNN().eval()
    x = torch.randn(1, 3, 32, 32)
    a = ForwardPass.run(model, x, None, targets="top3")
    b = ForwardPass.run(model, x, None, PassRequest(targets="top1"), targets="top3")
    assert a.k == b.k == 3
    torch.testing.assert_close(a.scores, b.scores)


def test_frames_passed_in_are_filled_by_the_pass_and_kept_on_it():
    """A detector's resize + pad is recorded into the Frames object the caller passes."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    from camlens.models.detectors import as_detector

    det = as_detector(
        fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=96
        ).eval()
    )
    x = [torch.rand(3, 50, 80)]
    frames = Frames()
    ctx = ForwardPass.run(
        det, x, None, PassRequest(targets=camlens.targets.Detection(score_threshold=0.0), frames=frames)
    )
    assert frames.seen and ctx.frames is frames
    assert frames.resized[0][0] <= 96 and max(frames.resized[0]) <= 96
    own = ForwardPass.run(det, x, None, PassRequest(targets=camlens.targets.Detection(score_threshold=0.0)))
    assert own.frames is not None and own.frames.resized == frames.resized  # recorded by the pass itself


def test_reductions_are_declared_by_the_methods_layer_and_looked_up_through_the_registry():
    got = reductions_for(frozenset({"features", "layer_grads:eigengradcam", "layer_grads:mean"}))
    assert set(got) == {"eigengradcam"}  # "mean" is built into the engine
    assert "eigengradcam" not in BUILTIN_REDUCTIONS
    with pytest.raises(MethodError, match="layer_grad_reduction"):
        reductions_for(frozenset({"layer_grads:no-such-reduction"}))


def test_a_pass_knows_only_the_reductions_it_was_given():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 32, 32)
    spec = CaptureSpec(model.get_submodule("act2"), "act2", "output", -1)

    @layer_grad_reduction("test-channel-max")
    def _cmax(G, A):
        return G.amax(dim=2)

    needs = frozenset({"features", "layer_grads:test-channel-max"})
    ctx = ForwardPass.run(model, x, spec, targets="top2", needs=needs, reductions=reductions_for(needs))
    full = ForwardPass.run(model, x, spec, targets="top2", needs=frozenset({"features", "layer_grads"}))
    torch.testing.assert_close(ctx.layer_grad_sums("test-channel-max"), full.layer_grads().amax(dim=2))
    bare = ForwardPass.run(model, x, spec, targets="top2", needs=needs)  # nothing handed over
    with pytest.raises(KeyError, match="test-channel-max"):
        bare.layer_grad_sums("test-channel-max")
