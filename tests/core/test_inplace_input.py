"""In-place operations on the input itself (issue 12 item 16): the model is never handed the leaf nor
the caller's tensor, so the result equals the out-of-place model's and the caller's input is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens

METHODS = [
    "saliency",
    "guided_backprop",
    "deconvnet",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "guided_gradcam",
    "gradcam",
    "cam",
    "scorecam",
]


class FirstReLU(nn.Module):
    """The notebooks' 3x3 rule example: a ReLU (in place or not) applied to the input first."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.act0 = nn.ReLU(inplace=inplace)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(self.act0(x)))).flatten(1))


class InplaceNorm(FirstReLU):
    """Normalizes its input in place inside ``forward`` (a common pattern in user models)."""

    def forward(self, x):
        x.sub_(0.25).div_(2.0) if self.act0.inplace else None
        if not self.act0.inplace:
            x = (x - 0.25) / 2.0
        return super().forward(x)


@pytest.mark.parametrize("cls", [FirstReLU, InplaceNorm])
@pytest.mark.parametrize("method", METHODS)
def test_inplace_first_layer_equals_out_of_place(cls, method):
    torch.manual_seed(0)
    ref_model = cls(inplace=False).double().eval()
    model = cls(inplace=True).double().eval()
    model.load_state_dict(ref_model.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x0 = x.clone()
    opts = {"n_samples": 4} if method == "smoothgrad" else {}
    if method == "smoothgrad":
        torch.manual_seed(1)
    ref = camlens.explain(ref_model, x, method=method, targets=[0, 2], **opts)
    if method == "smoothgrad":
        torch.manual_seed(1)
    got = camlens.explain(model, x, method=method, targets=[0, 2], **opts)
    assert torch.equal(x, x0), "the caller's tensor was modified"
    torch.testing.assert_close(got.maps, ref.maps)
    torch.testing.assert_close(got.scores, ref.scores)


def test_predict_and_metrics_leave_caller_tensor():
    """Inference paths too: an in-place model never writes into the caller's tensor."""
    torch.manual_seed(0)
    model = FirstReLU(inplace=True).eval()
    x = torch.randn(2, 3, 8, 8)
    x0 = x.clone()
    camlens.predict(model, x, topk=2)
    from camlens.metrics._common import class_probs, logits_of

    logits_of(model, x)
    class_probs(model, x, torch.tensor([0, 1]))
    assert torch.equal(x, x0)
