"""One shared forward pass, and the gradients the requested methods need from it.

:class:`ForwardPass` runs the model once with the right autograd set-up:

* only CAM / Score-CAM / Eigen-CAM: no graph at all;
* layer-gradient methods: the graph is cut at the captured layer (see :mod:`camlens.capture`),
  so the backward only runs through the head;
* pixel methods: the input is a leaf requiring grad and the whole graph is kept; with
  ``rules`` the forward runs under :func:`camlens.rules.relu_rules`, so one graph serves the
  plain gradient, Deconvnet and Guided Backprop (the rule is switched per backward pass).

Gradients for the ``K`` target classes come from ``K`` calls of ``torch.autograd.grad`` on one
retained graph; they flow only to the tensors asked for, never into parameters' ``.grad``. When the
caller knows how many gradient requests will come (``backwards=``: one method, so one layer and/or
one input gradient), the last backward frees the graph as it goes: its saved activations are
released during the backward and their memory reused for the gradients (ResNet-50, batch 8, CPU:
~8 % faster than retaining them).
:func:`gradient_pass` does the same on a new batch (SmoothGrad's noisy copies, Integrated
Gradients' path points), optionally under a ReLU rule.
"""

from __future__ import annotations

import contextlib
import re
from typing import NamedTuple

import torch
from torch import nn

from .attention import capture_attention
from .capture import CaptureSpec, capture
from .errors import InputError, LayoutError, MethodError, NonFiniteError
from .layout import LayoutRequest, ReshapeSpec, token_grid
from .outputs import OutputSpec, select_output
from .rules import relu_rules
from .targets import Targets, TargetSpec, resolve_targets


def model_input(x: torch.Tensor) -> torch.Tensor:
    """What camlens hands the model for an input ``x`` it must keep intact: a copy (in the autograd
    graph when ``x`` requires grad). Never the caller's tensor, never a leaf that requires grad —
    so in-place operations at the start of ``forward`` are harmless and exact. A copy of one batch
    costs far less than the forward it feeds."""
    return x.clone()


