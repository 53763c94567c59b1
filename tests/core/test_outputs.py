"""Any model output: tensors, (logits, aux) tuples, dicts, Hugging Face ModelOutput, callables."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import CamlensError, InputError, OutputError
from camlens.core.outputs import select_output
from tests.api.test_hygiene import assert_untouched, snapshot
from tests.conftest import TinyCNN


class Wrapped(nn.Module):
    """TinyCNN whose forward returns ``kind`` of output around the same logits."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyCNN().double()
        self.kind = kind

    def forward(self, x):
        y = self.net(x)
        aux = y[:, :2] * 3.0
        if self.kind == "tuple":
            return y, aux
        if self.kind == "aux_first":  # a (N,) tensor and a 4-D map before the logits
            return y.sum(1), x, y
        if self.kind == "list":
            return [y, aux]
        if self.kind == "dict":
            return {"logits": y, "aux": aux}
        if self.kind == "dict_one":
            return {"scores": y, "features": x}
        if self.kind == "dict_none":
            return {"a": y, "b": aux}
        if self.kind == "hf":
            from transformers.modeling_outputs import ImageClassifierOutput

            return ImageClassifierOutput(logits=y, hidden_states=(x,))
        return y


def test_select_output_forms():
    y = torch.randn(3, 5)
    aux = torch.randn(3, 2)
    assert select_output(y)[0] is y
    t, d = select_output((y, aux))
    assert t is y and "element 0" in d
    t, d = select_output((y.sum(1), torch.randn(3, 1, 4, 4), aux))
    assert t is aux and "element 2" in d
    t, d = select_output({"logits": aux, "other": y})
    assert t is aux and "logits" in d
    with pytest.raises(OutputError, match="'s': tensor \\(3, 5\\).*no 'logits' entry"):
        select_output({"x": torch.randn(3, 3, 4, 4), "s": y})  # one (N, C) entry may be an embedding
    assert select_output((y, aux), output=1)[0] is aux
    assert select_output({"a": y, "b": aux}, output="b")[0] is aux
    t, d = select_output({"a": y}, output=lambda o: o["a"] * 2)
    assert torch.equal(t, y * 2) and "lambda" in d
    # batch size known: a (K, C) tensor with another row count is not the logits
    assert select_output((torch.randn(7, 5), y), n=3)[0] is y


def test_select_output_errors_list_what_was_found():
    y = torch.randn(3, 5)
    with pytest.raises(OutputError, match=r"'a': tensor \(3, 5\).*'b': tensor \(3, 2\).*not obvious"):
        select_output({"a": y, "b": y[:, :2]})
    with pytest.raises(OutputError, match="no \\(N, C\\) tensor"):
        select_output({"maps": torch.randn(3, 1, 4, 4)})
    with pytest.raises(OutputError, match="no \\(N, C\\) tensor"):
        select_output((torch.randn(3),))
    with pytest.raises(OutputError, match="no such entry"):
        select_output({"a": y}, output="logits")
    with pytest.raises(OutputError, match="out of range"):
        select_output((y,), output=3)
    with pytest.raises(OutputError, match="not class scores"):
        select_output("text")
    with pytest.raises(OutputError, match="raised KeyError"):
        select_output({"a": y}, output=lambda o: o["zz"])
    with pytest.raises(OutputError, match=r"\(3, 5, 1\)"):
        select_output(torch.randn(3, 5, 1))
    assert issubclass(OutputError, CamlensError) and issubclass(OutputError, InputError)


def test_huggingface_model_output():
    from transformers.modeling_outputs import ImageClassifierOutput

    y = torch.randn(2, 4)
    out = ImageClassifierOutput(logits=y, hidden_states=(torch.randn(2, 3, 8),))
    t, d = select_output(out)
    assert t is y and "ImageClassifierOutput" in d


@pytest.mark.parametrize("kind", ["tuple", "aux_first", "list", "dict", "hf"])
@pytest.mark.parametrize("method", ["gradcam", "cam", "scorecam", "saliency"])
def test_explained_with_no_options_like_the_plain_model(kind, method, tiny_x):
    _same_as_plain(kind, method, tiny_x)


def test_extra_forwards_of_pixel_methods_select_the_logits(tiny_x):
    _same_as_plain("hf", "integrated_gradients", tiny_x[:1])  # IG's path points and baseline forwards


def _same_as_plain(kind, method, tiny_x):
    plain = Wrapped("tensor").eval()
    model = Wrapped(kind).eval()
    before = snapshot(model)
    opts = {"steps": 4} if method == "integrated_gradients" else {}
    ref = camlens.explain(plain, tiny_x, method=method, targets="top2", **opts)
    got = camlens.explain(model, tiny_x, method=method, targets="top2", **opts)
    assert torch.equal(got.classes, ref.classes)
    assert torch.allclose(got.scores, ref.scores)
    assert torch.allclose(got.maps, ref.maps, atol=1e-10)
    assert ref.extras["output"] == "tensor"
    assert got.extras["output"] != "tensor" and got.extras["output"]
    assert_untouched(model, before)


def test_dict_without_logits_is_a_clear_error(tiny_x):
    model = Wrapped("dict_none").eval()
    before = snapshot(model)
    with pytest.raises(OutputError, match="'a'.*'b'.*output="):
        camlens.explain(model, tiny_x)
    with pytest.raises(OutputError, match="'scores'.*no 'logits' entry"):
        camlens.explain(Wrapped("dict_one").eval(), tiny_x)
    assert_untouched(model, before)
    exp = camlens.explain(model, tiny_x, output="b")
    assert exp.extras["output"] == "'b' entry" and exp.scores.shape == (3, 1)
    ref = camlens.explain(model, tiny_x, output=lambda o: o["b"])
    assert torch.equal(ref.maps, exp.maps)


def test_predict_takes_any_output(tiny_x):
    p = camlens.predict(Wrapped("hf").eval(), tiny_x, topk=2)
    q = camlens.predict(Wrapped("tensor").eval(), tiny_x, topk=2)
    assert p == q
