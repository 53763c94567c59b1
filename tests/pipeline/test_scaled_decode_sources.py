"""Scaled JPEG decoding on the pipeline's other source: a user's Dataset whose items are paths is
decoded as image files are (the smallest DCT scale that covers the preprocessing's input), unless
``exact_decode``; the item's size and the stored boxes stay in the photo's own pixels. Images the
user's dataset decodes itself (PIL, arrays, tensors) are used as they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import camlens
from camlens.base.io import decode_image, load_image
from camlens.models.preprocess import Preprocess
from camlens.pipeline.sources import UserDataset, as_dataset
from tests.conftest import TinyCNN

PP = Preprocess(size=(32, 32))  # stretch to 32x32: a 400x300 JPEG decodes at 1/8 scale (50x38)
H, W = 300, 400


def _jpeg(path, seed: int = 0):
    rng = np.random.default_rng(seed)
    small = (rng.random((H // 20, W // 20, 3)) * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC))
    Image.fromarray(big).save(path, quality=90)
    return str(path)


class Paths(Dataset):
    """A user's dataset of ``(path, label)`` items (as a list file or a custom index gives them)."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.paths[i], i % 2


def _prep(rgb: np.ndarray) -> torch.Tensor:
    return PP.normalize(PP.resize_image(rgb)[None])[0]


def test_a_path_item_is_decoded_at_the_scaled_size(tmp_path):
    p = _jpeg(tmp_path / "a.jpg")
    item = UserDataset(Paths([p]), PP, keep_images=True)[0]
    scaled = decode_image(p, PP.min_decode_size)
    assert scaled.rgb.shape[:2] == (38, 50)  # ceil(300 / 8), ceil(400 / 8): the 1/8 DCT scale
    assert item["image"].shape == scaled.rgb.shape
    assert item["size"] == (H, W)  # the photo's own size, from the header
    torch.testing.assert_close(item["x"], _prep(scaled.rgb), atol=0, rtol=0)
    full = _prep(load_image(p))
    assert not torch.equal(item["x"], full)  # really the scaled path, not the full decode


def test_exact_decode_gives_the_full_decode(tmp_path):
    p = _jpeg(tmp_path / "a.jpg")
    ds, _ = as_dataset(Paths([p]), PP, keep_images=True, exact_decode=True)
    item = ds[0]
    assert isinstance(ds, UserDataset) and ds.exact_decode
    assert item["image"].shape == (H, W, 3) and item["size"] == (H, W)
    torch.testing.assert_close(item["x"], _prep(load_image(p)), atol=0, rtol=0)


def test_decoded_items_are_used_as_they_are(tmp_path):
    """A PIL image or an array the dataset made itself is never reduced (the user's object)."""
    p = _jpeg(tmp_path / "a.jpg")
    for img in (Image.open(p), load_image(p)):
        item = UserDataset([img], PP, keep_images=True)[0]
        assert item["image"].shape == (H, W, 3) and item["size"] == (H, W)
        torch.testing.assert_close(item["x"], _prep(load_image(p)), atol=0, rtol=0)


@pytest.mark.parametrize("exact", [False, True])
def test_stored_rows_and_boxes_are_in_the_photo_pixels(tmp_path, exact):
    paths = [_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(2)]
    torch.manual_seed(0)
    net = TinyCNN().eval()
    res = camlens.explain_dataset(
        net, Paths(paths), "gradcam", out=tmp_path / f"st{exact}", preprocess=PP, layer="conv2", batch_size=2,
        num_workers=0, progress=False, exact_decode=exact,
    )  # fmt: skip
    assert res.complete and not res.failed
    t = res.table
    assert set(zip(t.height, t.width)) == {(H, W)}
    ref = camlens.explain(net, paths, "gradcam", preprocess=PP, layer="conv2", exact_decode=exact)
    np.testing.assert_allclose(np.asarray(res.maps("gradcam")[:]), ref.maps.numpy(), atol=1e-5)
    boxes = np.asarray(ref.boxes(), dtype=float)
    assert boxes[..., 2].max() <= W and boxes[..., 3].max() <= H and boxes[..., 2].max() > 50  # not the 50x38 frame
