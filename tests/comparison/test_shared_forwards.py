"""The memo of the forwards the methods of one comparison share (deletion's and insertion's ends)."""

from __future__ import annotations

import torch
from torch import nn

from camlens.comparison.shared import SharedForwards
from camlens.metrics import deletion, insertion


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.rows = 0

    def forward(self, x):
        self.rows += int(x.shape[0])
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_rows_seen_before_are_read_back_and_equal_the_model():
    torch.manual_seed(0)
    model = Counting().eval()
    shared = SharedForwards(model)
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        a = shared(x)
        b = shared(torch.cat([x[1:], torch.randn(1, 3, 8, 8), x[1:2]]))  # 3 rows seen, 1 new (twice: once)
        ref = model(torch.cat([x, x[1:2]]))
    torch.testing.assert_close(a, ref[:3])
    torch.testing.assert_close(b[[0, 1, 3]], ref[[1, 2, 1]])
    assert (shared.misses, shared.hits) == (4, 3) and model.rows == 4 + 4
    # the same bytes in another layout are the same row
    with torch.inference_mode():
        shared(x.contiguous(memory_format=torch.channels_last))
    assert shared.hits == 6


def test_gradients_and_other_outputs_pass_through():
    model = Counting().eval()
    shared = SharedForwards(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    shared(x).sum().backward()  # grad mode: not remembered, gradients flow
    assert x.grad is not None and shared.misses == 0

    class Listed(nn.Module):
        def forward(self, x):
            return [{"boxes": r[:1, :1]} for r in x]

    lst = SharedForwards(Listed())
    with torch.inference_mode():
        out = lst(torch.randn(2, 3, 4, 4))
    assert isinstance(out, list) and not lst.enabled


def test_a_second_method_computes_only_its_own_rows():
    """Deletion and insertion of a second map reuse the ends: the clean image, the all-removed and the
    blurred one (2 of the steps + 1 forwards per image and curve); the numbers equal the model's."""
    torch.manual_seed(0)
    model = Counting().eval()
    shared = SharedForwards(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cls = torch.tensor([0, 2])
    first, second = x.abs().sum(1), torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2))
    for maps in (first, second):
        d = deletion(shared, x, maps, cls, steps=5)
        i = insertion(shared, x, maps, cls, steps=5)
        torch.testing.assert_close(d, deletion(model, x, maps, cls, steps=5))
        torch.testing.assert_close(i, insertion(model, x, maps, cls, steps=5))
    # the first map: 2 images x (6 + 6) points, less the all-removed image (zeros: the same for both
    # images) and each image's clean row (deletion's start is insertion's end); the second map: only
    # its 2 x (4 + 4) interior points are new
    assert shared.misses == (12 - 1) + (12 - 2) + 2 * 8


def test_after_freeze_seen_rows_come_back_and_new_ones_are_not_kept():
    torch.manual_seed(0)
    model = Counting().eval()
    shared = SharedForwards(model)
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        shared(x)
        shared.freeze()
        for _ in range(2):  # y twice: computed both times; x read back
            out = shared(torch.cat([x[:1], y]))
        ref = model(torch.cat([x[:1], y]))
    torch.testing.assert_close(out, ref)
    assert (shared.misses, shared.hits) == (2 + 2 + 2, 2) and len(shared._memo) == 2
