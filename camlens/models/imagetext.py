r"""Image–text models (Hugging Face ``CLIPModel`` / ``SiglipModel``, OpenCLIP) seen as image models.

:class:`ImageText` wraps such a model so that camlens' engine sees an ordinary image network:
``forward(pixels) -> (N, D)`` image embeddings from the **image tower only**. The text tower is used
by the targets: :class:`camlens.targets.Text` embeds its prompts once per call (under ``no_grad``,
never during the methods' forwards) and scores an image by the model's own logit

.. math:: s(x, t) = e^{\tau}\,\frac{f(x)\cdot g(t)}{\lVert f(x)\rVert\,\lVert g(t)\rVert}\ (+\,b)

(CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021; SigLIP adds the bias :math:`b` of its sigmoid loss: Zhai et al., "Sigmoid Loss for
Language Image Pre-Training", ICCV 2023) — exactly ``logits_per_image`` of the wrapped model.

:class:`ZeroShotClassifier` fixes the prompts to class names (``"a photo of a {}."``): its forward
returns ``(N, C)`` logits over the names, so every classifier feature (``targets="top2"``, class
names, the dataset pipeline) works on it. Layer names are the wrapped model's, under ``model.``
(``model.vision_model.encoder.layers.1``; OpenCLIP: ``model.visual.transformer.resblocks.1``).

Nothing is ever downloaded: a tokenizer comes from the model's folder, the OpenCLIP package, or
the caller (``tokenizer=``); token ids tokenized elsewhere are accepted by the targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camlens.base.errors import CamlensError, TargetError
from camlens.models.card import ModelCard, attach_card, card_of
from camlens.models.preprocess import Preprocess

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: token-id batches whose embeddings an :class:`ImageText` remembers
TEXT_CACHE = 64
#: the template of :class:`ZeroShotClassifier` (CLIP's default prompt)
DEFAULT_TEMPLATE = "a photo of a {}."

#: prompts -> token ids (a Hugging Face tokenizer, OpenCLIP's); called with keyword options too
Tokenizer = Any


def family_of(model: nn.Module) -> str | None:
    """``"clip"`` / ``"siglip"`` (Hugging Face), ``"openclip"``, or ``None`` for other models."""
    names = {c.__name__ for c in type(model).__mro__}
    if names & {"CLIPModel", "AltCLIPModel"}:
        return "clip"
    if names & {"SiglipModel", "Siglip2Model"}:
        return "siglip"
    encoders = callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None))
    if encoders and isinstance(getattr(model, "logit_scale", None), torch.Tensor):
        return "openclip"
    return None


def _pooled(out: Any) -> torch.Tensor:
    """A Hugging Face ``get_*_features`` result: a tensor (transformers 4) or ``.pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ImageText(nn.Module):
    """An image–text model as an image model: ``forward(pixels)`` = the image embeddings ``(N, D)``.

    Args:
        model: a Hugging Face ``CLIPModel`` / ``SiglipModel`` or an OpenCLIP model.
        tokenizer: prompts -> token ids: a Hugging Face tokenizer or OpenCLIP's (``None``: only
            token ids given to :class:`camlens.targets.Text` can be used).
    """

    model: Any  # the wrapped model (a registered submodule; its methods are called by name)

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        family = family_of(model)
        if family is None:
            raise TargetError(
                f"{type(model).__name__} is not an image–text model camlens knows (Hugging Face CLIPModel or "
                "SiglipModel, an OpenCLIP model): it has no text tower to score prompts with"
            )
        self.model = model
        self.family = family
        self.tokenizer = tokenizer
        self.no_tokenizer = ""  # why there is none, when known (said in the error)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.family == "openclip":
            return self.model.encode_image(pixel_values)
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    # -- the text side: used by the targets, never inside a method's forward -------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids ``(K, L)`` and attention mask (``None`` for OpenCLIP) of ``prompts``."""
        if self.tokenizer is None:
            raise TargetError(
                f"no tokenizer for this image–text model{self.no_tokenizer}: load it with "
                "camlens.load_model('hf:FOLDER') (the folder's tokenizer) or 'openclip:ARCH', wrap it with "
                "camlens.models.imagetext.ImageText(model, tokenizer=...), or pass token ids: "
                "Text(input_ids=..., attention_mask=...)"
            )
        if self.family == "openclip":
            return torch.as_tensor(self.tokenizer(list(prompts))), None
        padding = "max_length" if self.family == "siglip" else True  # SigLIP was trained on padded text
        enc = self.tokenizer(list(prompts), padding=padding, return_tensors="pt")
        return enc["input_ids"], enc.get("attention_mask")

    @torch.no_grad()
    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(K, D)`` text embeddings (not normalized), under ``no_grad``: the text tower gets no
        gradient. Remembered for the same token ids while the weights are unchanged (in-place
        updates bump the parameters' version counters), so one explanation embeds its text once
        however many forward passes it runs."""
        key = (
            tuple(input_ids.shape),
            input_ids.cpu().numpy().tobytes(),
            None if attention_mask is None else attention_mask.cpu().numpy().tobytes(),
            sum(p._version for p in self.model.parameters()),
        )
        if key not in self._text_cache:
            dev = next(self.model.parameters()).device
            ids = input_ids.to(dev)
            if self.family == "openclip":
                emb = self.model.encode_text(ids)
            else:
                mask = None if attention_mask is None else attention_mask.to(dev)
                emb = _pooled(self.model.get_text_features(input_ids=ids, attention_mask=mask))
            if len(self._text_cache) >= TEXT_CACHE:
                self._text_cache.clear()
            self._text_cache[key] = emb.detach()
        return self._text_cache[key]

    def scale_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logit scale :math:`e^{\\tau}` and bias :math:`b` (``None`` for CLIP), detached."""
        scale = self.model.logit_scale.detach().exp()
        bias = getattr(self.model, "logit_bias", None)
        return scale, None if bias is None else bias.detach()

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` logits of image embeddings ``(N, D)`` against text embeddings ``(K, D)``."""
        scale, bias = self.scale_bias()
        t = F.normalize(text.to(image.device, image.dtype), dim=-1)
        out = F.normalize(image, dim=-1) @ t.T * scale.to(image.device, image.dtype)
        return out if bias is None else out + bias.to(image.device, image.dtype)

    def prompt_embeddings(self, prompts: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """``(K, D)`` embeddings of ``prompts``; several ``templates`` are a prompt ensemble: the mean
        of each prompt's normalized embeddings over the templates (CLIP, section 3.1.4)."""
        per = []
        for template in templates:
            ids, mask = self.tokenize([template.format(p) for p in prompts])
            per.append(F.normalize(self.text_embeddings(ids, mask), dim=-1))
        return torch.stack(per).mean(0)


class ZeroShotClassifier(ImageText):
    """An image–text model as a classifier over ``class_names``: ``forward(pixels)`` = ``(N, C)``
    logits, :math:`s(x, \\text{template}(c))` for each class ``c`` (text embedded once, here)."""

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        tokenizer: Tokenizer | None = None,
        templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    ) -> None:
        super().__init__(model, tokenizer)
        names = [str(c) for c in class_names]
        if not names:
            raise CamlensError("class_names is empty: give the names to classify between, e.g. ['cat', 'dog']")
        self.class_names = names
        self.templates = tuple(templates)
        was = self.model.training
        self.model.eval()
        try:
            emb = self.prompt_embeddings(names, self.templates)
        finally:
            self.model.train(was)
        self.register_buffer("class_embeddings", emb, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits(super().forward(pixel_values), self.get_buffer("class_embeddings"))


def default_card(model: ImageText) -> ModelCard:
    """The card of an image–text model camlens did not load: CLIP's (SigLIP's) normalization at the
    image tower's input size."""
    inner = model.model
    if model.family == "openclip":
        size = getattr(inner.visual, "image_size", 224)
    else:
        size = getattr(getattr(inner.config, "vision_config", None), "image_size", 224)
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    half = (0.5, 0.5, 0.5)
    siglip = model.family == "siglip"
    pp = Preprocess(size=hw, mean=half if siglip else CLIP_MEAN, std=half if siglip else CLIP_STD, name=model.family)
    return ModelCard(type(inner).__name__, pp, None, extra={"task": "image-text"})


def image_text(model: nn.Module, tokenizer: Tokenizer | None = None) -> ImageText:
    """``model`` itself when it is already an :class:`ImageText`, else the wrapper, with the model's
    card or :func:`default_card`."""
    if isinstance(model, ImageText):
        return model
    out = ImageText(model, tokenizer)
    attach_card(out, card_of(model) or default_card(out))
    return out


def zero_shot(
    model: nn.Module, class_names: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,)
) -> ZeroShotClassifier:
    """A :class:`ZeroShotClassifier` over ``class_names`` from an image–text model (wrapped or not),
    with a card naming the classes."""
    base = model if isinstance(model, ImageText) else image_text(model)
    clf = ZeroShotClassifier(base.model, class_names, base.tokenizer, templates)
    card = card_of(model) or default_card(base)
    extra = {**card.extra, "zero_shot": True}
    attach_card(clf, replace(card, class_names=list(clf.class_names), extra=extra))
    return clf.eval()


# -- loaders: never download -----------------------------------------------------------------------
OPENCLIP_PREFIX = "openclip:"
IMAGE_TEXT_TYPES = ("clip", "siglip", "siglip2")


def _local_tokenizer(folder: str) -> Tokenizer | None:
    """The tokenizer saved in ``folder`` (``None`` when there is none: prompts then need token ids)."""
    import transformers  # optional extra camlens[hf]; imported only for hf: folders

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")
    if not any((Path(folder) / f).is_file() for f in files):  # AutoTokenizer would build an empty one
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_hf_image_text(folder: str, config: Any, weights: Any) -> tuple[ImageText, ModelCard]:
    """A Hugging Face CLIP / SigLIP model saved in ``folder`` (``save_pretrained``) and its tokenizer."""
    import transformers  # optional extra camlens[hf]

    auto = transformers.AutoModel
    model = auto.from_config(config) if weights == "random" else auto.from_pretrained(folder, local_files_only=True)
    wrapped = ImageText(model.eval(), _local_tokenizer(folder))
    vc = getattr(config, "vision_config", None)
    side = int(getattr(vc, "image_size", 224))
    siglip = wrapped.family == "siglip"
    pp = Preprocess(
        size=(side, side),
        mean=(0.5, 0.5, 0.5) if siglip else CLIP_MEAN,
        std=(0.5, 0.5, 0.5) if siglip else CLIP_STD,
        name="siglip" if siglip else "clip",
    )
    return wrapped, ModelCard(f"hf:{folder}", pp, None, extra={"task": "image-text"})


def load_openclip(arch: str, weights: Any = None) -> tuple[ImageText, ModelCard]:
    """An OpenCLIP model ``arch`` (a config shipped with open-clip-torch) with ``weights`` (a local
    file; ``"random"``: untrained) and the package's tokenizer. Never downloads."""
    try:
        import open_clip  # optional extra camlens[clip]
    except ImportError as exc:
        raise CamlensError(f"{OPENCLIP_PREFIX}{arch} needs open-clip-torch: pip install 'camlens[clip]'") from exc
    if arch not in open_clip.list_models():
        raise CamlensError(
            f"{OPENCLIP_PREFIX}{arch}: no such OpenCLIP architecture; open_clip.list_models() lists them"
        )
    if weights is None:
        raise CamlensError(
            f"{OPENCLIP_PREFIX}{arch} needs weights=FILE (a local checkpoint; camlens never downloads) or "
            "weights='random' (an untrained model)"
        )
    pretrained = None if weights == "random" else str(weights)
    model = open_clip.create_model(arch, pretrained=pretrained, load_weights=pretrained is not None)
    hf_name = ((open_clip.get_model_config(arch) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    tokenizer = open_clip.get_tokenizer(arch) if not hf_name else _cached_hf_tokenizer(hf_name)
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = getattr(model.visual, "image_size", 224)
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    pp = Preprocess(
        size=hw,
        mean=tuple(cfg.get("mean", CLIP_MEAN)),
        std=tuple(cfg.get("std", CLIP_STD)),
        name="openclip",
    )
    extra: dict[str, Any] = {"task": "image-text"} | ({"weights": "random"} if pretrained is None else {})
    wrapped = ImageText(model.eval(), tokenizer)
    if tokenizer is None:
        wrapped.no_tokenizer = f" ({arch} uses the Hugging Face tokenizer {hf_name!r}, which is not on this machine)"
    return wrapped, ModelCard(OPENCLIP_PREFIX + arch, pp, None, extra=extra)


def _cached_hf_tokenizer(name: str) -> Tokenizer | None:
    """A Hugging Face tokenizer from the local cache only (``None`` when it is not there: no download)."""
    try:
        import transformers  # optional extra camlens[hf]

        return transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (ImportError, OSError, ValueError):
        return None


__all__ = [
    "DEFAULT_TEMPLATE",
    "OPENCLIP_PREFIX",
    "ImageText",
    "ZeroShotClassifier",
    "family_of",
    "image_text",
    "load_hf_image_text",
    "load_openclip",
    "zero_shot",
]
