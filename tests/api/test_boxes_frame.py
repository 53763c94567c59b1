"""``Explanation.boxes()`` in original-image pixels when the images are known (issue 12 item 2)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import camlens
from camlens.base.errors import InputError
from camlens.base.localization import Boxes, localize, scale_boxes


def test_boxes_in_image_pixels_match_the_saved_summary(lite0, cat, tmp_path):
    exp = camlens.explain(lite0, cat, method="gradcam", targets="top2")
    b = exp.boxes()
    assert isinstance(b, Boxes) and b.frame == "image" and b.sizes == [cat.shape[:2]]
    inp = exp.boxes(frame="input")
    assert inp.frame == "input" and inp.sizes == [(224, 224)]
    np.testing.assert_array_equal(inp, localize(exp.maps))
    np.testing.assert_array_equal(b[0], scale_boxes(inp[0], (224, 224), cat.shape[:2]))
    # the cat fills most of the photo: the image box is wider than the 224-px frame allows
    assert b[0, 0, 2] > 224 and (b[..., 0::2] <= cat.shape[1]).all() and (b[..., 1::2] <= cat.shape[0]).all()
    # the same boxes as the JSON summary (what the CLI reports)
    (p,) = [q for q in exp.save(tmp_path, formats="json")]
    assert json.loads(p.read_text())["boxes"] == np.asarray(b[0]).tolist()


def test_boxes_of_tensor_inputs_are_in_input_pixels(tiny, tiny_x):
    exp = camlens.explain(tiny, tiny_x)
    b = exp.boxes()
    assert b.frame == "input" and b.sizes == [(12, 12)] * 3
    np.testing.assert_array_equal(b, localize(exp.maps))
    with pytest.raises(InputError, match="need the original images.*frame='input'"):
        exp.boxes(frame="image")
    with pytest.raises(InputError, match="frame must be"):
        exp.boxes(frame="pixels")


def test_boxes_array_keeps_frame_through_slicing_and_pickle(tiny):
    imgs = [np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)] * 2
    exp = camlens.explain(tiny.float(), imgs)
    b = exp.boxes(threshold=0.5, mode="all")
    assert b.ndim == 4 and b.frame == "image"
    assert b[0].frame == "image"
    c = pickle.loads(pickle.dumps(b))
    assert c.frame == "image" and c.sizes == [(30, 50), (30, 50)]
    np.testing.assert_array_equal(c, b)
    assert torch.as_tensor(np.asarray(b)).shape == b.shape
