"""A small CLIP-style model trained here on the synthetic shapes with captions ("a circle", …):
the Grad-CAM map of the prompt naming the shape that is present points into the shape's box more
often than the centre of the image does (the pointing-game baseline).

The model follows OpenCLIP's interface (``encode_image``, ``encode_text``, ``logit_scale``), so it
goes through the same :class:`camlens.models.imagetext.ImageText` path as OpenCLIP models. Trained
image -> caption with CLIP's cross-entropy over the captions' scaled cosines (plain backgrounds, 32 px).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.data.synthetic import synthetic_arrays
from camlens.models.imagetext import ImageText
from camlens.targets import Text

SHAPES = ("circle", "square", "triangle", "cross")
VOCAB = {w: i + 1 for i, w in enumerate(("a", "photo", "of", *SHAPES))}  # 0: padding
SIZE = 32


def tokenize(prompts: list[str]) -> torch.Tensor:
    rows = [[VOCAB[w] for w in p.split()] for p in prompts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class ShapeCLIP(nn.Module):
    """A CNN image tower (global average pooling + projection) and a bag-of-words text tower."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.visual = nn.Sequential(
            *_block(3, 32),
            nn.MaxPool2d(2),
            *_block(32, 64),
            nn.MaxPool2d(2),
            *_block(64, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, dim),
        )
        self.words = nn.EmbeddingBag(len(VOCAB) + 1, dim, mode="mean", padding_idx=0)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.words(ids)


def _tensor(images) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25


def _train(model: ShapeCLIP, steps: int = 150) -> None:
    data = synthetic_arrays(512, classes=SHAPES, image_size=SIZE, seed=11, textured=False)
    x, y = _tensor(data.images), torch.from_numpy(data.labels)
    captions = tokenize([f"a {s}" for s in SHAPES])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        img = F.normalize(model.encode_image(x[idx]), dim=-1)
        txt = F.normalize(model.encode_text(captions), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.T, y[idx])  # image -> its caption
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None


@pytest.mark.slow
def test_prompt_map_points_into_the_shapes_box_more_often_than_the_centre():
    torch.manual_seed(0)
    model = ShapeCLIP()
    _train(model)
    test = synthetic_arrays(48, classes=SHAPES, image_size=SIZE, seed=12, textured=False)
    x = _tensor(test.images)
    wrapped = ImageText(model, tokenize)
    with torch.no_grad():
        logits = wrapped.logits(wrapped(x), wrapped.text_embeddings(tokenize([f"a {s}" for s in SHAPES])))
    correct = int((logits.argmax(1) == torch.from_numpy(test.labels)).sum())
    prompts = [f"a {SHAPES[c]}" for c in test.labels]
    hits, centre = 0, 0
    for i in range(len(x)):  # each image with the prompt of its own shape
        m = camlens.explain(wrapped, x[i : i + 1], "gradcam", targets=Text(prompts[i])).maps[0, 0]
        yy, xx = divmod(int(m.argmax()), m.shape[1])
        x0, y0, x1, y1 = test.boxes[i].tolist()
        hits += int(x0 <= xx < x1 and y0 <= yy < y1)
        centre += int(x0 <= SIZE // 2 < x1 and y0 <= SIZE // 2 < y1)
    n = len(x)
    print(f"shape prompts: zero-shot accuracy {correct}/{n}, pointing {hits}/{n}, centre baseline {centre}/{n}")
    assert correct >= 0.75 * n  # the captions were learned (chance: a quarter)
    assert hits > centre