def _first_conv(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m
    return None


_CHANNELS = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")
_TOO_SMALL = (
    "Kernel size can't be greater than actual input size",
    "Output size is too small",
    "input image is smaller than kernel",
    "Padding size should be less than the corresponding input dimension",
)


def diagnose_forward_error(model: nn.Module, x: torch.Tensor, exc: BaseException) -> InputError | None:
    """An :class:`InputError` naming the problem and the fix when ``model(x)`` failed because of
    the input's shape (wrong channel count, image too small); ``None`` when it is something else
    (then the model's own exception must reach the caller unchanged)."""
    if not isinstance(exc, RuntimeError):
        return None
    msg = str(exc)
    conv = _first_conv(model)
    m = _CHANNELS.search(msg)
    want = int(m.group(1)) if m else (conv.in_channels if conv is not None else None)
    got = x.shape[1]
    if m or (want is not None and want != got and "channels" in msg):
        fix = (
            " Convert grayscale with x.expand(-1, 3, -1, -1) (or x.repeat(1, 3, 1, 1)); drop an alpha channel with "
            "x[:, :3]; or pass the images themselves (paths, PIL images, arrays), which camlens converts to RGB"
            if want == 3
            else ""
        )
        return InputError(
            f"the model takes {want}-channel images but the input has {got} channel(s) (shape {tuple(x.shape)}).{fix}"
        )
    if any(s in msg for s in _TOO_SMALL):
        return InputError(
            f"the input images ({x.shape[-2]}x{x.shape[-1]} px) are too small for this model: a convolution "
            "or pooling window is larger than its feature map. Resize them (e.g. to 224x224 for ImageNet "
            "models), or pass the images themselves and let the model's preprocessing resize them"
        )
    return None


def forward(model: nn.Module, x: torch.Tensor):
    """``model(model_input(x))``; a failure caused by the input's shape becomes an :class:`InputError`
    (chained to the original), anything else the model raises propagates unchanged."""
    try:
        return model(model_input(x))
    except RuntimeError as exc:
        err = diagnose_forward_error(model, x, exc)
        if err is None:
            raise
        raise err from exc


class ForwardPass:
    """Runs ``model(x)`` once and lazily computes what the methods ask for.

    Attributes:
        model, x: the model (in eval mode while the pass lives) and the input batch.
        spec: where the features were captured (``None`` if no method needs them).
        output: the model's raw output, whatever it is (target objects consume it).
        logits: ``(N, num_classes)`` class scores selected from it (:func:`camlens.outputs.select_output`);
            ``output_choice`` says which part was taken.
        features: captured ``(N, C, h, w)`` features (a leaf tensor when the graph was cut), after
            the layout adapter (:mod:`camlens.layout`) described by ``layout``.
        targets: resolved :class:`~camlens.targets.Targets`; ``scores`` ``(N, K)`` their scores.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        spec: CaptureSpec | None,
        targets: TargetSpec,
        class_names=None,
        *,
        needs: frozenset = frozenset(),
        backwards: int | None = None,
        output: OutputSpec = None,
        reshape: ReshapeSpec = None,
    ) -> None:
        self.model = model
        self._backwards = backwards  # gradient requests to expect; None: unknown, keep the graph
        self._served = 0
        self.spec = spec
        self.needs = needs
        self.class_names = class_names
        self._layer_grads: torch.Tensor | None = None
        self._input_grads: dict[str, torch.Tensor] = {}
        self.switch = None
        self.pool_module: str | None = None
        self.last_spatial = None
        self.reshape = reshape
        self.attention_weights: list[torch.Tensor] = []
        self._attention_grads: list[torch.Tensor] | None = None
        pixel = "input_grads" in needs
        layer_grad = "layer_grads" in needs
        attn_grad = "attention_grads" in needs  # gradients at every attention matrix: no cut graph
        full = pixel or attn_grad
        # ``self.x`` is camlens' own leaf; the model gets a copy of it: an in-place first layer
        # (``nn.ReLU(inplace=True)`` on the input, an in-place normalization in ``forward``) then
        # modifies neither the leaf (autograd forbids that when it requires grad), nor the
        # caller's tensor, nor ``self.x`` that Score-CAM and input x gradient read afterwards
        self.x = x.detach().requires_grad_(True) if full else x.detach()
        self.layout_request = LayoutRequest((int(x.shape[-2]), int(x.shape[-1])), model, reshape)
        stack = contextlib.ExitStack()
        with stack:
            if "rules" in needs:
                self.switch = stack.enter_context(relu_rules(model))
            cap = None
            if spec is not None:
                cap = stack.enter_context(
                    capture(model, spec, cut=not full, need_grad=full or layer_grad, layout=self.layout_request)
                )
            if "attention" in needs or attn_grad:
                self.attention_weights = stack.enter_context(capture_attention(model, grads=attn_grad))
            stack.enter_context(torch.set_grad_enabled(full or (layer_grad and spec is None)))
            raw = forward(model, self.x)
        self.output = raw
        logits, self.output_choice = select_output(raw, output, n=x.shape[0])
        self.select = lambda out: select_output(out, output)[0]  # for the extra forwards of some methods
        check_finite(model, self.x, logits)
        self.logits = logits
        self.features = cap.value if cap is not None else None
        self.calls = cap.calls if cap is not None else 0
        self.layout = cap.layout if cap is not None else None
        self.token_norm = None
        if cap is not None:
            self.pool_module = cap.pool_module
            self.last_spatial = cap.last_spatial
            self.token_norm = cap.token_norm
        self.targets: Targets = resolve_targets(targets, logits, class_names)
        with torch.set_grad_enabled(full or layer_grad):  # also when the caller is under no_grad
            self.scores = self.targets.scores(logits if (full or layer_grad) else logits.detach())

    # ------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.targets.k

    @property
    def layer_features(self) -> torch.Tensor:
        """The captured ``(N, C, h, w)`` features; methods that declare ``"features"`` always have them."""
        if self.features is None:
            raise RuntimeError("layer features were not captured for this pass (declare needs=('features', ...))")
        return self.features

    @property
    def layer_spec(self) -> CaptureSpec:
        """Where the features were captured (see :attr:`layer_features`)."""
        if self.spec is None:
            raise RuntimeError("no layer was captured for this pass")
        return self.spec

    def _grads(self, wrt: torch.Tensor) -> torch.Tensor:
        """d scores[:, k] / d wrt for each k, stacked as ``(N, K, *wrt.shape[1:])``."""
        if self._backwards is not None and self._served >= self._backwards:
            raise RuntimeError(
                f"ForwardPass planned {self._backwards} gradient request(s) and freed its graph; "
                "pass backwards=None to keep it"
            )
        self._served += 1
        last = self._backwards is not None and self._served == self._backwards
        out = []
        with torch.enable_grad():
            for k in range(self.k):
                (g,) = torch.autograd.grad(
                    self.scores[:, k].sum(), wrt, retain_graph=not (last and k == self.k - 1), allow_unused=True
                )
                out.append(torch.zeros_like(wrt) if g is None else g)
        return torch.stack(out, dim=1)

    def layer_grads(self) -> torch.Tensor:
        """``(N, K, C, h, w)``: gradient of each target score w.r.t. the captured features."""
        if self._layer_grads is None:
            if self.features is None or not self.features.requires_grad:
                raise RuntimeError("layer gradients were not prepared for this pass")
            if self.switch is not None:
                with self.switch.use("backprop"):
                    self._layer_grads = self._grads(self.features)
            else:
                self._layer_grads = self._grads(self.features)
        return self._layer_grads

    def attention(self) -> list[torch.Tensor]:
        """The attention matrices of every global self-attention call, in execution order, each
        ``(N, heads, T, T)`` (rows: queries; detached). See :mod:`camlens.attention`."""
        if not self.attention_weights:
            raise MethodError(
                "no global self-attention module ran in the forward pass (supported: nn.MultiheadAttention, "
                "timm Attention, Hugging Face ViT-style attention; windowed attention such as Swin's is not); "
                "use a layer method such as gradcam"
            )
        return [a.detach() for a in self.attention_weights]

    def attention_grads(self) -> list[torch.Tensor]:
        """``[(N, K, heads, T, T)]``: gradient of each target score w.r.t. each attention matrix."""
        if self._attention_grads is None:
            weights = self.attention_weights
            self.attention()  # raises if none
            if not weights[0].requires_grad:
                raise RuntimeError("attention gradients were not prepared for this pass")
            if self._backwards is not None and self._served >= self._backwards:
                raise RuntimeError(f"ForwardPass planned {self._backwards} gradient request(s) and freed its graph")
            self._served += 1
            last = self._backwards is not None and self._served == self._backwards
            per_k: list[tuple[torch.Tensor | None, ...]] = []
            with torch.enable_grad():
                for k in range(self.k):
                    per_k.append(
                        torch.autograd.grad(
                            self.scores[:, k].sum(),
                            weights,
                            retain_graph=not (last and k == self.k - 1),
                            allow_unused=True,
                        )
                    )
            self._attention_grads = [
                torch.stack([_or_zeros(g[i], a) for g in per_k], dim=1) for i, a in enumerate(weights)
            ]
        return self._attention_grads

    def token_grid(self, T: int) -> tuple[int, int, int]:
        """``(prefix, h, w)`` of a sequence of ``T`` tokens of this input (see :mod:`camlens.layout`),
        honouring a ``reshape=`` given as ``(h, w)`` or ``(prefix, h, w)``."""
        lay = self.layout_request.layout((self.x.shape[0], T, 1), "the attention's tokens")
        if lay.kind != "tokens":
            got = token_grid(T, (int(self.x.shape[-2]), int(self.x.shape[-1])), self.layout_request.patch())
            if got is None:
                raise LayoutError(f"no patch grid fits {T} tokens; pass reshape=(h, w)")
            return got
        h, w = lay.grid  # type: ignore[misc]
        return lay.prefix, h, w

    def input_grads(self, rule: str = "backprop") -> torch.Tensor:
        """``(N, K, C, H, W)``: gradient of each target score w.r.t. the input under a ReLU rule
        (``"backprop"``: the true gradient; ``"deconvnet"``; ``"guided"``)."""
        if rule not in self._input_grads:
            if not self.x.requires_grad:
                raise RuntimeError("input gradients were not prepared for this pass")
            if rule != "backprop" and self.switch is None:
                raise RuntimeError("ReLU rules were not prepared for this pass")
            if self.switch is not None:
                with self.switch.use(rule):
                    self._input_grads[rule] = self._grads(self.x)
            else:
                self._input_grads[rule] = self._grads(self.x)
        return self._input_grads[rule]


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


class GradPass(NamedTuple):
    """Result of :func:`gradient_pass`: ``grads`` ``(B, K, C, H, W)``, detached ``scores`` ``(B, K)``
    and how many ReLU calls the rule replaced (``-1`` when the plain gradient needed no rules)."""

    grads: torch.Tensor
    scores: torch.Tensor
    relu_calls: int


def check_finite(model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> None:
    """One ``isfinite().all()`` over the input and the logits (a single device sync); on failure,
    say which images and whether the input or the model (its weights) is to blame."""
    ok = torch.isfinite(logits).all()
    if x.is_floating_point():
        ok = ok & torch.isfinite(x).all()
    if bool(ok):
        return

    def rows(t: torch.Tensor) -> str:
        bad = (~torch.isfinite(t.detach().flatten(1))).any(1).nonzero().flatten().tolist()
        return ", ".join(map(str, bad[:8])) + (" …" if len(bad) > 8 else "")

    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            f"the input holds NaN or Inf values (image(s) {rows(x)}): every logit of such an image is NaN, "
            "so its classes and maps would be meaningless. Clean the input (e.g. torch.nan_to_num) or drop it."
        )
    params = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    params += [n for n, b in model.named_buffers() if b.is_floating_point() and not bool(torch.isfinite(b).all())]
    cause = (
        f"its weights hold NaN/Inf ({', '.join(params[:4])}{' …' if len(params) > 4 else ''}): a diverged "
        "training or a damaged checkpoint; load other weights"
        if params
        else f"its activations overflow in {logits.dtype} (try float32) or it computes NaN itself"
    )
    raise NonFiniteError(f"the model returned NaN/Inf logits for image(s) {rows(logits)} from a finite input: {cause}")


def gradient_pass(model: nn.Module, x: torch.Tensor, targets: Targets, rule: str = "backprop", select=None) -> GradPass:
    """One extra forward of a new batch ``x`` ``(B, C, H, W)`` and ``K`` backward passes to it.

    For methods that need gradients at inputs other than the explained one (SmoothGrad's noisy
    copies, Integrated Gradients' path points). ``targets`` must have one row of classes per
    row of ``x`` (or a callable acting row-wise). Under ``rule != "backprop"`` the forward runs
    inside :func:`camlens.rules.relu_rules`. Gradients flow to ``x`` only (never to parameters);
    the graph is freed before returning. The caller keeps the model in eval mode. ``select``
    (``ctx.select``) picks the logits from a model output that is not one tensor.
    """
    xb = x.detach().requires_grad_(True)
    with contextlib.ExitStack() as stack:
        switch = None
        if rule != "backprop":
            switch = stack.enter_context(relu_rules(model))
        stack.enter_context(torch.enable_grad())
        logits = forward(model, xb)
        scores = targets.scores(select(logits) if select is not None else logits)
        if switch is not None:
            stack.enter_context(switch.use(rule))
        out = []
        for k in range(targets.k):
            (g,) = torch.autograd.grad(scores[:, k].sum(), xb, retain_graph=k < targets.k - 1, allow_unused=True)
            out.append(torch.zeros_like(xb) if g is None else g)
    return GradPass(torch.stack(out, dim=1), scores.detach(), switch.relu_calls if switch else -1)
