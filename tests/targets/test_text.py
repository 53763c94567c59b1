"""Text targets and zero-shot classification on image–text models (CLIP, SigLIP, OpenCLIP).

Everything offline on tiny random models built from configs and a word-level tokenizer built here.
Oracles: the Text scores are the model's own ``logits_per_image``; Grad-CAM for a prompt equals a
plain-autograd Grad-CAM of ``logits_per_image[:, k]`` through the unwrapped model; a negative
prompt is the difference of two scores; the zero-shot classifier's top-k is computed by hand from
the model's embeddings.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import camlens
from camlens.base.errors import CamlensError, TargetError
from camlens.models.imagetext import ImageText, ZeroShotClassifier, zero_shot
from camlens.targets import Text
from tests.conftest import TinyCNN

transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "dog", "cat"]
VOCAB = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
MAX_LEN = 16


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=MAX_LEN,
    )


TEXT = dict(
    vocab_size=len(VOCAB),
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=MAX_LEN,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
VISION = dict(
    image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
)


def tiny_clip():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=8)
    return transformers.CLIPModel(cfg).eval()


def tiny_siglip():
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    return transformers.SiglipModel(cfg).eval()


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


IDS = torch.tensor([[2, 7, 9, 3, 0], [2, 8, 10, 12, 3]])
MASK = (IDS != 0).long()


def test_text_scores_are_clip_logits_per_image():
    clip = tiny_clip()
    x = _images()
    ref = clip(input_ids=IDS, attention_mask=MASK, pixel_values=x).logits_per_image
    exp = camlens.explain(clip, x, "gradcam", targets=Text(input_ids=IDS, attention_mask=MASK))
    assert exp.maps.shape == (2, 2, 32, 32)
    torch.testing.assert_close(exp.scores, ref.detach(), rtol=1e-5, atol=1e-5)
    assert exp.extras["prompts"] == ["token ids row 0", "token ids row 1"]


def test_text_scores_are_siglip_logits():
    sig = tiny_siglip()
    x = _images()
    with torch.no_grad():  # initialized to 0: give the score a bias to get right
        sig.logit_bias.fill_(-1.5)
    ids = torch.tensor([[2, 7, 9, 3, 0, 0, 0, 0], [2, 8, 10, 12, 3, 0, 0, 0]])  # SigLIP: padded, no mask
    ref = sig(input_ids=ids, pixel_values=x).logits_per_image
    exp = camlens.explain(sig, x, "gradcam", targets=Text(input_ids=ids))
    torch.testing.assert_close(exp.scores, ref.detach(), rtol=1e-5, atol=1e-5)
    assert sig.logit_bias.abs().item() > 1e-3  # the bias is part of the score that was compared


def _gradcam_reference(clip, x: torch.Tensor, scores_of) -> torch.Tensor:
    """Grad-CAM at the last block's first norm, by plain autograd on the unwrapped model."""
    layer = clip.vision_model.encoder.layers[-1].layer_norm1
    box: dict[str, torch.Tensor] = {}
    h = layer.register_forward_hook(lambda m, i, o: box.update(A=o))
    try:
        s = scores_of(x)  # (N, K)
    finally:
        h.remove()
    A = box["A"]
    maps = []
    for k in range(s.shape[1]):
        (G,) = torch.autograd.grad(s[:, k].sum(), A, retain_graph=True)
        a, g = A[:, 1:].detach(), G[:, 1:]  # the class token dropped: 16 patch tokens, a 4x4 grid
        a = a.reshape(len(x), 4, 4, -1).permute(0, 3, 1, 2)
        g = g.reshape(len(x), 4, 4, -1).permute(0, 3, 1, 2)
        maps.append(torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1)))
    return torch.stack(maps, 1)


