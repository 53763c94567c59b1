"""Scaled JPEG decoding in the web app: an upload is decoded only as large as the page shows it, and
for each model at the smallest DCT scale that covers that model's input — the maps equal
``camlens.explain`` on the file's path (its scaled decode), ``exact_decode=True`` gives the full
decode's, and the sizes and boxes stay in the photo's pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.base.localization import localize, scale_boxes
from camlens.models.card import ModelCard, attach_card
from camlens.models.preprocess import Preprocess
from camlens.serve.render import summary
from camlens.serve.service import Limits, ModelPool, Service
from tests.conftest import TinyCNN

PP = Preprocess(size=(32, 32))
H, W = 900, 1200


def _jpeg_bytes() -> bytes:
    rng = np.random.default_rng(3)
    small = (rng.random((H // 30, W // 30, 3)) * 255).astype(np.uint8)
    big = Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    data = _jpeg_bytes()
    path = tmp_path_factory.mktemp("up") / "photo.jpg"
    path.write_bytes(data)
    torch.manual_seed(0)
    net = attach_card(TinyCNN().eval(), ModelCard("tiny", PP, [f"c{i}" for i in range(4)], layer="conv2"))
    return data, str(path), net


def _service(net, exact: bool = False) -> Service:
    return Service(ModelPool({"tiny": net}), Limits(display_side=300), exact_decode=exact)


def test_an_upload_is_decoded_as_large_as_the_page_shows_it(photo):
    data, _, net = photo
    e = _service(net).upload(data, "photo.jpg")
    assert e.rgb.shape[:2] == (225, 300)  # 1/4 DCT scale: the smallest covering 300 px on the long side
    assert e.display.shape[:2] == (225, 300)
    assert (e.info()["width"], e.info()["height"]) == (W, H)  # the photo's own size, from the header
    full = _service(net, exact=True).upload(data, "photo.jpg")
    assert full.rgb.shape[:2] == (H, W) and full.display.shape[:2] == (225, 300)


@pytest.mark.parametrize("exact", [False, True])
def test_maps_equal_explain_on_the_path_and_boxes_are_in_photo_pixels(photo, exact):
    data, path, net = photo
    svc = _service(net, exact)
    iid = svc.upload(data, "photo.jpg").id
    res = svc.explain(iid, "tiny", ["gradcam"], classes=[1, 2])
    ref = camlens.explain(net, path, "gradcam", targets=[[1, 2]], exact_decode=exact)
    other = camlens.explain(net, path, "gradcam", targets=[[1, 2]], exact_decode=not exact)
    assert not torch.allclose(ref.maps, other.maps, atol=1e-6)  # the two decodes give different maps
    for j, c in enumerate((1, 2)):
        np.testing.assert_allclose(res.panels[("gradcam", c)].map, ref.maps[0, j].numpy(), rtol=1e-5, atol=1e-7)
    s = summary(res, 0.3)
    assert s["image"]["size"] == [H, W]
    assert len(s["maps"]) == 2
    for item in s["maps"]:
        m = res.panels[(item["method"], item["class"])].map
        assert item["box"] == scale_boxes(localize(m, 0.3), m.shape, (H, W)).tolist()
