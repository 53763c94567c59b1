r"""LeGrad — Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, "LeGrad: An Explainability Method for
Vision Transformers via Feature Formation Sensitivity", ICCV 2025 (arXiv 2404.03214).

For every transformer block :math:`l` with self-attention :math:`A^l \in \mathbb{R}^{H\times T\times T}`
(rows: queries) and output tokens :math:`z^l`, the block's own score is the target score of the
model's head applied to the *intermediate* tokens, :math:`s^l = \mathrm{head}(\mathrm{norm}(z^l))`
(the final norm, the model's pooling — its class token or the mean token — and the classifier, as
for the last block). LeGrad takes the gradient of :math:`s^l` with respect to the attention of the
same block, keeps its positive part and averages it over the heads and the query rows:

.. math:: E^l = \frac{1}{H\,T} \sum_{h} \sum_{i} \mathrm{ReLU}\Big(\frac{\partial s^l}{\partial A^l_{h,i,:}}\Big),
          \qquad M = \frac{1}{|\mathcal L|} \sum_{l \in \mathcal L} E^l[\text{patch keys}]

read over the patch keys (prefix keys — class and register tokens — dropped) on the token grid.
The attention values are not multiplied in: the gradient itself is the signal.

Options: ``layers`` — the last ``layers`` blocks (``None``: all, the paper's aggregation);
``rows`` — ``"all"`` (the mean over every query row, as the paper and the authors' code) or
``"cls"`` (the class token's row only); ``head`` — a callable mapping a block's tokens ``(N, T, D)``
to the model's output, for models whose final norm and head camlens does not know (it knows
torchvision's ``VisionTransformer``, timm's ``VisionTransformer`` — its ``norm`` then
``forward_head``: pooling, ``fc_norm``, head — and Hugging Face ``ViTForImageClassification``).
TorchCAM 0.5's ``LeGrad`` scores the *mean* token, ``heads(norm(mean(z)))``; with that ``head``
camlens equals it.

**Cost.** One forward of the batch with the attention matrices captured as leaves of the graph
(:func:`camlens.core.attention.capture_attention`; the model's outputs are unchanged) and the
blocks' outputs recorded by forward hooks, then per block one batched backward over the targets
(:func:`camlens.core.engine.stacked_grads`) from :math:`s^l` to :math:`A^l`, which only runs
through the head and that block. Hooks removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

from camlens.attribution.registry import ATTENTION_MODELS, Cost, MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core.attention import attention_modules, capture_attention
from camlens.core.engine import ForwardPass, forward, stacked_grads

Head = Callable[[torch.Tensor], torch.Tensor]
ROWS = ("all", "cls")


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block of each supported attention module: its nearest ancestor that is an element of an
    ``nn.Sequential`` or ``nn.ModuleList`` (torchvision ``encoder.layers.encoder_layer_i``, timm
    ``blocks.i``, Hugging Face ``encoder.layer.i``), in the attention modules' order."""
    mods = dict(model.named_modules())
    out = []
    for name, _ in attention_modules(model):
        parts = name.split(".")
        block = None
        for i in range(len(parts) - 1, 0, -1):
            parent = mods[".".join(parts[: i - 1])] if i > 1 else model
            if isinstance(parent, (nn.Sequential, nn.ModuleList)):
                block = ".".join(parts[:i])
                break
        if block is None:
            raise MethodError(
                f"legrad needs the transformer block around the attention module {name!r} (an element of an "
                "nn.Sequential or nn.ModuleList) and found none; use generic_attention or attention_rollout"
            )
        out.append((block, mods[block]))
    return out


