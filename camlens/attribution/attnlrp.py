r"""AttnLRP: layer-wise relevance propagation through vision transformers.

Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers",
ICML 2024. The relevance of target :math:`k` starts as its score :math:`s_k` (the logit) and is
propagated with one rule per operation:

* linear layers (patch embedding, projections, MLP, head): the epsilon rule with
  :math:`\epsilon \to 0`, :math:`R_i = \sum_j x_i w_{ij} R_j / z_j` (biases absorb their share);
* element-wise activations (GELU, …): the identity rule :math:`R_z = R_{f(z)}`;
* layer norm: the identity rule on the division by the standard deviation, i.e. the epsilon rule
  on :math:`(x - \mu)/\sigma \cdot w` with :math:`\sigma` taken as a constant;
* softmax: :math:`R^{in}_i = x_i\,(R^{out}_i - s_i \sum_j R^{out}_j)` (its Taylor bias absorbs
  the rest, so the softmax does not conserve relevance);
* the bilinear products :math:`Q K^\top` and :math:`A V`: the uniform rule, half of the relevance
  to each factor, each half by the epsilon rule.

With ``attention="cp"`` the attention matrix is a constant instead (Ali et al., "XAI for
Transformers: Better Explanations through Conservative Propagation", ICML 2022): all of the
relevance goes through the values, and a bias-free transformer conserves it exactly.

**How.** Every one of these rules is "gradient × input" of a modified backward: with
:math:`R = x \odot g` at each tensor, the epsilon rule is the plain gradient through a linear
layer, the softmax rule is the softmax's plain gradient, the identity rule multiplies the
gradient by :math:`f(z)/z` instead of :math:`f'(z)`, the layer-norm rule detaches :math:`\sigma`,
and the uniform rule halves the gradient on each factor. So the input relevance is
:math:`x \odot \partial s_k / \partial x` of one forward with these changes and one batched
backward for all ``K`` targets (about one forward and one backward). The changes are forward
hooks that keep every value bit for bit (:math:`\mathrm{sg}(y) + (y' - \mathrm{sg}(y'))`, with
:math:`\mathrm{sg}` the stop-gradient and :math:`y'` the rule's recomputation): on each global
self-attention module camlens captures (torchvision ``nn.MultiheadAttention``, timm
``Attention``, Hugging Face ViT-style; see :mod:`camlens.core.attention`), each
``nn.LayerNorm`` / ``nn.RMSNorm`` and each activation module. Nothing of the model is patched;
the hooks are removed when the call ends, also when it raises.

This re-implements the paper's rules rather than using LXT (the authors' library): LXT 2.1 pulls
accelerate, bitsandbytes and open_clip in, and it works by replacing functions and modules of
the model's library in place, which camlens could not undo per call nor confine to one thread.

**Output.** ``raw``: the relevance of every input value ``(N, K, C, H, W)``, ``maps`` its
channel sum (signed). ``extras``: ``relevance_sum`` and ``conservation`` (relevance sum / score,
``(N, K)``), and how many attention, norm and activation calls the rules covered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from camlens.attribution.gradients import pixel_output
from camlens.attribution.registry import ATTENTION_MODELS, Cost, MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core.attention import attention_family
from camlens.core.engine import INPUT_BACKWARD_FACTOR, ForwardPass, forward, stacked_grads

ATTENTION_RULES = ("attnlrp", "cp")
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Mish, nn.ELU, nn.Tanh, nn.Sigmoid)


def _keep_value(y: torch.Tensor, y_rule: torch.Tensor) -> torch.Tensor:
    """``y``'s value with ``y_rule``'s gradient: :math:`\\mathrm{sg}(y) + (y' - \\mathrm{sg}(y'))`."""
    return y.detach() + (y_rule - y_rule.detach())


def half_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` whose backward gives each factor half of its gradient (the uniform rule)."""
    return (a @ b.detach() + a.detach() @ b) * 0.5


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _attention_hook(fam: Any, mode: str, counts: dict[str, int]):
    """Forward hook: the module's output with the gradient of the rules' attention."""

    def hook(m: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        q, k, v = fam.qkv(m, args, kwargs)  # q already scaled by 1/sqrt(d)
        wide = torch.promote_types(q.dtype, torch.float32)
        if mode == "cp":
            A = (q @ k.transpose(-2, -1)).to(wide).softmax(-1).to(q.dtype).detach()
            o = A @ v
        else:
            A = half_matmul(q, k.transpose(-2, -1)).to(wide).softmax(-1).to(q.dtype)
            o = half_matmul(A, v)
        delta = fam.delta(m, o)  # the output projection without its bias
        y = _first(output)
        if delta.shape != y.shape:
            raise MethodError(f"attnlrp cannot read {type(m).__name__}'s output {tuple(y.shape)}: not supported")
        counts["attention"] += 1
        return _replace_first(output, _keep_value(y, delta.to(y.dtype)))

    return hook


def _layernorm_hook(counts: dict[str, int]):
    def hook(m: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        dims = tuple(range(-len(m.normalized_shape), 0))
        if isinstance(m, nn.LayerNorm):
            mu = x.mean(dims, keepdim=True)
            sigma = torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + m.eps).detach()
            y = (x - mu) / sigma
        else:  # RMSNorm
            eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            y = x / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + eps).detach()
        if m.weight is not None:
            y = y * m.weight
        counts["norm"] += 1
        return _keep_value(output, y)

    return hook