def test_gradcam_for_a_prompt_equals_autograd_reference_and_text_tower_untouched():
    clip = tiny_clip()
    x = _images()
    before = {n: p.detach().clone() for n, p in clip.text_model.named_parameters()}
    calls = []
    h = clip.text_model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        exp = camlens.explain(clip, x, "gradcam", targets=Text(input_ids=IDS, attention_mask=MASK))
        camlens.explain(clip, x, "scorecam", targets=Text(input_ids=IDS, attention_mask=MASK), max_channels=4)
    finally:
        h.remove()
    assert len(calls) == 2  # once per call (the text is embedded when the target is bound), not per forward
    ref = _gradcam_reference(
        clip, x, lambda t: clip(input_ids=IDS, attention_mask=MASK, pixel_values=t).logits_per_image
    )
    torch.testing.assert_close(exp.raw, ref, rtol=1e-4, atol=1e-6)
    assert exp.raw.abs().max() > 1e-4
    assert "1 prefix token(s) dropped" in exp.extras["layout"]
    for n, p in clip.text_model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert all(p.grad is None for p in clip.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in clip.modules()) == 0


def test_prompts_templates_and_negative_prompt_is_a_difference():
    clip = tiny_clip()
    tok = tiny_tokenizer()
    model = ImageText(clip, tok)
    x = _images()

    def logits(prompts):
        enc = tok(prompts, padding=True, return_tensors="pt")
        return clip(**enc, pixel_values=x).logits_per_image.detach()

    pos = camlens.explain(model, x, "gradcam", targets=Text(["red circle", "blue square"], template="a photo of {}"))
    torch.testing.assert_close(
        pos.scores, logits(["a photo of red circle", "a photo of blue square"]), rtol=1e-5, atol=1e-5
    )
    assert pos.extras["prompts"] == ["a photo of red circle", "a photo of blue square"]
    neg = camlens.explain(model, x, "gradcam", targets=Text("red circle", minus="green triangle"))
    want = logits(["red circle"]) - logits(["green triangle"])
    torch.testing.assert_close(neg.scores, want, rtol=1e-5, atol=1e-5)
    ref = _gradcam_reference(clip, x, lambda t: _diff_logits(clip, tok, t))
    torch.testing.assert_close(neg.raw, ref, rtol=1e-4, atol=1e-6)


def _diff_logits(clip, tok, x):
    enc = tok(["red circle", "green triangle"], padding=True, return_tensors="pt")
    s = clip(**enc, pixel_values=x).logits_per_image
    return s[:, :1] - s[:, 1:]


def test_prompt_ensemble_averages_normalized_text_embeddings():
    clip = tiny_clip()
    tok = tiny_tokenizer()
    x = _images()
    templates = ["a photo of {}", "{}"]
    exp = camlens.explain(ImageText(clip, tok), x, "gradcam", targets=Text("dog", template=templates))
    with torch.no_grad():
        enc = tok(["a photo of dog", "dog"], padding=True, return_tensors="pt")
        t = F.normalize(clip.get_text_features(**enc).pooler_output, dim=-1).mean(0, keepdim=True)
        img = clip.get_image_features(pixel_values=x).pooler_output
        want = F.normalize(img, dim=-1) @ F.normalize(t, dim=-1).T * clip.logit_scale.exp()
    torch.testing.assert_close(exp.scores, want, rtol=1e-5, atol=1e-5)


def test_attention_methods_run_on_the_vit_image_tower():
    clip = tiny_clip()
    x = _images()
    for method in ("attention_rollout", "generic_attention"):
        exp = camlens.explain(clip, x, method, targets=Text(input_ids=IDS, attention_mask=MASK))
        assert exp.maps.shape == (2, 2, 32, 32) and torch.isfinite(exp.maps).all()
        assert exp.raw.flatten(2).std(-1).min() > 0  # not a constant map