def known_head(model: nn.Module) -> tuple[str, Head] | None:
    """``(description, tokens -> output)``: the final norm, pooling and classifier of a ViT camlens
    knows (see the module docstring), or ``None``."""
    for name, m in model.named_modules():
        cls = type(m)
        where = f" ({name})" if name else ""
        if cls.__name__ == "VisionTransformer" and cls.__module__.startswith("torchvision"):
            return f"torchvision encoder.ln -> class token -> heads{where}", lambda z, m=m: m.heads(
                m.encoder.ln(z)[:, 0]
            )
        if cls.__name__ == "VisionTransformer" and cls.__module__.startswith("timm"):
            return f"timm norm -> forward_head (global_pool={m.global_pool!r}){where}", lambda z, m=m: m.forward_head(
                m.norm(z)
            )
        if cls.__name__ == "ViTForImageClassification" and cls.__module__.startswith("transformers"):
            return f"vit.layernorm -> class token -> classifier{where}", lambda z, m=m: m.classifier(
                m.vit.layernorm(z)[:, 0]
            )
    return None


@contextlib.contextmanager
def record_outputs(modules: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """While active, the token outputs of each module's calls (in this thread), one list per module."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    owner = threading.get_ident()

    def make(i: int):
        def hook(mod, args, output):
            if threading.get_ident() == owner:
                seen[i].append(output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def legrad_cost(ctx: ForwardPass, **_) -> Cost:
    n = len(ctx.x)
    return Cost(n, "forwards", backwards=n)


def _check(ctx: ForwardPass, layers: int | None, rows: str) -> None:
    if rows not in ROWS:
        raise MethodError(f"rows must be one of {', '.join(ROWS)}, not {rows!r}")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise MethodError(f"layers must be an integer >= 1 (the last blocks to aggregate) or None, not {layers!r}")
    if isinstance(ctx.x, list):
        raise MethodError("legrad runs one batch of same-size images; these differ in size: explain them one by one")


@register(
    "legrad",
    paper="Bousselham et al., LeGrad, ICCV 2025 (arXiv 2404.03214)",
    summary="mean over blocks of ReLU(d s_l / d A_l), s_l the head's score of block l's tokens, over heads and rows",
    needs=(),
    title="LeGrad",
    applies_to=ATTENTION_MODELS,
    cost=legrad_cost,
)
def legrad(ctx: ForwardPass, *, layers: int | None = None, rows: str = "all", head: Head | None = None) -> MethodOutput:
    """See the module docstring."""
    _check(ctx, layers, rows)
    model = ctx.model
    found = (None, head) if head is not None else known_head(model)
    if found is None:
        raise MethodError(
            f"legrad scores each block's tokens with the model's final norm and head, and does not know those of "
            f"{type(model).__name__}: pass head=lambda tokens: ... (tokens (N, T, D) -> the model's output), or use "
            "generic_attention"
        )
    described, tail = found
    blocks = attention_blocks(model)
    with (
        capture_attention(model, grads=True) as mats,
        record_outputs([b for _, b in blocks]) as outs,
        torch.enable_grad(),
    ):
        forward(model, ctx.x.detach())
    if len(mats) != len(blocks) or any(len(o) != 1 for o in outs):
        raise MethodError(
            f"legrad needs each block to run once with one attention call ({len(blocks)} blocks, "
            f"{len(mats)} attention calls, block calls {[len(o) for o in outs]}); use generic_attention"
        )
    chosen = range(len(blocks))[-layers:] if layers is not None else range(len(blocks))
    T = mats[0].shape[-1]
    prefix, h, w = ctx.token_grid(T)
    total = None
    with torch.enable_grad():
        for i in chosen:
            s = ctx.targets.scores(ctx.select(tail(outs[i][0])))  # (N, K): block i's own scores
            G = stacked_grads(s, mats[i]).relu()  # (N, K, H, T, T)
            E = G.mean(2).mean(2) if rows == "all" else G.mean(2)[..., 0, :]  # (N, K, T): per key
            total = E if total is None else total + E
    assert total is not None
    raw = (total / len(chosen))[..., prefix:].reshape(*total.shape[:2], h, w).detach()
    extras = {
        "layers": len(chosen),
        "rows": rows,
        "head": described or "head= (given)",
        "tokens": f"{T} = {prefix} prefix + {h}x{w} patches",
        "forwards": len(ctx.x),
    }
    return MethodOutput(raw.contiguous(), extras=extras)