def _activation_hook(counts: dict[str, int]):
    def hook(m: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        z = args[0]
        if not isinstance(z, torch.Tensor) or not isinstance(output, torch.Tensor) or output.shape != z.shape:
            return None
        ratio = torch.where(z == 0, torch.zeros_like(z), output / torch.where(z == 0, torch.ones_like(z), z))
        counts["activation"] += 1
        return _keep_value(output, z * ratio.detach())

    return hook


def _is_activation(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, _ACTIVATIONS) or (
        next(iter(m.children()), None) is None and ("GELU" in name or name.endswith("Activation"))
    )


def _norm_types() -> tuple[type, ...]:
    rms = getattr(nn, "RMSNorm", None)
    return (nn.LayerNorm,) if rms is None else (nn.LayerNorm, rms)


@contextlib.contextmanager
def attnlrp_rules(model: nn.Module, attention: str = "attnlrp") -> Iterator[dict[str, int]]:
    """While active, a forward of ``model`` keeps its values and back-propagates by the AttnLRP
    rules (see the module docstring); yields the counts of the calls the rules covered."""
    if attention not in ATTENTION_RULES:
        raise MethodError(f"attention must be one of {', '.join(ATTENTION_RULES)}, not {attention!r}")
    counts = {"attention": 0, "norm": 0, "activation": 0}
    handles = []
    try:
        for m in model.modules():
            fam = attention_family(m)
            if fam is not None:
                handles.append(m.register_forward_hook(_attention_hook(fam, attention, counts), with_kwargs=True))
            elif isinstance(m, _norm_types()):
                handles.append(m.register_forward_hook(_layernorm_hook(counts)))
            elif _is_activation(m):
                handles.append(m.register_forward_hook(_activation_hook(counts)))
        yield counts
    finally:
        for h in handles:
            h.remove()


def attnlrp_cost(ctx: ForwardPass, **_: Any) -> Cost:
    """One forward of the batch under the rules and one (batched) backward."""
    return Cost(len(ctx.x), "forwards", backwards=len(ctx.x))


@register(
    "attnlrp",
    paper="Achtibat et al., AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers, ICML 2024",
    summary="layer-wise relevance propagation through attention, layer norms and the MLPs of a ViT",
    kind="pixel",
    needs=(),
    title="AttnLRP",
    applies_to=ATTENTION_MODELS,
    cost=attnlrp_cost,
)
def attnlrp(ctx: ForwardPass, *, attention: str = "attnlrp", reduce: str = "sum") -> MethodOutput:
    x = ctx.x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), attnlrp_rules(ctx.model, attention) as counts:
        out = forward(ctx.model, x)
        scores = ctx.targets.scores(ctx.select(out))
    if counts["attention"] == 0:
        raise MethodError(
            "no global self-attention module camlens supports ran in the forward pass (nn.MultiheadAttention, timm "
            "Attention, Hugging Face ViT-style); attnlrp needs one. For a CNN use lrp"
        )
    g = stacked_grads(scores, x, free_graph=True, factor=INPUT_BACKWARD_FACTOR)
    R = (x.detach()[:, None] * g).detach()
    total = R.flatten(2).sum(-1)
    s = scores.detach()
    extras = {
        "attention": attention,
        "relevance_sum": total,
        "conservation": total / torch.where(s == 0, torch.ones_like(s), s),
        "rules_applied": dict(counts),
        "convention": "relevance of target k starts as its score s_k (the logit for a class)",
        "signed": True,
    }
    return pixel_output(R, reduce, "attnlrp", extras)


__all__ = ["attnlrp", "attnlrp_rules", "half_matmul"]