def test_zero_shot_classifier_topk_equals_hand_computation(tmp_path):
    clip = tiny_clip()
    tok = tiny_tokenizer()
    names = ["red circle", "blue square", "green triangle"]
    x = _images(3)
    clf = zero_shot(ImageText(clip, tok), names)
    assert isinstance(clf, ZeroShotClassifier)
    exp = camlens.explain(clf, x, "gradcam", targets="top2")
    with torch.no_grad():
        enc = tok([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
        t = clip.get_text_features(**enc).pooler_output
        img = clip.get_image_features(pixel_values=x).pooler_output
        logits = clip.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(t, dim=-1).T
    assert torch.equal(exp.classes, logits.topk(2, dim=1).indices)
    top = exp.top(3)
    p = logits.softmax(1)
    for i in range(3):
        assert [c for c, _, _ in top[i]] == p[i].argsort(descending=True).tolist()
        assert [n for _, n, _ in top[i]] == [names[c] for c in p[i].argsort(descending=True).tolist()]
        assert [q for _, _, q in top[i]] == pytest.approx(p[i].sort(descending=True).values.tolist(), abs=1e-6)
    by_name = camlens.explain(clf, x, "gradcam", targets="blue square")
    assert (by_name.classes == 1).all()


def test_hf_folder_loads_image_text_model_with_its_tokenizer_and_class_names(tmp_path):
    clip = tiny_clip()
    tok = tiny_tokenizer()
    clip.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = camlens.load_model(f"hf:{tmp_path}")
    assert isinstance(model, ImageText) and model.tokenizer is not None
    x = _images()
    exp = camlens.explain(model, x, "gradcam", targets=Text(["red circle", "dog"]))
    enc = tok(["red circle", "dog"], padding=True, return_tensors="pt")
    torch.testing.assert_close(exp.scores, clip(**enc, pixel_values=x).logits_per_image.detach(), rtol=1e-5, atol=1e-5)
    clf = camlens.load_model(f"hf:{tmp_path}", class_names=["dog", "cat"])
    assert clf.camlens.class_names == ["dog", "cat"]
    assert camlens.predict(clf, x, topk=1)[0][0][1] in ("dog", "cat")


def test_clear_errors():
    x = _images()
    cnn = TinyCNN().eval()
    with pytest.raises(TargetError, match="no text tower|has none"):
        camlens.explain(cnn, torch.randn(1, 3, 16, 16), "gradcam", targets=Text("a dog"))
    clip = tiny_clip()
    with pytest.raises(TargetError, match="no tokenizer.*input_ids"):
        camlens.explain(clip, x, "gradcam", targets=Text("a dog"))
    with pytest.raises(TargetError, match="Text\\(.*class_names"):
        camlens.explain(clip, x, "gradcam")
    with pytest.raises(CamlensError, match="class_names= makes a zero-shot"):
        camlens.load_model("resnet18", weights="random", class_names=["a", "b"])
    with pytest.raises(TargetError, match="one, or one per prompt"):
        Text(["a", "b", "c"], minus=["x", "y"])
    with pytest.raises(TargetError, match="'\\{\\}'"):
        Text("dog", template="a photo")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in clip.modules()) == 0


def test_hf_folder_without_tokenizer_asks_for_token_ids(tmp_path):
    tiny_clip().save_pretrained(tmp_path)
    model = camlens.load_model(f"hf:{tmp_path}")
    with pytest.raises(TargetError, match="no tokenizer"):
        camlens.explain(model, _images(), "gradcam", targets=Text("dog"))
    exp = camlens.explain(model, _images(), "gradcam", targets=Text(input_ids=IDS, attention_mask=MASK))
    assert exp.maps.shape == (2, 2, 32, 32)


def test_openclip_text_scores_equal_its_logits():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=8,
        vision_cfg=CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=16, heads=2, layers=1),
    ).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")  # the BPE vocabulary ships with the package: offline
    x = _images()
    prompts = ["a red bicycle", "a dog"]
    with torch.no_grad():
        ref = model.get_logits(x, tok(prompts))[0]
    exp = camlens.explain(ImageText(model, tok), x, "gradcam", targets=Text(prompts))
    torch.testing.assert_close(exp.scores, ref, rtol=1e-5, atol=1e-5)
    assert exp.maps.shape == (2, 2, 32, 32) and exp.raw.abs().max() > 0


def _cli(*args):
    from click.testing import CliRunner

    from camlens.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def clip_folder(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "clip"
    tiny_clip().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    img = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "photo.png")
    return folder


