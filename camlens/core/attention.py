r"""Capture the attention matrices of a transformer's self-attention modules, with hooks only.

For each global self-attention call, :func:`capture_attention` records

.. math:: A = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}}\right) \in \mathbb{R}^{N\times H\times T\times T}

(rows: queries), computed in a forward pre-hook from the module's own projections applied to the
module's input. The module itself runs unchanged — torchvision's ``nn.MultiheadAttention`` with
``need_weights=False``, timm's fused ``F.scaled_dot_product_attention``, Hugging Face's SDPA
kernels all return no weights — so nothing of the model is patched and its outputs are
bit-identical to a forward without the capture.

**Gradients at A** (``grads=True``, for gradient-weighted attention methods): :math:`A` is made a
leaf requiring grad and a forward hook adds to the module's output

.. math:: \Delta = P\big((A - \mathrm{sg}(A))\,\mathrm{sg}(V)\big)

where :math:`P` is the module's output projection without bias and :math:`\mathrm{sg}` stops the
gradient. :math:`\Delta` is exactly zero, so the output keeps its value bit for bit, and since the
module's output is :math:`P(A V) + b`, :math:`\partial y/\partial A` through :math:`\Delta` is the
true gradient of the score with respect to the attention matrix; every other gradient is the
model's own (``V``, ``Q``, ``K`` are detached in :math:`\Delta`).

Supported modules (by structure, see :func:`attention_family`):

* ``torch.nn.MultiheadAttention`` (torchvision ViT), self-attention without masks, ``bias_k`` or
  ``add_zero_attn``;
* timm ``Attention`` (ViT, DeiT and their register-token variants), fused or not, with ``q_norm``
  / ``k_norm``; gradients need ``norm`` (``scale_norm``) to be the identity;
* Hugging Face ViT-style attention: ``q_proj/k_proj/v_proj/o_proj`` (transformers 5) or
  ``query/key/value`` self-attention (transformers 4), without relative position biases.

Windowed attention (Swin, MaxViT) is not global self-attention and is not captured.
Hooks are removed in ``finally``, also when the forward raises. The hooks act only for the thread
that opened the capture: another thread's forward of the same model passes through untouched.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camlens.base.errors import MethodError


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, T, H*d)`` -> ``(N, H, T, d)``."""
    n, T, _ = t.shape
    return t.reshape(n, T, heads, -1).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """``(N, H, T, d)`` -> ``(N, T, H*d)``."""
    n, h, T, d = t.shape
    return t.transpose(1, 2).reshape(n, T, h * d)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class _Family:
    name = "?"

    def qkv(self, m: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q * scale, k, v)``, each ``(N, H, T, d)``, from the module's input."""
        raise NotImplementedError

    def delta(self, m: nn.Module, o: torch.Tensor) -> torch.Tensor:
        """The module's output projection (without bias) of ``o`` ``(N, H, T, d)``."""
        raise NotImplementedError

    def add(self, m: nn.Module, output: Any, delta: torch.Tensor) -> Any:
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta


