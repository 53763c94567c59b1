"""Decode only what the model sees: JPEGs at the smallest DCT scale that covers the preprocessing's
input, other formats box-reduced, EXIF orientation kept, maps and boxes in the photo's own pixels,
and the bound the scaled decode keeps to the full decode (measured by ``benchmarks/decode.py``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import camlens
from camlens.base.io import SCALED_DECODE_MAD, decode_image, load_image, sample_image
from camlens.models.preprocess import EFFICIENTNET_LITE, IMAGENET, Preprocess
from camlens.pipeline.sources import ImageFiles, records_for


def _gradient(h: int, w: int) -> np.ndarray:
    """An image whose every row and column differs (a flip or a rotation shows)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([255 * x / w, 255 * y / h, 128 + 0 * x], -1).round().astype(np.uint8)


def _save(arr: np.ndarray, path, orientation: int = 1, **kw):
    im = Image.fromarray(arr)
    ex = im.getexif()
    if orientation != 1:
        ex[0x0112] = orientation
    im.save(path, exif=ex.tobytes(), **kw)
    return path


def test_min_decode_size_of_each_resize_mode():
    assert IMAGENET.min_decode_size((3024, 4032)) == (224, 224)
    assert IMAGENET.min_decode_size((200, 4032)) == (224, 224)  # draft then keeps 200 rows: scale 1
    assert IMAGENET.min_decode_size((224, 224)) is None  # nothing to gain
    crop = Preprocess(resize="center_crop")
    # shorter side to 224: 3024 -> 224, 4032 -> 298.67 -> 299
    assert crop.min_decode_size((3024, 4032)) == (224, math.ceil(4032 * 224 / 3024))
    assert Preprocess(resize="none").min_decode_size((3024, 4032)) is None


@pytest.mark.parametrize("w,h", [(1900, 1000), (2000, 1500), (500, 450), (1000, 230)])
def test_jpeg_decoded_at_the_largest_scale_that_covers_the_input(tmp_path, w, h):
    p = _save(_gradient(h, w), tmp_path / "a.jpg", quality=90)
    d = decode_image(p, IMAGENET.min_decode_size)
    # an independent statement of the rule: the largest s in 1, 2, 4, 8 with ceil(side / s) >= 224
    s = max(k for k in (1, 2, 4, 8) if math.ceil(w / k) >= 224 and math.ceil(h / k) >= 224)
    assert d.rgb.shape == (math.ceil(h / s), math.ceil(w / s), 3)
    assert d.size == (h, w)
    assert d.reduced == (s > 1)
    assert load_image(p).shape == (h, w, 3)  # load_image decodes in full


