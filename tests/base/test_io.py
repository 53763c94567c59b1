"""Image loading, preprocessing presets, the zoo and Explanation helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.api.explanation import minmax
from camlens.base.errors import CheckpointError, ImageLoadError, InputError
from camlens.base.io import load_image
from camlens.models import CAFFE_BGR, EFFICIENTNET_LITE, IMAGENET, Preprocess, load_weights_file


@pytest.fixture
def rgb():
    g = np.random.default_rng(0)
    return g.integers(0, 256, (20, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16", "1"])
def test_modes_are_converted_to_rgb(tmp_path, rgb, mode):
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if mode == "I;16":
        np.testing.assert_array_equal(out[..., 1], rgb[..., 0])  # 16-bit scaled back to 8-bit exactly
    if mode == "L":
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_arrays_grayscale_float_and_16bit(rgb):
    assert load_image(rgb[..., 0]).shape == (20, 30, 3)
    np.testing.assert_array_equal(load_image(rgb.astype(np.float32) / 255), rgb)
    np.testing.assert_array_equal(load_image(rgb.astype(np.uint16) * 257), rgb)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(rgb.astype(np.float32))  # floats in 0..255 are ambiguous


def test_corrupt_truncated_missing_and_bomb(tmp_path, rgb, monkeypatch):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        load_image(bad)
    good = tmp_path / "good.png"
    Image.fromarray(rgb).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="trunc.png"):
        load_image(trunc)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    monkeypatch.setattr("camlens.base.io.MAX_PIXELS", 100)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(good)


def test_preprocess_math(rgb):
    x = IMAGENET([rgb])
    assert x.shape == (1, 3, 224, 224)
    flat = np.full((8, 8, 3), (10, 20, 30), dtype=np.uint8)
    x = Preprocess(size=(8, 8))([flat])
    expected = (np.array([10, 20, 30]) / 255 - np.array(IMAGENET.mean)) / np.array(IMAGENET.std)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), expected, rtol=1e-5)
    # Caffe-style: BGR order, 0..255, mean subtraction only (the notebooks' VGG16)
    x = Preprocess(size=(8, 8), mean=CAFFE_BGR.mean, std=CAFFE_BGR.std, scale=1.0, channel_order="BGR")([flat])
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-5)
    x = EFFICIENTNET_LITE([flat])
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), (np.array([10, 20, 30]) - 127) / 128, rtol=1e-5)


def test_center_crop_vs_stretch():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[:, :40] = 255  # a white band on the left, outside the central square
    stretch = Preprocess(size=(10, 10), mean=(0, 0, 0), std=(1, 1, 1))([img])
    crop = Preprocess(size=(10, 10), mean=(0, 0, 0), std=(1, 1, 1), resize="center_crop")([img])
    assert stretch[0, 0, 5, 0] > 0.99 and stretch[0, 0, 5, 9] < 0.01  # whole image kept
    assert crop[0, 0].max() < 0.01  # the central square has no white


def test_zoo_card_and_random_weights(lite0):
    card = lite0.camlens
    assert card.name == "efficientnet_lite0" and len(card.class_names) == 1000
    assert card.class_names[285] == "Egyptian cat" and not lite0.training
    r = camlens.load_model("efficientnet_lite0", weights="random")
    assert not torch.equal(r._fc.weight, lite0._fc.weight)
    small = camlens.load_model("efficientnet_lite0", num_classes=3)
    assert small._fc.out_features == 3 and small.camlens.class_names is None
    assert "resnet50" in camlens.available_models()


@pytest.mark.slow
def test_weights_files_round_trip_and_tamper(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = camlens.load_model("resnet18", weights="random")
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": src.state_dict()}, pth)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    for path in (pth, st):
        m = camlens.load_model("resnet18", weights=str(path))
        assert torch.equal(m.fc.weight, src.fc.weight) and m.camlens.class_names[0] == "tench"
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights_file(src, trunc)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_weights_file(src, evil)
    other = camlens.load_model("resnet34", weights="random")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights_file(other, pth)


def test_minmax_normalization():
    m = torch.tensor([[[0.0, 2.0], [4.0, 1.0]], [[3.0, 3.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    out = minmax(m)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    assert torch.equal(out[1], torch.zeros(2, 2)) and torch.equal(out[2], torch.zeros(2, 2))
    nan = minmax(torch.tensor([[[float("nan"), 1.0], [0.0, 2.0]]]))
    assert not torch.isnan(nan).any()


def test_explanation_helpers(tiny, tiny_x):
    e = camlens.explain(tiny, tiny_x, method="gradcam", targets="top2", class_names=list("abcd"))
    n = e.normalized()
    assert n.shape == e.maps.shape and n.min() >= 0 and n.max() <= 1
    assert e.labels()[0] == ["abcd"[c] for c in e.classes[0].tolist()]
    sub = e.select([2, 0])
    torch.testing.assert_close(sub.maps, e.maps[[2, 0]])
    assert sub.sources == ["image2", "image0"] and "gradcam" in repr(e)
    probs = torch.softmax(tiny(tiny_x), 1).gather(1, e.classes).float()
    torch.testing.assert_close(e.probs, probs)


def test_exif_orientation_is_applied(tmp_path):
    """Issue 17.5: a JPEG stored sideways with Orientation=6 ("rotate 90° clockwise to display") is
    loaded upright. Oracle: the stored pixels rotated by numpy."""
    from PIL import Image

    from camlens.base.io import load_image

    stored = np.zeros((40, 60, 3), np.uint8)  # stored 60 wide x 40 high
    stored[:, :20] = (255, 0, 0)  # a red band on the stored left
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "six.jpg", exif=exif.tobytes(), quality=95)
    im.save(tmp_path / "plain.jpg", quality=95)
    up = load_image(tmp_path / "six.jpg")
    assert up.shape == (60, 40, 3)  # displayed: 40 wide x 60 high
    expect = np.rot90(stored, k=-1)  # 90° clockwise: the stored left band becomes the top
    assert np.abs(up.astype(int) - expect.astype(int)).mean() < 4
    assert up[:15].mean(axis=(0, 1))[0] > 200 and up[-15:].mean(axis=(0, 1))[0] < 60
    assert load_image(tmp_path / "plain.jpg").shape == (40, 60, 3)
    with Image.open(tmp_path / "six.jpg") as pil:  # a PIL image with the tag: the same
        assert load_image(pil).shape == (60, 40, 3)
