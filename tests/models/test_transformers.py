"""Transformer and hybrid model families: zoo names (torchvision, timm:), Hugging Face objects,
the automatic layer, hygiene on every family, and the CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import camlens
from camlens.base.errors import CamlensError, WeightsNotFoundError
from tests.api.test_hygiene import assert_untouched, snapshot
from tests.core.test_layout import tiny_swin, tiny_timm_vit, tiny_tv_vit


def tiny_hf_vit(num_labels: int = 3):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        num_labels=num_labels,
        id2label={i: f"thing{i}" for i in range(num_labels)},
        label2id={f"thing{i}": i for i in range(num_labels)},
    )
    return ViTForImageClassification(cfg).eval()


def tiny_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3).eval()


FAMILIES = {
    "torchvision_vit": (lambda: tiny_tv_vit().float(), 32, "encoder.layers.encoder_layer_1.ln_1"),
    "timm_vit_registers": (lambda: tiny_timm_vit(reg_tokens=4).float(), 48, "blocks.1.norm1"),
    "hf_vit": (tiny_hf_vit, 32, "vit.layers.1.layernorm_before"),
    "swin": (lambda: tiny_swin().float(), 32, "global pooling"),
    "convnext": (tiny_convnext, 32, "global pooling"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_explained_without_options_and_left_untouched(family):
    build, size, layer = FAMILIES[family]
    model = build()
    model.train()  # the user's flags: restored afterwards
    first = next(model.parameters())
    first.requires_grad_(False)
    before = snapshot(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    methods = ["gradcam", "gradcam++", "scorecam", "saliency"]
    if family in ("torchvision_vit", "timm_vit_registers", "hf_vit"):
        methods += ["attention_rollout", "generic_attention"]
    res = camlens.explain(model, x, methods, targets="top2", max_channels=4)
    for name, exp in res.items():
        assert exp.maps.shape == (2, 2, size, size) and torch.isfinite(exp.maps).all(), name
        if "features" in camlens.methods()[name].needs:
            assert layer in exp.layer
    assert res["gradcam"].maps.abs().sum() > 0
    assert_untouched(model, before)


def test_auto_layer_is_where_the_gradients_are():
    """The measurement behind the automatic layer: at the last block's output only the class token
    feeds the head, so the patch tokens' gradients (and Grad-CAM) are exactly zero; at the norm
    before the last attention they are not, and they differ between classes."""
    model = tiny_tv_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    from camlens.core.engine import ForwardPass
    from camlens.core.layers import resolve_layer

    def grads(name):
        spec = resolve_layer(model, name)
        return ForwardPass.run(
            model, x, spec, targets=[[0, 1], [0, 1]], needs=frozenset({"features", "layer_grads"})
        ).layer_grads()

    assert grads("encoder.layers.encoder_layer_1").abs().max() == 0
    g = grads("encoder.layers.encoder_layer_1.ln_1")
    # every (image, class) gradient is non-zero, and so is every token position's (summed over channels)
    assert g.abs().amax(dim=(2, 3, 4)).min() > 1e-6
    assert (g.abs().sum(dim=2) > 0).all()
    assert not torch.allclose(g[:, 0], g[:, 1])
    auto = camlens.explain(model, x, "gradcam", targets=[[0, 1], [0, 1]], relu=False)
    assert auto.layer.endswith("encoder_layer_1.ln_1")


def test_huggingface_model_object_uses_id2label():
    hf = tiny_hf_vit()
    exp = camlens.explain(hf, torch.randn(1, 3, 32, 32), "gradcam")
    assert exp.labels()[0][0].startswith("thing") and "ImageClassifierOutput" in exp.extras["output"]
    assert camlens.predict(hf, torch.randn(1, 3, 32, 32), topk=1)[0][0][1].startswith("thing")


def test_timm_names_random_and_local_checkpoint(tmp_path):
    from safetensors.torch import save_file

    m = camlens.load_model("timm:test_vit", weights="random")
    assert m.camlens.name == "timm:test_vit" and m.camlens.preprocess.size == (160, 160)
    exp = camlens.explain(m, torch.randn(1, 3, 64, 96), "gradcam")  # any resolution, non-square
    assert exp.layer.endswith("norm1") and exp.raw.shape[-2:] == (4, 6)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    again = camlens.load_model("timm:test_vit", weights=path)
    for (k, a), b in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    three = camlens.load_model("timm:test_vit", weights=path, num_classes=3)
    assert three.num_classes == 3 and three.camlens.class_names is None
    with pytest.raises(WeightsNotFoundError, match="never downloads"):
        camlens.load_model("timm:test_vit")
    with pytest.raises(CamlensError, match="timm:test_vit"):
        camlens.load_model("timm:test_vitt", weights="random")


def test_torchvision_transformer_names_are_in_the_zoo():
    names = camlens.available_models()
    for n in ("vit_b_16", "swin_t", "maxvit_t", "convnext_tiny"):
        assert n in names


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "maxvit_t", "convnext_tiny"])
def test_torchvision_families_random_at_224(name):
    model = camlens.load_model(name, weights="random")
    for mod in model.modules():  # random heads are zero-initialised in some (ViT): give them weights
        if isinstance(mod, nn.Linear) and not mod.weight.any():
            nn.init.normal_(mod.weight, std=0.02)
    before = snapshot(model)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    methods = ["gradcam"] + (["attention_rollout"] if name == "vit_b_16" else [])
    res = camlens.explain(model, x, methods)
    exp = res["gradcam"]
    assert exp.raw.shape[-2:] == ((14, 14) if name == "vit_b_16" else (7, 7))
    assert exp.raw.abs().sum() > 0
    assert ("ln_1" in exp.layer) if name == "vit_b_16" else ("global pooling" in exp.layer)
    assert_untouched(model, before)


def _photo(tmp_path):
    from PIL import Image

    from camlens.base.io import sample_image

    path = tmp_path / "photo.jpg"
    Image.fromarray(sample_image("chelsea")).save(path)
    return path


def test_cli_explain_and_layers_for_a_timm_name(tmp_path):
    from camlens.cli import main

    photo = _photo(tmp_path)
    out = tmp_path / "out"
    args = ["explain", "--model", "timm:test_vit", "--weights", "random", str(photo), "--out", str(out), "-q"]
    r = CliRunner().invoke(main, [*args, "--method", "gradcam", "--method", "attention_rollout", "--topk", "1"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"photo_{m}{s}" for m in ("gradcam", "attention_rollout") for s in ("_top1.png", ".json", ".npy")
    )
    r = CliRunner().invoke(main, ["layers", "timm:test_vit"])
    assert r.exit_code == 0, r.output
    assert "tokens: 1 prefix + 10x10" in r.output and "default layer: output of blocks.5.norm1" in r.output


@pytest.mark.slow
def test_cli_the_issue_command(tmp_path):
    from camlens.cli import main

    photo = _photo(tmp_path)
    r = CliRunner().invoke(
        main,
        ["explain", "--model", "timm:deit_tiny_patch16_224", "--weights", "random", str(photo), "--out", str(tmp_path)],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "photo_gradcam_top1.png").exists()  # CAM is skipped with a note (class-token head)


def test_hf_folder_loads_offline_and_runs_in_the_cli(tmp_path):
    from camlens.cli import main

    hf = tiny_hf_vit()
    folder = tmp_path / "tiny-vit"
    hf.save_pretrained(folder)
    m = camlens.load_model(f"hf:{folder}")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x).logits, hf(x).logits)
    assert m.camlens.class_names == ["thing0", "thing1", "thing2"] and m.camlens.preprocess.size == (32, 32)
    with pytest.raises(WeightsNotFoundError, match="never downloads"):
        camlens.load_model(f"hf:{tmp_path / 'nothing'}")
    out = tmp_path / "out"
    photo = _photo(tmp_path)
    r = CliRunner().invoke(main, ["explain", "--model", f"hf:{folder}", str(photo), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert (out / "photo_gradcam_top1.png").exists()
