r"""Transformer-native maps from the attention matrices of every block (:mod:`camlens.core.attention`).

Notation: :math:`A^{(l)} \in \mathbb{R}^{H\times T\times T}` the attention of block :math:`l` (heads
:math:`H`, tokens :math:`T = p + h\,w` with :math:`p` prefix tokens), rows are queries. The map of an
image is the row of the class token (token 0) over the patch tokens, reshaped to the
:math:`h\times w` grid; a model without prefix tokens uses the mean row instead.

* ``attention_rollout`` — Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.
  Heads are fused (``head_fusion``: mean, max or min over :math:`H`) into :math:`\bar A^{(l)}`;
  with ``discard_ratio`` :math:`r > 0` the :math:`\lfloor r\,T^2 \rfloor` smallest entries of each
  image's :math:`\bar A^{(l)}` are set to zero; the residual connection is accounted for and rows
  re-normalised, :math:`\hat A^{(l)} = \mathrm{rownorm}\big(\tfrac12(\bar A^{(l)} + I)\big)`, and
  :math:`R = \hat A^{(L)} \cdots \hat A^{(1)}`. Class-agnostic: every target gets the same map.
* ``generic_attention`` — Chefer, Gur & Wolf, "Generic Attention-model Explainability for
  Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021 (self-attention rules). With
  :math:`G^{(l)} = \partial y_c / \partial A^{(l)}` for the target score :math:`y_c`:
  :math:`\bar A^{(l)} = \mathbb{E}_h\big[(G^{(l)} \odot A^{(l)})^+\big]`, starting from
  :math:`R = I`, for :math:`l = 1..L`: :math:`R \leftarrow R + \bar A^{(l)} R`. Class-specific.

Only global self-attention is handled (ViT, DeiT, timm, Hugging Face ViT; not windowed Swin).
"""

from __future__ import annotations

import torch

from camlens.attribution.registry import MethodOutput, register
from camlens.base.errors import MethodError


def _check_tokens(ctx, mats: list[torch.Tensor]) -> tuple[int, int, int]:
    N = ctx.x.shape[0]
    T = mats[0].shape[-1]
    for a in mats:
        if a.dim() != 4 or a.shape[0] != N or a.shape[-1] != T or a.shape[-2] != T:
            raise MethodError(
                "the attention modules do not share one token sequence of the batch (shapes "
                f"{sorted({tuple(m.shape) for m in mats})}): windowed or pooled attention is not supported; "
                "use a layer method such as gradcam"
            )
    return ctx.token_grid(T)


def _read_map(R: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """``R`` ``(..., T, T)`` -> ``(..., h, w)``: the class token's row (the mean row without one)
    over the patch tokens."""
    row = R[..., 0, prefix:] if prefix else R.mean(dim=-2)
    return row.reshape(*R.shape[:-2], h, w)


def _extras(ctx, mats, prefix, h, w) -> dict:
    return {
        "attention_layers": len(mats),
        "heads": int(mats[0].shape[1]),
        "tokens": f"{mats[0].shape[-1]} = {prefix} prefix + {h}x{w} patches",
        "read_from": "class token row" if prefix else "mean row (no prefix token)",
    }


@register(
    "attention_rollout",
    paper="Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020",
    summary="product of head-fused attention matrices with the residual identity (class-agnostic)",
    title="Attention rollout",
    aliases=("rollout", "attention-rollout"),
    needs=("attention",),
)
def attention_rollout(ctx, *, head_fusion: str = "mean", discard_ratio: float = 0.0) -> MethodOutput:
    """See the module docstring."""
    if head_fusion not in ("mean", "max", "min"):
        raise MethodError(f"head_fusion must be 'mean', 'max' or 'min', not {head_fusion!r}")
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise MethodError(f"discard_ratio must be in [0, 1), not {discard_ratio!r}")
    mats = ctx.attention()
    prefix, h, w = _check_tokens(ctx, mats)
    N, T = mats[0].shape[0], mats[0].shape[-1]
    eye = torch.eye(T, dtype=torch.float64, device=mats[0].device)
    R = eye.expand(N, T, T)
    for a in mats:
        a = a.double()
        fused = a.mean(1) if head_fusion == "mean" else (a.amax(1) if head_fusion == "max" else a.amin(1))
        n_drop = int(discard_ratio * T * T)
        if n_drop:
            flat = fused.flatten(1).clone()
            idx = flat.topk(n_drop, dim=1, largest=False).indices
            fused = flat.scatter(1, idx, 0.0).view(N, T, T)
        ahat = 0.5 * (fused + eye)
        ahat = ahat / ahat.sum(-1, keepdim=True)
        R = ahat @ R
    m = _read_map(R, prefix, h, w).to(mats[0].dtype if mats[0].is_floating_point() else torch.float32)
    raw = m[:, None].expand(N, ctx.k, h, w).contiguous()
    extras = _extras(ctx, mats, prefix, h, w) | {"head_fusion": head_fusion, "discard_ratio": float(discard_ratio)}
    return MethodOutput(raw, extras=extras)


@register(
    "generic_attention",
    paper="Chefer, Gur & Wolf, Generic Attention-model Explainability, ICCV 2021",
    summary="relevance R <- R + E_h[(grad A * A)+] R over the blocks (class-specific)",
    title="Generic attention explainability",
    aliases=("chefer", "gae", "generic-attention"),
    needs=("attention_grads",),
)
def generic_attention(ctx) -> MethodOutput:
    """See the module docstring."""
    mats = ctx.attention()
    prefix, h, w = _check_tokens(ctx, mats)
    grads = ctx.attention_grads()
    N, T = mats[0].shape[0], mats[0].shape[-1]
    R = torch.eye(T, dtype=torch.float64, device=mats[0].device).expand(N, ctx.k, T, T)
    for a, g in zip(mats, grads):
        abar = (g.double() * a.double()[:, None]).clamp_min(0).mean(2)  # (N, K, T, T)
        R = R + abar @ R
    raw = _read_map(R, prefix, h, w).to(mats[0].dtype)
    return MethodOutput(raw.contiguous(), extras=_extras(ctx, mats, prefix, h, w))
