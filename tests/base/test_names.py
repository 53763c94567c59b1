"""One stem rule for every output, and the two box IoUs (NumPy for evaluation, torch for target
matching) agreeing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camlens.base.localization import iou
from camlens.base.names import output_stems
from camlens.targets import box_iou


def test_one_stem_rule_for_explain_evaluate_and_the_store():
    from camlens.cli import common
    from camlens.cli import evaluate as ev
    from camlens.pipeline import sources

    paths = ["a/cat.jpg", "b/cat.jpg", "dog.png", "skimage:coffee", "x/my photo.jpg"]
    want = ["a_cat", "b_cat", "dog", "coffee", "my_photo"]
    assert output_stems(paths) == want
    assert common.output_stems is output_stems and sources.output_stems is output_stems
    assert ev.output_stems is output_stems  # evaluate names images as explain names its files
    assert not hasattr(ev, "_image_names")


def test_evaluate_names_images_like_explain(tmp_path):
    """Two photos with one stem in two folders: evaluate's rows are named a_cat / b_cat, the names
    explain gives their files (it used to write a/cat and b/cat path-like names)."""
    from PIL import Image

    from camlens.cli import evaluate as ev

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / d / "cat.png")
    images, names, failed = ev._images((str(tmp_path / "a" / "cat.png"), str(tmp_path / "b" / "cat.png")))
    assert names == ["a_cat", "b_cat"] and failed == [] and len(images) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_iou_and_torch_box_iou_agree(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 50, (12, 2), generator=g)
    wh = torch.randint(0, 30, (12, 2), generator=g)  # some empty (zero width or height)
    boxes = torch.cat([xy, xy + wh], 1).float()
    a, b = boxes[:5], boxes[5:]
    want = box_iou(a, b).numpy()
    got = iou(a.numpy()[:, None], b.numpy()[None])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert (got > 0).any() and (got == 0).any()  # the draw has overlaps and disjoint pairs
