"""Issue 28, item 10: unusual inputs are clear errors or correct results, never silent - NaN /
negative int8 / complex image arrays, guided backprop through ReLUs written as clamp(min=0), a
TorchScript module on the hook path, empty / closed / truncated PIL images, inputs on ``meta``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import camlens
from camlens.base.errors import ImageLoadError, InputError, MethodError, NonFiniteError


def _net(act=None) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 4)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.act = act or F.relu

        def forward(self, x):
            x = self.act(self.c1(x))
            x = self.act(self.c2(x))
            return self.fc(x.mean((2, 3)))

    return Net().eval()


X = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ arrays
def test_nan_image_array_is_a_nonfinite_error():
    a = np.full((16, 16, 3), np.nan, dtype=np.float32)
    with pytest.raises(NonFiniteError, match=r"input image array holds 768 NaN or Inf"):
        camlens.explain(_net(), a, "gradcam", layer="c2")
    a = np.zeros((16, 16, 3))
    a[3, 4, 1] = np.inf
    with pytest.raises(NonFiniteError, match="1 NaN or Inf"):
        camlens.predict(_net(), a)


def test_negative_int8_image_array_is_refused_not_clipped():
    a = np.full((16, 16, 3), -5, dtype=np.int8)
    with pytest.raises(InputError, match=r"int8 has negative values \(min -5\)"):
        camlens.explain(_net(), a, "gradcam", layer="c2")
    # non-negative signed integers keep working, as uint8 of the same values
    pos = np.arange(16 * 16 * 3).reshape(16, 16, 3).astype(np.int16) % 200
    np.testing.assert_array_equal(camlens.base.io.load_image(pos), camlens.base.io.load_image(pos.astype(np.uint8)))


def test_complex_and_non_numeric_image_arrays_are_refused():
    with pytest.raises(InputError, match="complex dtype complex64"):
        camlens.explain(_net(), np.zeros((16, 16, 3), np.complex64), "gradcam", layer="c2")
    with pytest.raises(InputError, match="dtype <U1"):
        camlens.base.io.load_image(np.full((4, 4, 3), "a"))


# ------------------------------------------------------------------ ReLU written as a clamp
@pytest.mark.parametrize(
    "act",
    [
        lambda x: torch.clamp(x, min=0),
        lambda x: x.clamp(0),
        lambda x: x.clamp_min(0),
        lambda x: torch.clamp_min(x, 0),
        lambda x: x.clip(min=0),
        lambda x: x.clamp_(min=0),
        lambda x: x.clamp_min_(0),
    ],
    ids=["torch.clamp", "clamp", "clamp_min", "torch.clamp_min", "clip", "clamp_", "clamp_min_"],
)
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_guided_and_deconvnet_cover_relu_written_as_clamp(act, method):
    """A network whose ReLUs are clamps gives exactly the maps of the same network with F.relu, and
    guided backprop differs from the plain gradient (was: the plain gradient or a refusal)."""
    want = camlens.explain(_net(), X, method, targets=[1, 2])
    got = camlens.explain(_net(act), X, method, targets=[1, 2])
    torch.testing.assert_close(got.raw, want.raw, rtol=1e-5, atol=1e-7)
    plain = camlens.explain(_net(act), X, "saliency", targets=[1, 2])
    assert not torch.allclose(got.raw, plain.raw, atol=1e-6)


def test_clipped_clamp_is_relu6():
    want = camlens.explain(_net(F.relu6), X, "guided_backprop")
    got = camlens.explain(_net(lambda x: torch.clip(x, 0, 6)), X, "guided_backprop")
    torch.testing.assert_close(got.raw, want.raw, rtol=1e-5, atol=1e-7)


def test_clamp_with_another_lower_bound_is_not_a_relu():
    from camlens.core.rules import relu_rules

    x = torch.randn(5, requires_grad=True)
    with relu_rules() as sw:
        x.clamp(min=-1)
        x.clamp(min=0, max=-1)
        x.clamp(min=torch.zeros(5))
    assert sw.relu_calls == 0
    with relu_rules() as sw:
        x.clamp(min=0)
    assert sw.kinds == {"clamp": 1}


# ------------------------------------------------------------------ TorchScript
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_torchscript_module_on_the_hook_path_is_a_clear_error():
    scripted = torch.jit.trace(_net(), X)
    with pytest.raises(MethodError, match=r"gradcam need\(s\) hooks.*TorchScript.*occlusion.*saliency"):
        camlens.explain(scripted, X, "gradcam", layer="c2")
    with pytest.raises(MethodError, match="guided_backprop need"):
        camlens.explain(scripted, X, ["saliency", "guided_backprop"])
    e = camlens.explain(scripted, X, "saliency")  # the hook-free path still works
    torch.testing.assert_close(e.raw, camlens.explain(_net(), X, "saliency").raw)


# ------------------------------------------------------------------ PIL images
def test_empty_pil_image_is_a_clear_error():
    with pytest.raises(InputError, match=r"empty \(0x0 pixels\)"):
        camlens.explain(_net(), Image.new("RGB", (0, 0)), "gradcam", layer="c2")


def test_closed_pil_image_is_a_clear_error():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.close()
    with pytest.raises(ImageLoadError, match="is closed"):
        camlens.explain(_net(), img, "gradcam", layer="c2")


def test_lazily_opened_truncated_pil_image_is_an_image_load_error(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "t.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    img = Image.open(p)  # lazy: decoding happens in camlens
    with pytest.raises(ImageLoadError, match=r"t\.jpg: cannot decode image.*truncated"):
        camlens.explain(_net(), img, "gradcam", layer="c2")


# ------------------------------------------------------------------ meta device
def test_input_on_the_meta_device_is_a_clear_error(tmp_path):
    x = torch.empty(2, 3, 10, 10, device="meta")
    with pytest.raises(InputError, match="'meta' device"):
        camlens.explain(_net(), x, "gradcam", layer="c2")
    with pytest.raises(InputError, match="'meta' device"):
        camlens.predict(_net(), x)
    with pytest.raises(InputError, match="'meta' device"):
        camlens.explain(_net(), [x[0], x[1]], "gradcam", layer="c2")


def test_explain_dataset_reports_meta_items_as_failed(tmp_path):
    from camlens.pipeline.run import explain_dataset

    class Meta(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.empty(3, 10, 10, device="meta") if i == 1 else X[0]

    r = explain_dataset(_net(), Meta(), "gradcam", out=tmp_path / "s", layer="c2", progress=False, num_workers=0)
    assert r.stats.computed == 1
    assert [f["image_id"] for f in r.stats.failed] == [1] and "'meta' device" in r.stats.failed[0]["error"]


# ------------------------------------------------------------------ transformers at another size (item 9)
def _tiny_hf_vit():
    from tests.models.test_transformers import tiny_hf_vit

    return tiny_hf_vit()


@pytest.mark.parametrize(
    "method, size",
    [
        ("gradcam", (48, 48)),
        ("gradcam", (33, 32)),
        ("attention_rollout", (40, 32)),
        ("generic_attention", (40, 32)),
    ],
)
def test_hf_vit_at_another_size_runs_with_interpolated_position_embeddings(size, method):
    """Was: ValueError "Input image size (48*48) doesn't match model (32*32)". The scores are the
    model's own logits with interpolate_pos_encoding=True, and no hook is left on the model."""
    pytest.importorskip("transformers")
    hf = _tiny_hf_vit()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    e = camlens.explain(hf, x, method, targets=[0, 2])
    with torch.no_grad():
        want = hf(x, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(e.scores[:, 0], want[[0, 1], [0, 2]], rtol=1e-5, atol=1e-6)
    assert e.maps.shape == (2, 1, *size) and bool(torch.isfinite(e.maps).all())
    assert "interpolate_pos_encoding=True" in e.extras["input_size"] and "32x32" in e.extras["input_size"]
    assert not hf._forward_pre_hooks and not any(m._forward_hooks for m in hf.modules())
    # the model's own size needs nothing
    assert "input_size" not in camlens.explain(hf, torch.randn(1, 3, 32, 32), method).extras
    p = camlens.predict(hf, x, topk=1)
    assert [r[0][0] for r in p] == want.argmax(1).tolist()


def test_hf_vit_wrapped_or_one_channel_is_a_clear_error():
    pytest.importorskip("transformers")
    hf = _tiny_hf_vit()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = hf

        def forward(self, x):
            return self.inner(x).logits

    with pytest.raises(InputError, match=r"built for 32x32 images.*48x48.*interpolate_pos_encoding=True in your"):
        camlens.explain(Wrapper(), torch.randn(1, 3, 48, 48), "gradcam", layer="inner.vit.layers.1.layernorm_before")
    with pytest.raises(InputError, match=r"takes 3-channel images but the input has 1 channel.*expand"):
        camlens.explain(hf, torch.randn(1, 1, 32, 32), "gradcam")


def test_timm_and_torchvision_vits_fixed_to_one_size_name_it():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    from tests.core.test_layout import tiny_timm_vit, tiny_tv_vit

    torch.manual_seed(0)
    fixed = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4).eval()
    with pytest.raises(InputError, match=r"timm vision transformer takes 32x32 images only.*48x40.*dynamic_img_size"):
        camlens.explain(fixed, torch.randn(1, 3, 48, 40), "gradcam")
    with pytest.raises(InputError, match=r"torchvision vision transformer takes 32x32 images only.*image_size="):
        camlens.explain(tiny_tv_vit().float(), torch.randn(1, 3, 48, 40), "attention_rollout")
    with pytest.raises(InputError, match=r"torchvision vision transformer takes 32x32"):
        camlens.predict(tiny_tv_vit().float(), torch.randn(1, 3, 40, 40))
    dyn = tiny_timm_vit().float()  # dynamic_img_size=True: any multiple of the patch size
    assert camlens.explain(dyn, torch.randn(1, 3, 48, 40), "gradcam").maps.shape == (1, 1, 48, 40)
    with pytest.raises(InputError, match=r"multiples of its 8x8 patches.*36x32.*resize it to 32x32"):
        camlens.explain(dyn, torch.randn(1, 3, 36, 32), "gradcam")


def test_hf_convnext_config_image_size_is_not_a_constraint():
    """ConvNextConfig names image_size=224 but has no position embeddings: any size runs as before."""
    pytest.importorskip("transformers")
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from camlens.models.input_size import size_rule

    torch.manual_seed(0)
    cfg = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=32)
    m = ConvNextForImageClassification(cfg).eval()
    assert size_rule(m) is None
    assert camlens.explain(m, torch.randn(1, 3, 48, 40), "gradcam").maps.shape == (1, 1, 48, 40)