def test_cli_prompt_and_zero_shot_class(clip_folder, tmp_path):
    import json

    photo = tmp_path / "photo.png"
    r = _cli("explain", "--model", f"hf:{clip_folder}", photo, "--prompt", "red circle", "--prompt", "dog",
             "--method", "gradcam", "--out", tmp_path / "o", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    text = json.dumps(summary)
    assert "red circle" in text and "dog" in text
    pngs = sorted(p.name for p in (tmp_path / "o").glob("*.png"))
    assert any("red" in p for p in pngs) and any("dog" in p for p in pngs), pngs
    r = _cli("explain", "--model", f"hf:{clip_folder}", photo, "--class", "dog", "--class", "cat",
             "--method", "gradcam", "--out", tmp_path / "z")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "dog" in r.output and "cat" in r.output  # the zero-shot classifier's top classes are printed
    r = _cli("explain", "--model", f"hf:{clip_folder}", photo, "--out", tmp_path / "n")
    assert r.exit_code != 0 and "--prompt" in r.output
    r = _cli("explain", "--model", "resnet18", "--weights", "random", photo, "--prompt", "dog", "--out", tmp_path / "r")
    assert r.exit_code != 0 and "image–text model" in r.output


def test_explain_with_class_names_on_image_text_model_is_zero_shot():
    clip = tiny_clip()
    tok = tiny_tokenizer()
    x = _images()
    exp = camlens.explain(ImageText(clip, tok), x, "gradcam", targets="top1", class_names=["dog", "cat", "red circle"])
    ref = zero_shot(ImageText(clip, tok), ["dog", "cat", "red circle"])(x)
    torch.testing.assert_close(exp.logits, ref.detach())
    assert exp.labels()[0][0] in ("dog", "cat", "red circle")


def test_dataset_pipeline_runs_on_a_zero_shot_classifier(tmp_path):
    import numpy as np
    from PIL import Image

    pytest.importorskip("pyarrow")
    pytest.importorskip("zarr")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((36, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / f"im{i}.png")
    names = ["dog", "cat", "red circle"]
    clf = zero_shot(ImageText(tiny_clip(), tiny_tokenizer()), names)
    res = camlens.explain_dataset(
        clf, sorted(tmp_path.glob("*.png")), "gradcam", tmp_path / "store", targets="top2", num_workers=0,
        progress=False,
    )  # fmt: skip
    table = camlens.open_results(tmp_path / "store").table
    assert len(table) == 6 and set(table["class_name"]) <= set(names)
    x = torch.stack([clf.camlens.preprocess([np.array(Image.open(tmp_path / f"im{i}.png"))])[0] for i in range(3)])
    top2 = clf(x).topk(2, dim=1).indices
    assert sorted(table["class_id"].tolist()) == sorted(top2.flatten().tolist())
    assert res is not None


def test_predict_on_image_text_model_needs_class_names_and_matches_zero_shot():
    clip = ImageText(tiny_clip(), tiny_tokenizer())
    x = _images()
    with pytest.raises(TargetError, match="class_names"):
        camlens.predict(clip, x)
    got = camlens.predict(clip, x, topk=2, class_names=["dog", "cat", "square"])
    p = zero_shot(clip, ["dog", "cat", "square"])(x).softmax(1)
    assert [c for c, _, _ in got[0]] == p[0].argsort(descending=True)[:2].tolist()


FAMILIES = {
    "gradcam": {},
    "scorecam": {"max_channels": 4},
    "rise": {"n_masks": 8},
    "saliency": {},
    "integrated_gradients": {"steps": 3},
    "ablationcam": {},
    "generic_attention": {},
}


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m == "ablationcam" else m for m in sorted(FAMILIES)]
)
def test_every_family_leaves_the_image_text_model_as_it_was(method):
    clip = tiny_clip()
    clip.vision_model.encoder.layers[0].train()  # a mixed train/eval model
    frozen = clip.text_model.embeddings.token_embedding.weight
    frozen.requires_grad_(False)
    x = _images()
    x_before = x.clone()
    modes = [m.training for m in clip.modules()]
    with torch.no_grad():
        clip.eval()
        out = clip(input_ids=IDS, attention_mask=MASK, pixel_values=x).logits_per_image
        for m, t in zip(clip.modules(), modes, strict=True):
            m.train(t)
    exp = camlens.explain(clip, x, method, targets=Text(input_ids=IDS, attention_mask=MASK), **FAMILIES[method])
    assert torch.isfinite(exp.maps).all() and exp.maps.shape == (2, 2, 32, 32)
    assert [m.training for m in clip.modules()] == modes
    assert not frozen.requires_grad and all(p.requires_grad for n, p in clip.named_parameters() if p is not frozen)
    assert all(p.grad is None for p in clip.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in clip.modules()) == 0
    assert torch.equal(x, x_before)
    with torch.no_grad():
        clip.eval()
        assert torch.equal(clip(input_ids=IDS, attention_mask=MASK, pixel_values=x).logits_per_image, out)