class _MHA(_Family):
    name = "nn.MultiheadAttention"

    def qkv(self, m, args, kwargs):
        q_in, k_in, v_in = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
        if _arg(args, kwargs, 3, "key_padding_mask") is not None or _arg(args, kwargs, 5, "attn_mask") is not None:
            raise MethodError("attention masks are not supported by the attention capture")
        if kwargs.get("is_causal", False):
            raise MethodError("causal attention is not supported by the attention capture")
        if m.bias_k is not None or m.add_zero_attn:
            raise MethodError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        if not m.batch_first:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
        E, H = m.embed_dim, m.num_heads
        b = m.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if m._qkv_same_embed_dim:
            wq, wk, wv = m.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        q = _split(F.linear(q_in, wq, bq), H) * (E // H) ** -0.5
        return q, _split(F.linear(k_in, wk, bk), H), _split(F.linear(v_in, wv, bv), H)

    def delta(self, m, o):
        d = F.linear(_merge(o), m.out_proj.weight)
        return d if m.batch_first else d.transpose(0, 1)


class _Timm(_Family):
    name = "timm Attention"

    def qkv(self, m, args, kwargs):
        x = _arg(args, kwargs, 0, "x")
        if _arg(args, kwargs, 1, "attn_mask") is not None or _arg(args, kwargs, 2, "is_causal", False):
            raise MethodError("attention masks are not supported by the attention capture")
        B, T, _ = x.shape
        qkv = m.qkv(x).reshape(B, T, 3, m.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = m.q_norm(q), m.k_norm(k)
        return q * m.scale, k, v

    def delta(self, m, o):
        if not isinstance(m.norm, nn.Identity):
            raise MethodError("timm Attention with scale_norm=True: gradients at the attention are not supported")
        return F.linear(_merge(o), m.proj.weight)


class _HF(_Family):
    name = "Hugging Face attention"

    def qkv(self, m, args, kwargs):
        x = _arg(args, kwargs, 0, "hidden_states")
        masks = ("attention_mask", "head_mask", "causal_attention_mask")
        if any(_arg(args, kwargs, 1 + i, name) is not None for i, name in enumerate(masks)):
            raise MethodError("attention masks are not supported by the attention capture")
        if hasattr(m, "q_proj"):  # ViT-style (transformers 5), or CLIP / SigLIP (num_heads, scale, out_proj)
            H = m.num_attention_heads if hasattr(m, "num_attention_heads") else m.num_heads
            scaling = m.scaling if hasattr(m, "scaling") else m.scale
            q, k, v = (_split(p(x), H) for p in (m.q_proj, m.k_proj, m.v_proj))
            return q * scaling, k, v
        H = m.num_attention_heads
        q, k, v = (_split(p(x), H) for p in (m.query, m.key, m.value))
        return q * m.attention_head_size**-0.5, k, v

    def delta(self, m, o):
        if hasattr(m, "o_proj") or hasattr(m, "out_proj"):
            proj = m.o_proj if hasattr(m, "o_proj") else m.out_proj
            return F.linear(_merge(o), proj.weight)
        return _merge(o)  # transformers 4: the self-attention returns the merged context


def attention_family(m: nn.Module) -> _Family | None:
    """The supported family of an attention module, or ``None`` (see the module docstring)."""
    if isinstance(m, nn.MultiheadAttention):
        return _MHA()
    cls = type(m)
    if cls.__name__ == "Attention" and cls.__module__.startswith("timm"):
        needed = ("qkv", "num_heads", "scale", "q_norm", "k_norm", "proj")
        if all(hasattr(m, a) for a in needed) and getattr(m, "gate", None) is None:
            return _Timm()
        return None
    if cls.__module__.startswith("transformers") and not any("relative" in n for n, _ in m.named_parameters()):
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "num_attention_heads", "scaling")):
            return _HF()
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scale")):
            return _HF()  # CLIP / SigLIP attention
        names = ("query", "key", "value", "num_attention_heads", "attention_head_size")
        if cls.__name__.endswith("SelfAttention") and all(hasattr(m, a) for a in names):
            return _HF()
    return None


#: Attention restricted to windows or grids of the token map (Swin, MaxViT), by class name: camlens
#: captures none of them (see :func:`windowed_attention_modules`).
WINDOWED = frozenset(
    {
        "ShiftedWindowAttention",  # torchvision swin_t/s/b
        "ShiftedWindowAttentionV2",  # torchvision swin_v2_*
        "WindowAttention",  # timm swin_*, swinv2_*
        "WindowMultiHeadAttention",  # timm swinv2_cr_*
        "RelativePositionalMultiHeadAttention",  # torchvision maxvit_t
        "PartitionAttentionCl",  # timm maxvit/maxxvit
        "PartitionAttention2d",
    }
)


def windowed_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's windowed (or grid-partitioned) attention modules: Swin's shifted windows, MaxViT's
    block and grid partitions. Each attends within a window of the stage's token map, the windows
    shift between blocks and patch merging changes the grid between stages, so no attention
    matrix over one token sequence of the image exists for rollout-style methods to multiply."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in WINDOWED]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's supported self-attention modules, in module order."""
    return [(n, m) for n, m in model.named_modules() if attention_family(m) is not None]


@contextlib.contextmanager
def capture_attention(model: nn.Module, *, grads: bool = False) -> Iterator[list[torch.Tensor]]:
    """While active, every supported attention call of a forward appends its ``(N, H, T, T)``
    attention matrix to the yielded list (a leaf requiring grad with ``grads=True``, see the
    module docstring; detached otherwise)."""
    found: list[torch.Tensor] = []
    handles = []
    pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    owner = threading.get_ident()

    def make(m: nn.Module, fam: _Family):
        def pre(mod, args, kwargs):
            if threading.get_ident() != owner:
                return
            with torch.no_grad():
                q, k, v = fam.qkv(mod, args, kwargs)
                wide = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32
                A = (q @ k.transpose(-2, -1)).to(wide).softmax(dim=-1).to(q.dtype)
            if grads:
                A = A.requires_grad_(True)
                pending.setdefault(id(mod), []).append((A, v))
            found.append(A)

        def post(mod, args, kwargs, output):
            if not grads or threading.get_ident() != owner:
                return None
            A, v = pending[id(mod)].pop()
            with torch.enable_grad():
                delta = fam.delta(mod, (A - A.detach()) @ v.detach())
                return fam.add(mod, output, delta)

        return pre, post

    try:
        for _, m in model.named_modules():
            fam = attention_family(m)
            if fam is None:
                continue
            pre, post = make(m, fam)
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            if grads:
                handles.append(m.register_forward_hook(post, with_kwargs=True))
        yield found
    finally:
        for h in handles:
            h.remove()


__all__ = ["WINDOWED", "attention_family", "attention_modules", "capture_attention", "windowed_attention_modules"]
