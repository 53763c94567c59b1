r"""Layout adapter: token sequences and channels-last maps seen as ``(N, D, h, w)`` feature maps.

Layer methods (CAM, Grad-CAM…) work on a spatial feature map :math:`A \in \mathbb{R}^{D\times h\times w}`.
Transformers and some hybrids produce other layouts at the layers worth explaining:

* **tokens** ``(N, T, D)`` (ViT, DeiT, timm, Hugging Face): ``T = p + h\,w`` where the ``p``
  *prefix tokens* (class, distillation, register tokens) come first and the ``h\,w`` patch tokens
  follow in row-major order. The map is ``A[:, d, i, j] = tokens[:, p + i\,w + j, d]``.
* **channels-last** ``(N, h, w, D)`` (torchvision Swin and ConvNeXt blocks, timm): a permutation.

How the layout is found (:func:`infer_layout`), from the captured shape and the input size
``H x W``:

* tokens: with the patch size ``s`` of the model's patch embedding (the first ``Conv2d`` whose
  kernel equals its stride), ``h, w = H // s, W // s`` (or the ceiling, for padded embeddings) and
  ``p = T - h\,w``; without one, every ``p`` in ``0..16`` with a factorisation ``T - p = h\,w``
  whose grid fits the input (some stride ``s`` with ``|h - H/s| < 1`` and ``|w - W/s| < 1``)
  is a candidate, the one whose aspect ratio is closest to ``H/W`` wins (then the smallest ``p``).
  Any resolution and non-square inputs work.
* 4-D ``(N, a, b, c)``: channels-first when ``(b, c)`` fits the input, else channels-last when
  ``(a, b)`` does, else left as it is.

``reshape=`` overrides it: ``"none"`` (no adapter), ``"nchw"``, ``"nhwc"``, ``"tokens"``
(automatic prefix), ``(h, w)`` (tokens with ``p = T - h\,w``) or ``(p, h, w)``.

Gradients: :func:`camlens.core.capture.capture` applies :meth:`Layout.to_nchw` to the captured tensor,
makes the ``(N, D, h, w)`` view the captured leaf and hands the model :meth:`Layout.from_nchw` of
it, so the layer gradient is taken with respect to the reshaped features themselves; the values
the model sees are bit-identical to what it produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from camlens.base.errors import LayoutError

MAX_PREFIX = 16  # class + distillation + register tokens: at most this many prefix tokens
ReshapeSpec = None | str | tuple[int, int] | tuple[int, int, int]


@dataclass(frozen=True)
class Layout:
    """How a captured tensor maps to ``(N, D, h, w)``: ``kind`` is ``"nchw"`` (as is), ``"nhwc"``
    or ``"tokens"`` with ``prefix`` leading tokens and a ``grid`` ``(h, w)``; ``how`` says how it
    was determined."""

    kind: str = "nchw"
    prefix: int = 0
    grid: tuple[int, int] | None = None
    how: str = "auto"

    @property
    def adapted(self) -> bool:
        return self.kind != "nchw"

    def describe(self) -> str:
        if self.kind == "tokens":
            h, w = self.grid or (0, 0)
            pre = f"{self.prefix} prefix token(s) dropped, " if self.prefix else ""
            return f"tokens (N, {self.prefix + h * w}, D) -> (N, D, {h}, {w}): {pre}{h}x{w} patch grid ({self.how})"
        if self.kind == "nhwc":
            return f"channels-last (N, h, w, D) -> (N, D, h, w) ({self.how})"
        return "(N, C, h, w) as captured"

    def to_nchw(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``t`` in this layout -> ``((N, D, h, w) features, prefix tokens (N, p, D) or None)``."""
        if self.kind == "tokens":
            h, w = self.grid  # type: ignore[misc]
            n, _, d = t.shape
            feats = t[:, self.prefix :, :].transpose(1, 2).reshape(n, d, h, w)
            return feats, (t[:, : self.prefix, :] if self.prefix else None)
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2), None
        return t, None

    def from_nchw(self, feats: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """The inverse of :meth:`to_nchw`: a new tensor (never a view of ``feats``) in this layout."""
        if self.kind == "tokens":
            tokens = feats.flatten(2).transpose(1, 2)
            return torch.cat([prefix, tokens], dim=1) if prefix is not None else tokens.contiguous()
        if self.kind == "nhwc":
            return feats.permute(0, 2, 3, 1).clone()
        return feats.clone()


NCHW = Layout()


def grid_fits(h: int, w: int, H: int, W: int) -> bool:
    """Whether an ``h x w`` grid is what some stride ``s`` makes of an ``H x W`` input:
    ``|h - H/s| < 1`` and ``|w - W/s| < 1`` for one ``s`` (the two open intervals of ``s`` meet)."""
    if h < 1 or w < 1 or h > H or w > W:
        return False

    def interval(a: int, A: int) -> tuple[float, float]:
        return A / (a + 1), (A / (a - 1) if a > 1 else math.inf)

    lo1, hi1 = interval(h, H)
    lo2, hi2 = interval(w, W)
    return max(lo1, lo2) < min(hi1, hi2)


def patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The stride of the model's patch embedding: the first ``Conv2d`` whose kernel equals its
    stride (> 1), e.g. torchvision's ``conv_proj``, timm's ``patch_embed.proj``; else ``None``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride) and max(m.stride) > 1:
            return (int(m.stride[0]), int(m.stride[1]))
    return None