def test_web_app_prompt_box_explains_prompts_as_zero_shot_classes():
    import io

    import numpy as np
    from PIL import Image

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from camlens.serve.app import create_app
    from camlens.serve.service import ModelPool, Service

    clip = ImageText(tiny_clip(), tiny_tokenizer())
    client = TestClient(create_app(Service(ModelPool({"clip": clip}))))
    buf = io.BytesIO()
    rgb = (np.random.default_rng(2).random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(buf, format="PNG")
    info = client.post(
        "/api/image", content=buf.getvalue(), headers={"x-filename": "p.png", "content-type": "image/png"}
    )
    assert client.get("/api/methods", params={"model": "clip"}).json()["image_text"] is True
    prompts = ["red circle", "dog", "blue square"]
    body = {"image_id": info.json()["id"], "methods": ["gradcam"], "explain": 2, "prompts": prompts}
    r = client.post("/api/explain", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    want = camlens.explain(clip, rgb, "gradcam", targets="top2", class_names=prompts)
    assert res["classes"] == want.classes[0].tolist()
    assert [p["name"] for p in res["predictions"]] == [n for _, n, _ in want.top(3)[0]]
    no_prompt = client.post("/api/explain", json=body | {"prompts": None})
    assert no_prompt.status_code == 400 and "prompt" in no_prompt.text
    curves = client.post(
        "/api/faithfulness", json={"result_id": res["id"], "method": "gradcam", "cls": res["classes"][0]}
    )
    assert curves.status_code == 200, curves.text


def test_openclip_loader_by_architecture_name_offline(tmp_path):
    import json

    open_clip = pytest.importorskip("open_clip")
    vision = {"layers": 1, "width": 16, "head_width": 8, "patch_size": 8, "image_size": 32}
    text = {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
    (tmp_path / "camlens-tiny-clip.json").write_text(
        json.dumps({"embed_dim": 8, "vision_cfg": vision, "text_cfg": text})
    )
    hf_text = text | {"hf_tokenizer_name": "camlens-test/no-such-tokenizer"}
    (tmp_path / "camlens-tiny-hftok.json").write_text(
        json.dumps({"embed_dim": 8, "vision_cfg": vision, "text_cfg": hf_text})
    )
    open_clip.add_model_config(tmp_path)
    with pytest.raises(CamlensError, match="weights=FILE"):
        camlens.load_model("openclip:camlens-tiny-clip")
    torch.manual_seed(0)
    model = camlens.load_model("openclip:camlens-tiny-clip", weights="random")
    assert isinstance(model, ImageText) and model.camlens.preprocess.size == (32, 32)
    x = _images()
    exp = camlens.explain(model, x, "gradcam", targets=Text(["a red bicycle"], template="a photo of {}."))
    with torch.no_grad():
        ref = model.model.get_logits(x, model.tokenizer(["a photo of a red bicycle."]))[0]
    torch.testing.assert_close(exp.scores, ref, rtol=1e-5, atol=1e-5)
    hf = camlens.load_model("openclip:camlens-tiny-hftok", weights="random")
    with pytest.raises(TargetError, match="no-such-tokenizer.*not on this machine"):
        camlens.explain(hf, x, "gradcam", targets=Text("a dog"))