@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 5])
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_kept_by_the_scaled_decode(tmp_path, orientation, suffix):
    arr = _gradient(1200, 1600)
    p = _save(arr, tmp_path / f"a{suffix}", orientation, **({"quality": 95} if suffix == ".jpg" else {}))
    full = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    d = decode_image(p, IMAGENET.min_decode_size)
    assert d.size == full.shape[:2]
    assert d.reduced
    # the reduced image is the upright full image made smaller: compare at the reduced size
    ref = np.asarray(Image.fromarray(full).resize(d.rgb.shape[1::-1], Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(ref - d.rgb).mean() < 3.0  # a wrong orientation differs by ~60 grey levels here


def test_png_reduce_is_a_box_average_keeping_twice_the_input_size(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (1350, 1800, 3), dtype=np.uint8)
    p = _save(arr, tmp_path / "a.png")
    d = decode_image(p, IMAGENET.min_decode_size)
    f = min(1800 // 448, 1350 // 448)  # 3: the result keeps at least 2 x 224 pixels a side
    assert d.rgb.shape == (1350 // f, 1800 // f, 3)
    arr = arr[: 1350 // f * f, : 1800 // f * f]
    blocks = arr.reshape(1350 // f, f, 1800 // f, f, 3).astype(np.float64).mean((1, 3))
    assert np.abs(blocks - d.rgb).max() <= 1.0  # rounding only


def test_palette_and_16_bit_images_are_decoded_in_full(tmp_path):
    p = tmp_path / "p.png"
    Image.fromarray(_gradient(900, 1200)).convert("P").save(p)
    d = decode_image(p, IMAGENET.min_decode_size)
    assert d.rgb.shape == (900, 1200, 3) and d.size == (900, 1200)


def test_exact_decode_and_pil_or_array_inputs_are_never_reduced(tmp_path):
    p = _save(_gradient(1500, 2000), tmp_path / "a.jpg", quality=90)
    assert decode_image(p).rgb.shape == (1500, 2000, 3)
    img = Image.open(p)
    assert decode_image(img, IMAGENET.min_decode_size).rgb.shape == (1500, 2000, 3)
    assert img.size == (2000, 1500)  # the caller's image untouched (no draft applied to it)


def test_explain_keeps_boxes_and_summaries_in_the_photo_pixels(lite0, tmp_path):
    big = np.asarray(Image.fromarray(sample_image("chelsea")).resize((1000, 800), Image.Resampling.BICUBIC))
    p = _save(big, tmp_path / "cat.jpg", quality=90)
    scaled = camlens.explain(lite0, str(p), "gradcam")
    exact = camlens.explain(lite0, str(p), "gradcam", exact_decode=True)
    assert scaled.images[0].shape[:2] == (400, 500)  # 1/2 scale: the largest that covers 224
    assert exact.images[0].shape[:2] == (800, 1000)
    assert scaled.extras["image_sizes"] == [(800, 1000)] and "image_sizes" not in exact.extras
    b_s, b_e = scaled.boxes(), exact.boxes()
    assert b_s.sizes == b_e.sizes == [(800, 1000)]
    assert np.abs(np.asarray(b_s, dtype=float) - np.asarray(b_e, dtype=float)).max() <= 0.02 * 1000
    written = scaled.save(tmp_path / "out", formats=("json", "npy", "png"), map_size="photo")
    summary = json.loads(next(w for w in written if w.suffix == ".json").read_text())
    assert summary["image_size"] == [800, 1000]
    assert summary["boxes"] == np.asarray(b_s).tolist()[0]
    assert np.load(next(w for w in written if w.suffix == ".npy")).shape[-2:] == (800, 1000)
    png = Image.open(next(w for w in written if w.suffix == ".png"))
    assert png.size[0] < 1000  # the overlay is drawn on the decoded image


def test_pipeline_items_carry_the_photo_size(tmp_path):
    big = np.asarray(Image.fromarray(sample_image("coffee")).resize((1600, 1200), Image.Resampling.BICUBIC))
    p = _save(big, tmp_path / "c.jpg", quality=90)
    recs = records_for([(str(p), None)])
    scaled = ImageFiles(recs, EFFICIENTNET_LITE, keep_images=True)[0]
    exact = ImageFiles(recs, EFFICIENTNET_LITE, keep_images=True, exact_decode=True)[0]
    assert scaled["size"] == exact["size"] == (1200, 1600)
    assert scaled["image"].shape[:2] == (300, 400) and exact["image"].shape[:2] == (1200, 1600)
    std = torch.tensor(EFFICIENTNET_LITE.std)[:, None, None]
    assert float(((scaled["x"] - exact["x"]) * std).abs().mean()) < SCALED_DECODE_MAD


@pytest.mark.slow
def test_scaled_decode_bound_on_phone_photos(lite0, tmp_path):
    """The bundled photos as 4032x3024 JPEGs (quality 90): the preprocessed tensor within
    SCALED_DECODE_MAD of the full decode's, the same top-1 class, Grad-CAM maps with Pearson >= 0.99."""
    from benchmarks.decode import phone_photo, preprocessed
    from benchmarks.tasks import pearson_whole as pearson

    pp = EFFICIENTNET_LITE
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        p = phone_photo(name, tmp_path / f"{name}.jpg")
        assert float((preprocessed(p, pp, True) - preprocessed(p, pp, False)).abs().mean()) < SCALED_DECODE_MAD
        full = camlens.explain(lite0, str(p), "gradcam", exact_decode=True)
        scaled = camlens.explain(lite0, str(p), "gradcam")
        assert scaled.images[0].shape[:2] == (378, 504)  # 1/8 scale
        assert int(full.classes[0, 0]) == int(scaled.classes[0, 0])
        assert pearson(full.maps, scaled.maps) >= 0.99


def test_localize_draws_photo_pixel_boxes_on_a_scaled_decode(tmp_path):
    from camlens.cli.localize import _draw

    small = np.zeros((100, 150, 3), dtype=np.uint8)  # a 1/4-scale decode of a 400x600 photo
    rec = {"image_size": [400, 600], "boxes": [{"box": [200, 100, 400, 300], "class_name": "cat", "prob": 0.9}]}
    drawn = np.asarray(Image.open(_draw(small, rec, tmp_path / "b.png")))
    ys, xs = np.nonzero(drawn.any(2))
    assert 48 <= xs.min() <= 52 and 98 <= xs.max() <= 102  # x 200..400 -> 50..100
    assert 23 <= ys.min() <= 27 and 73 <= ys.max() <= 77  # y 100..300 -> 25..75