def token_grid(T: int, input_hw: tuple[int, int], patch: tuple[int, int] | None = None) -> tuple[int, int, int] | None:
    """``(prefix, h, w)`` for ``T`` tokens of an ``H x W`` input (see the module docstring), or None."""
    H, W = input_hw
    if patch is not None:
        for rnd in (math.floor, math.ceil):
            h, w = int(rnd(H / patch[0])), int(rnd(W / patch[1]))
            if h >= 1 and w >= 1 and 0 <= T - h * w <= MAX_PREFIX:
                return T - h * w, h, w
    best: tuple[float, int, int, int] | None = None
    target = math.log(H / W)
    for p in range(0, min(MAX_PREFIX, T - 1) + 1):
        n = T - p
        for h in range(1, math.isqrt(n) + 1):
            if n % h:
                continue
            for hh, ww in ((h, n // h), (n // h, h)):
                if grid_fits(hh, ww, H, W):
                    key = (abs(math.log(hh / ww) - target), p, hh, ww)
                    if best is None or key[:2] < best[:2]:
                        best = key
    return None if best is None else (best[1], best[2], best[3])


def infer_layout(
    shape: tuple[int, ...],
    input_hw: tuple[int, int] | None,
    patch: tuple[int, int] | None = None,
    reshape: ReshapeSpec = None,
    what: str = "the captured features",
) -> Layout:
    """The :class:`Layout` of a captured tensor of ``shape`` (see the module docstring)."""
    dims = len(shape)
    if isinstance(reshape, str):
        key = reshape.lower().replace("-", "_")
        if key == "none":
            return Layout(how="reshape='none'")
        if key == "nchw":
            return Layout(how="reshape='nchw'")
        if key in ("nhwc", "channels_last"):
            if dims != 4:
                raise LayoutError(f"reshape={reshape!r} needs (N, h, w, D) features; {what} have shape {shape}")
            return Layout("nhwc", how=f"reshape={reshape!r}")
        if key != "tokens" and key != "auto":
            raise LayoutError(
                f"reshape={reshape!r} is not a layout; use None, 'none', 'nchw', 'nhwc', 'tokens', (h, w) or "
                "(prefix, h, w)"
            )
        if key == "tokens" and dims != 3:
            raise LayoutError(f"reshape='tokens' needs (N, T, D) tokens; {what} have shape {shape}")
        reshape = None
    if isinstance(reshape, (tuple, list)):
        if dims != 3:
            raise LayoutError(f"reshape={tuple(reshape)} describes tokens (N, T, D); {what} have shape {shape}")
        T = shape[1]
        if len(reshape) == 2:
            h, w = (int(v) for v in reshape)
            p = T - h * w
        elif len(reshape) == 3:
            p, h, w = (int(v) for v in reshape)
        else:
            raise LayoutError("reshape= as a tuple is (h, w) or (prefix, h, w)")
        if h < 1 or w < 1 or p < 0 or p + h * w != T or (len(reshape) == 2 and p > MAX_PREFIX):
            raise LayoutError(
                f"reshape={tuple(reshape)} does not fit {T} tokens (prefix + h*w must equal {T}, and (h, w) "
                f"leaves at most {MAX_PREFIX} prefix tokens; give (prefix, h, w) for more)"
            )
        return Layout("tokens", p, (h, w), how=f"reshape={tuple(reshape)}")
    if reshape is not None:
        raise LayoutError(f"reshape= must be None, a layout name or a tuple, not {type(reshape).__name__}")
    if dims == 4:
        if input_hw is None:
            return NCHW
        _, a, b, c = shape
        if grid_fits(b, c, *input_hw) or not grid_fits(a, b, *input_hw):
            return NCHW
        return Layout("nhwc", how=f"({a}, {b}) fits the {input_hw[0]}x{input_hw[1]} input, ({b}, {c}) does not")
    if dims == 3:
        if input_hw is None:
            raise LayoutError(f"{what} are tokens of shape {shape} but the input size is unknown; pass reshape=(h, w)")
        got = token_grid(shape[1], input_hw, patch)
        if got is None:
            raise LayoutError(
                f"{what} are {shape[1]} tokens of shape {shape}, and no grid of patch tokens (plus at most "
                f"{MAX_PREFIX} class/register tokens) fits the {input_hw[0]}x{input_hw[1]} input; pass "
                "reshape=(h, w) or reshape=(prefix, h, w), or choose another layer"
            )
        p, h, w = got
        how = (
            f"patch {patch[0]}x{patch[1]}" if patch is not None and (h, w) in _patch_grids(input_hw, patch) else "grid"
        )
        return Layout("tokens", p, (h, w), how=f"{how} of the {input_hw[0]}x{input_hw[1]} input")
    return NCHW


def _patch_grids(input_hw: tuple[int, int], patch: tuple[int, int]) -> set[tuple[int, int]]:
    H, W = input_hw
    return {(int(r(H / patch[0])), int(r(W / patch[1]))) for r in (math.floor, math.ceil)}


@dataclass
class LayoutRequest:
    """What :func:`camlens.core.capture.capture` needs to adapt a capture: the input size, the model
    (for its patch size, looked up only when tokens are seen) and the user's ``reshape=``."""

    input_hw: tuple[int, int] | None
    model: nn.Module | None = None
    reshape: ReshapeSpec = None
    _patch: tuple[int, int] | bool | None = False

    def patch(self) -> tuple[int, int] | None:
        if self._patch is False:
            self._patch = patch_size(self.model) if self.model is not None else None
        return self._patch  # type: ignore[return-value]

    def layout(self, shape: tuple[int, ...], what: str = "the captured features") -> Layout:
        tokens = len(shape) == 3 and (self.reshape is None or self.reshape in ("tokens", "auto"))
        return infer_layout(shape, self.input_hw, self.patch() if tokens else None, self.reshape, what)


__all__ = ["Layout", "LayoutRequest", "ReshapeSpec", "grid_fits", "infer_layout", "patch_size", "token_grid"]
