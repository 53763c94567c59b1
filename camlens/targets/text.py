r"""Text targets: explain where an image–text model (CLIP, SigLIP, OpenCLIP) sees a prompt.

``targets=Text(["a dog", "a cat"])`` explains, for each prompt :math:`t_k`, the model's own
image–text logit (:mod:`camlens.models.imagetext`)

.. math:: y_k = e^{\tau}\cos(f(x), g(t_k))\ (+\,b) \;-\; \big[e^{\tau}\cos(f(x), g(t^-_k))\ (+\,b)\big]

(the bracket only with ``minus=``: a negative prompt, the difference of two logits), i.e. column
``k`` of the model's ``logits_per_image`` (SigLIP: its logits, before the sigmoid). The prompts are
embedded once per call, when the target is bound, under ``no_grad``: the text tower is not run by
the methods' forwards and receives no gradient. ``template="a photo of a {}."`` fills each prompt
into a template; a list of templates is a prompt ensemble (the normalized embeddings averaged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from camlens.base.errors import TargetError


def _strings(value: Any, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(p, str) and p.strip() for p in items):
        raise TargetError(f"{what} must be a non-empty string or list of non-empty strings, not {value!r}")
    return items


class Text:
    """The image–text logit of each prompt (see the module docstring). A target object
    (:class:`camlens.targets.Target` protocol): pass it as ``targets=``.

    Args:
        prompts: a prompt or a list of ``K`` prompts (one map per prompt).
        template: ``"{}"`` by default; a string with ``{}`` or a list of them (prompt ensemble).
        minus: a negative prompt (for every prompt) or a list of ``K`` (one per prompt).
        input_ids, attention_mask: token ids ``(K, L)`` tokenized by the caller, one row per prompt
            (instead of ``prompts``; then ``template`` does not apply).
    """

    raw_output = True

    def __init__(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        template: str | Sequence[str] = "{}",
        minus: str | Sequence[str] | None = None,
        input_ids: Any = None,
        attention_mask: Any = None,
    ) -> None:
        if (prompts is None) == (input_ids is None):
            raise TargetError("Text needs prompts (Text(['a dog'])) or token ids (Text(input_ids=...)), one of them")
        self.prompts = None if prompts is None else _strings(prompts, "prompts")
        self.templates = _strings(template, "template")
        if any("{}" not in t for t in self.templates):
            raise TargetError(
                f"a template must contain '{{}}' where the prompt goes, e.g. 'a photo of a {{}}.'; got {template!r}"
            )
        self.input_ids = None if input_ids is None else torch.as_tensor(input_ids).long()
        self.attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        if self.input_ids is not None and self.input_ids.dim() != 2:
            raise TargetError(
                f"input_ids must be (K, L): one row of token ids per prompt; got {tuple(self.input_ids.shape)}"
            )
        k = len(self.prompts) if self.prompts is not None else int(self.input_ids.shape[0])  # type: ignore[union-attr]
        self.minus = None if minus is None else _strings(minus, "minus")
        if self.minus is not None and len(self.minus) not in (1, k):
            raise TargetError(
                f"minus gives {len(self.minus)} negative prompts for {k} prompts: give one, or one per prompt"
            )
        self._k = k
        self._model: Any = None
        self._text: torch.Tensor | None = None
        self._neg: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self._k

    @property
    def labels(self) -> torch.Tensor | None:
        return None

    def _embed(self, model: Any, prompts: list[str] | None) -> torch.Tensor:
        if prompts is None:
            return model.text_embeddings(self.input_ids, self.attention_mask)
        return model.prompt_embeddings(prompts, self.templates)

    def bind(self, output: Any, model: nn.Module | None = None) -> Text:
        """Embed the prompts once with the model's text tower (``no_grad``)."""
        if model is None or not callable(getattr(model, "prompt_embeddings", None)):
            name = type(model).__name__ if model is not None else "no model"
            raise TargetError(
                f"a Text target needs an image–text model with a text tower (CLIP, SigLIP, OpenCLIP); {name} has "
                "none. Load one with camlens.load_model('hf:FOLDER') or 'openclip:ARCH', or pass a Hugging Face "
                "CLIPModel / SiglipModel or an OpenCLIP model; for a classifier use class targets"
            )
        out = Text.__new__(Text)
        out.__dict__.update(self.__dict__)
        out._model = model
        out._text = self._embed(model, self.prompts)
        if self.minus is not None:
            neg = out._model.prompt_embeddings(self.minus, self.templates)
            out._neg = neg.expand(self._k, -1) if neg.shape[0] == 1 else neg
        if out._text.shape[0] != self._k:
            raise TargetError(f"the text tower gave {out._text.shape[0]} embeddings for {self._k} prompts")
        return out

    def __call__(self, output: Any) -> torch.Tensor:
        if self._model is None or self._text is None:
            raise TargetError("this Text target is not bound to an image–text model yet (camlens.explain binds it)")
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise TargetError(f"Text scores (N, D) image embeddings; the model returned {shape}")
        s = self._model.logits(output, self._text)
        return s if self._neg is None else s - self._model.logits(output, self._neg)

    @property
    def extras(self) -> dict[str, Any]:
        """``"prompts"``: what each map explains (with the negative prompt and template)."""
        if self.prompts is None:
            return {"prompts": [f"token ids row {i}" for i in range(self._k)]}
        names = [self.templates[0].format(p) if len(self.templates) == 1 else p for p in self.prompts]
        if self.minus is not None:
            neg = self.minus * self._k if len(self.minus) == 1 else self.minus
            names = [f"{a} − {b}" for a, b in zip(names, neg)]
        return {"prompts": names}

    def __repr__(self) -> str:
        what = self.prompts if self.prompts is not None else f"{self._k} token-id rows"
        return f"Text({what!r}" + (f", minus={self.minus!r}" if self.minus else "") + ")"


__all__ = ["Text"]
