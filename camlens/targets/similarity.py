"""Similarity targets: the cosine of an embedding with a reference embedding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.base._util import eval_mode, model_device, model_dtype
from camlens.base.errors import NonFiniteError, TargetError
from camlens.targets.base import Target, _plain


def _as_reference(reference: Any) -> torch.Tensor:
    """A Similarity reference as a finite float tensor; a zero embedding (cosine undefined) refused."""
    try:
        r = reference if isinstance(reference, torch.Tensor) else torch.as_tensor(np.asarray(reference))
    except (TypeError, ValueError, RuntimeError):
        r = None
    if r is None or r.dtype == torch.bool or r.is_complex():
        raise TargetError(
            f"reference must be a numeric embedding (D,)/(K, D) or preprocessed images (3,H,W)/(K,3,H,W); "
            f"got {type(reference).__name__}"
        )
    if not r.is_floating_point():
        r = r.float()
    if r.dim() not in (1, 2, 3, 4) or r.numel() == 0:
        raise TargetError(
            f"reference must be an embedding (D,)/(K, D) or images (3,H,W)/(K,3,H,W); got {tuple(r.shape)}"
        )
    if not bool(torch.isfinite(r).all()):
        raise NonFiniteError("the Similarity reference holds NaN or Inf values; pass a finite embedding or image")
    return _plain(r)


def _check_nonzero(ref: torch.Tensor, what: str) -> None:
    zero = (ref.flatten(1).norm(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        raise TargetError(
            f"{what} {zero[0]} is the zero vector: its cosine similarity is undefined (0/0), so its map would be "
            "zero; pass a non-zero reference embedding"
        )


def _embedding(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.dim() >= 2:
        return output.flatten(1)
    if isinstance(output, Mapping):
        for key in ("image_embeds", "embeddings", "pooler_output"):
            if key in output and isinstance(output[key], torch.Tensor):
                return output[key].flatten(1)
    raw = getattr(output, "image_embeds", None)
    if isinstance(raw, torch.Tensor):
        return raw.flatten(1)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise TargetError(f"Similarity needs an (N, D) embedding output; got {shape}")


class Similarity(Target):
    r"""Explain the similarity of an image's embedding to a reference (CLIP-style retrieval,
    re-identification, face verification).

    .. math:: y_k = \cos(e(x), r_k) = \frac{e(x)\cdot r_k}{\lVert e(x)\rVert\, \lVert r_k\rVert}

    with :math:`e(x)` the model's output ``(N, D)`` (flattened) and references :math:`r_k`: an
    embedding ``(D,)`` or ``(K, D)``, or images ``(3, H, W)`` / ``(K, 3, H, W)`` already
    preprocessed for the model, embedded once by the model when the target is bound (under
    ``inference_mode``, eval mode held). ``K`` = number of references; the same references for
    every image. A reference equal to the image's own embedding gives the maximum, 1.
    """

    def __init__(self, reference: Any) -> None:
        r = _as_reference(reference)
        self.reference = r
        # embeddings are used as given; images are embedded by bind()
        self._ref: torch.Tensor | None = {1: r[None], 2: r}.get(r.dim())
        if self._ref is not None:
            _check_nonzero(self._ref, "reference embedding")
        self._zero_rows: list[int] = []  # images whose own embedding is zero (set by bind)

    @property
    def k(self) -> int:
        return 1 if self.reference.dim() in (1, 3) else int(self.reference.shape[0])

    def bind(self, output: Any, model: nn.Module | None = None) -> Similarity:
        out = Similarity(self.reference)
        if self._ref is None:
            if model is None:
                raise TargetError("a Similarity reference image needs the model to embed it")
            imgs = self.reference if self.reference.dim() == 4 else self.reference[None]
            with eval_mode(model), torch.no_grad():
                emb = _embedding(model(imgs.to(model_device(model), model_dtype(model)))).detach()
            _check_nonzero(emb, "the model's embedding of reference image")
            out._ref = emb.float()
        out._zero_rows = (_embedding(output).detach().norm(dim=1) == 0).nonzero().flatten().tolist()
        return out

    def empty_rows(self, image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[int, str]:
        """Images whose own embedding is the zero vector (their cosine is undefined)."""
        return {i: "the model's embedding of this image is the zero vector (cosine undefined)" for i in self._zero_rows}

    def __call__(self, output: Any) -> torch.Tensor:
        assert self._ref is not None, "bind() the Similarity target first"
        e = _embedding(output)
        ref = self._ref.to(e.device, e.dtype)
        if ref.shape[1] != e.shape[1]:
            raise TargetError(f"reference embedding has {ref.shape[1]} dimensions; the model's has {e.shape[1]}")
        return (
            torch.nn.functional.normalize(e, dim=1, eps=1e-12) @ torch.nn.functional.normalize(ref, dim=1, eps=1e-12).T
        )
