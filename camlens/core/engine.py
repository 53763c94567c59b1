r"""One shared forward pass, and the gradients the requested methods need from it.

:class:`ForwardPass` runs the model once with the right autograd set-up:

* only CAM / Score-CAM / Eigen-CAM: no graph at all;
* layer-gradient methods: the graph is cut at the captured layer (see :mod:`camlens.core.capture`),
  so the backward only runs through the head;
* pixel methods: the input is a leaf requiring grad and the whole graph is kept; with
  ``rules`` the forward runs under :func:`camlens.core.rules.relu_rules`, so one graph serves the
  plain gradient, Deconvnet and Guided Backprop (the rule is switched per backward pass).

Gradients for the ``K`` target classes come from **one batched backward** per chunk of classes
(:func:`class_grads`): ``torch.autograd.grad(scores, wrt, grad_outputs=E, is_grads_batched=True)``
with ``E`` the one-hot rows :math:`E_j[n, k] = [k = k_0 + j]`, i.e. the vector-Jacobian products
:math:`\partial\,\sum_n s_{n,k}/\partial\,\mathrm{wrt}` for all :math:`k` of the chunk at once
(autograd vmaps its backward over the chunk). The chunk size bounds memory: a chunk holds at most
:data:`GRAD_CHUNK_BYTES` of gradients (see :func:`chunk_size`). Where the batched backward cannot
run (an operation of the model's backward without a batching rule that errors, a custom autograd
function that is not vmap-compatible…), the per-class loop gives the same numbers and
:attr:`ForwardPass.grad_info` says why (``grad_batching(False)`` forces the loop).

Gradients flow only to the tensors asked for, never into parameters' ``.grad``. When the caller
knows how many gradient requests will come (``backwards=``: one method, so one layer and/or one
input gradient), the last backward frees the graph as it goes: its saved activations are released
during the backward and their memory reused for the gradients (ResNet-50, batch 8, CPU: ~8 %
faster than retaining them). A cut graph (layer methods only) is just the head and is kept.

**Layer-gradient reductions.** Layer methods rarely need the ``(N, K, C, h, w)`` gradient tensor
itself: Grad-CAM needs its spatial mean ``(N, K, C)``, XGrad-CAM and Grad-CAM++ one weighted
sum each, HiResCAM and LayerCAM a channel sum ``(N, K, h, w)``. A method declares the reductions
it needs (``needs=("features", "layer_grads:mean")``; a method declares its own reducers with
:func:`camlens.attribution.registry.layer_grad_reduction`, and the caller hands them to the pass
through :class:`PassRequest`), and :meth:`ForwardPass.layer_grad_sums` computes every declared
reduction chunk by chunk in one sweep of batched backwards, so the full tensor only exists a
chunk at a time (``"layer_grads"`` alone still asks for the full tensor, ``ctx.layer_grads()``).
:func:`gradient_pass` does the same on a new batch (SmoothGrad's noisy copies, Integrated
Gradients' path points), optionally under a ReLU rule.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from camlens.base.errors import InputError, LayoutError, MethodError, NonFiniteError
from camlens.base.ops import spatial_axes
from camlens.core.attention import capture_attention
from camlens.core.capture import CaptureSpec, capture
from camlens.core.layout import Layout, LayoutRequest, ReshapeSpec, token_grid
from camlens.core.outputs import OutputSpec, select_output
from camlens.core.precision import LOW_PRECISION
from camlens.core.rules import RuleSwitch, relu_rules
from camlens.models.input_size import diagnose_size_error
from camlens.models.tasks import Frames, record_frames
from camlens.targets import Targets, TargetSpec, bind_target, is_target_object, resolve_targets

#: Gradient memory one batched backward may produce (the chunk over classes holds at most this).
#: Small on purpose: a chunk that stays in the CPU caches is reduced faster (the measurements:
#: BENCHMARKS.md, "Measurements behind defaults").
GRAD_CHUNK_BYTES = 16 * 2**20
#: A backward through the whole network (input gradients) holds intermediate gradients too: per
#: class about this many times the input's size (BENCHMARKS.md, "Measurements behind defaults").
INPUT_BACKWARD_FACTOR = 8


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 for a tensor an autocast forward made in bf16/fp16; any other dtype (float64 too) kept."""
    return t.float() if t.dtype in LOW_PRECISION else t


_BATCHED: ContextVar[bool] = ContextVar("camlens_batched_grads", default=True)
_CHUNK: ContextVar[int | None] = ContextVar("camlens_grad_chunk", default=None)


@contextlib.contextmanager
def grad_batching(enabled: bool = True, chunk: int | None = None) -> Iterator[None]:
    """Within the block, K-class gradients use one batched backward per chunk (``enabled``) or the
    per-class loop (``enabled=False``); ``chunk`` fixes the classes per batched backward (default:
    from :data:`GRAD_CHUNK_BYTES`). Context-local (threads and tasks each keep their own)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be an integer >= 1, not {chunk!r}")
    t1, t2 = _BATCHED.set(bool(enabled)), _CHUNK.set(chunk)
    try:
        yield
    finally:
        _BATCHED.reset(t1)
        _CHUNK.reset(t2)


def chunk_size(k: int, wrt: torch.Tensor, factor: float = 1.0) -> int:
    """Classes per batched backward: ``grad_batching(chunk=)`` if set, else as many as keep
    ``chunk · factor · bytes(wrt)`` within :data:`GRAD_CHUNK_BYTES` (at least 1, at most ``k``)."""
    fixed = _CHUNK.get()
    if fixed is not None:
        return max(1, min(k, fixed))
    per_class = max(1.0, wrt.numel() * wrt.element_size() * factor)
    return max(1, min(k, int(GRAD_CHUNK_BYTES // per_class)))


@dataclass
class GradInfo:
    """How the last K-class gradients were computed: ``mode`` ``"batched"`` (one vmapped backward
    per chunk of ``chunk`` classes) or ``"loop"`` (one backward per class), and ``reason`` when
    the loop was used (``"one class"``, ``"grad_batching(False)"``, ``"chunk of 1 class (memory)"``,
    or the error of the batched backward that made camlens fall back)."""

    mode: str = "loop"
    chunk: int = 1
    reason: str | None = None


def class_grads(
    scores: torch.Tensor,
    wrt: torch.Tensor,
    *,
    free_graph: bool = False,
    factor: float = 1.0,
    info: GradInfo | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    r"""Yield ``(k0, G)`` with ``G`` ``(N, Kc, *wrt.shape[1:])`` = :math:`\partial \sum_n s_{n,k} / \partial\,wrt`
    for the classes ``k0 .. k0 + Kc - 1`` of ``scores`` ``(N, K)``, chunk by chunk.

    One batched backward per chunk (``is_grads_batched=True``, one-hot ``grad_outputs``); the
    chunk size comes from :func:`chunk_size` (``factor``: backward memory per class in units of
    ``wrt``'s size). If the batched backward raises, the remaining classes use the per-class
    loop (same numbers) and ``info.reason`` records the error. The first batched backward always
    keeps the graph (so that a failure can fall back: it is a probe); with ``free_graph`` the
    last backward frees it, and a request that fits in one chunk is split in two halves so that
    the second one still does. Unused ``wrt`` (no path from the score) gives zeros.
    """
    info = info if info is not None else GradInfo()
    n, k = scores.shape
    if not scores.requires_grad:  # scores that depend on nothing (a detector that found no box): zeros
        info.mode, info.chunk, info.reason = "loop", 1, "scores do not depend on the input"
        for kk in range(k):
            yield kk, torch.zeros((wrt.shape[0], 1, *wrt.shape[1:]), dtype=wrt.dtype, device=wrt.device)
        return
    step = chunk_size(k, wrt, factor)
    batched = k > 1 and step > 1 and _BATCHED.get()
    info.mode, info.chunk = ("batched", step) if batched else ("loop", 1)
    info.reason = (
        None
        if batched
        else "one class"
        if k == 1
        else "grad_batching(False)"
        if not _BATCHED.get()
        else "chunk of 1 class (memory)"
    )
    k0 = 0
    tried = False
    while batched and k0 < k:
        k1 = min(k, k0 + step)
        if free_graph and not tried and k1 == k:  # the probe keeps the graph: let it take half only,
            k1 = (k + 1) // 2  # so that the second half still frees the graph as it goes
        eye = torch.zeros((k1 - k0, n, k), dtype=scores.dtype, device=scores.device)
        eye[torch.arange(k1 - k0), :, torch.arange(k0, k1)] = 1
        try:
            with torch.enable_grad():
                (g,) = torch.autograd.grad(
                    scores,
                    wrt,
                    eye,
                    retain_graph=not (free_graph and k1 == k and tried),
                    allow_unused=True,
                    is_grads_batched=True,
                )
        except (RuntimeError, NotImplementedError) as exc:
            if tried:  # the same graph worked for an earlier chunk: a real error
                raise
            batched = False
            info.mode, info.chunk = "loop", 1
            info.reason = f"batched backward failed, per-class loop used: {type(exc).__name__}: {exc}"
            warnings.warn(
                f"camlens: the {k} class gradients could not be computed in one batched backward "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); using one backward per class "
                "(same result, slower). camlens.core.engine.grad_batching(False) skips the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        tried = True
        if g is None:
            g = torch.zeros((k1 - k0, *wrt.shape), dtype=wrt.dtype, device=wrt.device)
        yield k0, g.movedim(0, 1)
        k0 = k1
    for kk in range(k0, k):
        with torch.enable_grad():
            (g,) = torch.autograd.grad(
                scores[:, kk].sum(), wrt, retain_graph=not (free_graph and kk == k - 1), allow_unused=True
            )
        yield kk, (torch.zeros_like(wrt) if g is None else g)[:, None]


def stacked_grads(scores: torch.Tensor, wrt: torch.Tensor, **kwargs) -> torch.Tensor:
    """All of :func:`class_grads` as one ``(N, K, *wrt.shape[1:])`` tensor."""
    k = scores.shape[1]
    out = torch.empty((wrt.shape[0], k, *wrt.shape[1:]), dtype=wrt.dtype, device=wrt.device)
    for k0, g in class_grads(scores, wrt, **kwargs):
        out[:, k0 : k0 + g.shape[1]] = g
    return out


# ---------------------------------------------------------------------------------------------
#: ``reducer(G, A) -> (N, Kc, ...)`` for a chunk ``G`` ``(N, Kc, C, *spatial)`` of layer gradients and
#: the features ``A`` ``(N, C, *spatial)`` (``spatial``: ``(h, w)``, or ``(d, h, w)`` for a volume);
#: the results of all chunks are concatenated along ``K``.
LayerReducer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: the reductions every pass knows; a method declares its own with
#: :func:`camlens.attribution.registry.layer_grad_reduction` and the caller hands them to the pass
#: (``PassRequest.reductions``, looked up through the registry)
BUILTIN_REDUCTIONS: dict[str, LayerReducer] = {
    "full": lambda G, A: G,
    "mean": lambda G, A: G.mean(dim=spatial_axes(G, 3)),
    "sqmean": lambda G, A: G.pow(2).mean(dim=spatial_axes(G, 2)),
}


def wants_layer_grads(needs: frozenset | set) -> bool:
    """Whether ``needs`` asks for layer gradients (the full tensor or a reduction)."""
    return any(n == "layer_grads" or n.startswith("layer_grads:") for n in needs)


def _declared_reductions(needs: frozenset) -> set[str]:
    out = {n.split(":", 1)[1] for n in needs if n.startswith("layer_grads:")}
    if "layer_grads" in needs:
        out.add("full")
    return out


def model_input(x: torch.Tensor) -> torch.Tensor:
    """What camlens hands the model for an input ``x`` it must keep intact: a copy (in the autograd
    graph when ``x`` requires grad). Never the caller's tensor, never a leaf that requires grad —
    so in-place operations at the start of ``forward`` are harmless and exact. A copy of one batch
    costs far less than the forward it feeds. A list of images (a detector's batch) is copied image
    by image."""
    if isinstance(x, (list, tuple)):
        return [t.clone() for t in x]
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
    if not isinstance(exc, RuntimeError) or not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
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
            if want == 3 and x.dim() == 4
            else " Repeat a single channel with x.expand(-1, 3, -1, -1, -1) (the model was built for 3)"
            if want == 3
            else ""
        )
        what = "images" if x.dim() == 4 else "volumes / clips"
        return InputError(
            f"the model takes {want}-channel {what} but the input has {got} channel(s) (shape {tuple(x.shape)}).{fix}"
        )
    if any(s in msg for s in _TOO_SMALL) and x.dim() == 5:
        return InputError(
            f"the input volumes ({'x'.join(map(str, x.shape[2:]))} voxels) are too small for this model: a "
            "convolution or pooling window is larger than its feature map. Resample or pad them to the size the "
            "model was trained on (e.g. 16x112x112 clips for torchvision's video classifiers)"
        )
    if any(s in msg for s in _TOO_SMALL):
        return InputError(
            f"the input images ({x.shape[-2]}x{x.shape[-1]} px) are too small for this model: a convolution "
            "or pooling window is larger than its feature map. Resize them (e.g. to 224x224 for ImageNet "
            "models), or pass the images themselves and let the model's preprocessing resize them"
        )
    return None


def forward(model: nn.Module, x: torch.Tensor):
    """``model(model_input(x))``; a failure caused by the input's shape (channels, too small, a size
    a vision transformer inside it does not take: :mod:`camlens.models.input_size`) becomes an
    :class:`InputError` (chained to the original), anything else the model raises propagates unchanged."""
    try:
        return model(model_input(x))
    except (RuntimeError, ValueError, AssertionError) as exc:
        err = diagnose_size_error(model, tuple(x.shape)) if isinstance(x, torch.Tensor) else None
        if err is None:
            err = diagnose_forward_error(model, x, exc)
        if err is None:
            raise
        raise err from exc


@dataclass(frozen=True)
class PassRequest:
    """What one forward pass is asked for: the ``targets`` (and the ``class_names`` they may name),
    what the methods ``needs`` (see :mod:`camlens.attribution.registry`), how many gradient
    requests will come (``backwards``; ``None``: unknown, keep the graph), which part of the
    output holds the class scores (``output``), the token layout (``reshape``), the layer-gradient
    ``reductions`` the methods declared beyond :data:`BUILTIN_REDUCTIONS`, and ``frames``: the
    :class:`~camlens.models.tasks.Frames` the pass records a detector's resize + pad into (``None``:
    a new one); :attr:`ForwardPass.frames` is it, or ``None`` when the model has no such step."""

    targets: TargetSpec = None
    class_names: Any = None
    needs: frozenset = frozenset()
    backwards: int | None = None
    output: OutputSpec = None
    reshape: ReshapeSpec = None
    reductions: Mapping[str, LayerReducer] = field(default_factory=dict)
    frames: Frames | None = None


class ForwardPass:
    """One forward of the model and, lazily, what the methods ask for from it.

    Built by the named step :meth:`run` (``ForwardPass.run(model, x, spec, request)``), which runs
    the model once and scores the targets; the constructor itself only sets the fields.

    Attributes:
        model, x: the model (in eval mode while the pass lives) and the input batch (a tensor,
            or a list of ``(C, H, W)`` tensors of different sizes for a detector).
        spec: where the features were captured (``None`` if no method needs them).
        output: the model's raw output, whatever it is (target objects consume it).
        logits: ``(N, num_classes)`` class scores selected from it (:func:`camlens.core.outputs.select_output`);
            ``output_choice`` says which part was taken. ``None`` when a target object is given and
            the output is not such a table (a detector's list of dicts, a segmenter's dict).
        features: captured ``(N, C, h, w)`` features (``(N, C, d, h, w)`` for a volume or clip input
            ``(N, C, D, H, W)``; a leaf tensor when the graph was cut), after
            the layout adapter (:mod:`camlens.core.layout`) described by ``layout``.
        targets: resolved :class:`~camlens.targets.Targets`; ``scores`` ``(N, K)`` their scores.
        frames: a detector's resize + pad in this pass (:class:`camlens.models.tasks.Frames`;
            ``None`` for other models): its features cover the padded frame, not the input image.
    """

    #: the dtype the forward ran in under autocast (``explain(..., precision="bf16")``; ``None``: the
    #: model's own): the features reach the methods in float32 but carry that rounding
    autocast: torch.dtype | None = None

    def __init__(
        self, model: nn.Module, x: torch.Tensor | list[torch.Tensor], spec: CaptureSpec | None, request: PassRequest
    ) -> None:
        needs = request.needs
        self.model = model
        self.request = request
        self._backwards = request.backwards  # gradient requests to expect; None: unknown, keep the graph
        self._served = 0
        self.spec = spec
        self.needs = needs
        self.class_names = request.class_names
        self.reshape = request.reshape
        self._reductions = {**BUILTIN_REDUCTIONS, **request.reductions}
        self._layer_sums: dict[str, torch.Tensor] = {}
        self._input_grads: dict[str, torch.Tensor] = {}
        self._freed = False
        #: how the last K-class gradients of this pass were computed (batched or loop, and why)
        self.grad_info = GradInfo()
        self.switch: RuleSwitch | None = None
        self.pool_module: str | None = None
        self.last_spatial: tuple[str, nn.Module] | None = None
        self.token_norm: tuple[str, nn.Module] | None = None
        self.attention_weights: list[torch.Tensor] = []
        self._attention_grads: list[torch.Tensor] | None = None
        self.frames: Frames | None = None
        self.features: torch.Tensor | None = None
        self.calls = 0
        self.layout: Layout | None = None
        self._full = "input_grads" in needs or "attention_grads" in needs  # the whole graph is kept
        self._grad = self._full or wants_layer_grads(needs)
        # ``self.x`` is camlens' own leaf; the model gets a copy of it: an in-place first layer
        # (``nn.ReLU(inplace=True)`` on the input, an in-place normalization in ``forward``) then
        # modifies neither the leaf (autograd forbids that when it requires grad), nor the
        # caller's tensor, nor ``self.x`` that Score-CAM and input x gradient read afterwards
        self._cut = not self._full
        self.x: Any
        if isinstance(x, (list, tuple)):  # a detector's list of images of different sizes
            self.x = [t.detach().requires_grad_(True) if self._full else t.detach() for t in x]
            first = x[0]
        else:
            self.x = x.detach().requires_grad_(True) if self._full else x.detach()
            first = x
        spatial = first.shape[2:] if first.dim() == 5 else first.shape[-2:]  # (D, H, W) of clips and volumes
        self.layout_request = LayoutRequest(tuple(int(s) for s in spatial), model, request.reshape)

    @classmethod
    def run(
        cls,
        model: nn.Module,
        x: torch.Tensor | list[torch.Tensor],
        spec: CaptureSpec | None,
        request: PassRequest | None = None,
        **fields: Any,
    ) -> ForwardPass:
        """The named step that builds a pass: run ``model`` once on ``x`` (capturing the features at
        ``spec``, recording a detector's frames), then resolve and score the targets. ``fields``
        are :class:`PassRequest` fields (``targets=``, ``needs=``…) when no ``request`` is given."""
        req = request if request is not None else PassRequest(**fields)
        if request is not None and fields:
            req = replace(request, **fields)
        ctx = cls(model, x, spec, req)
        raw = ctx._forward()
        ctx._select(raw)
        ctx._score(req.targets, req.class_names, grad=ctx._grad)
        return ctx

    def _forward(self) -> Any:
        """Run the model once under the hooks the methods need; keep what they captured."""
        model, needs, spec = self.model, self.needs, self.spec
        layer_grad = wants_layer_grads(needs)
        attn_grad = "attention_grads" in needs  # gradients at every attention matrix: no cut graph
        with contextlib.ExitStack() as stack:
            frames = stack.enter_context(record_frames(model, self.request.frames))  # a detector's resize + pad
            if "rules" in needs:
                self.switch = stack.enter_context(relu_rules(model))
            cap = None
            if spec is not None:
                cap = stack.enter_context(
                    capture(model, spec, cut=not self._full, need_grad=self._grad, layout=self.layout_request)
                )
            if "attention" in needs or attn_grad:
                self.attention_weights = stack.enter_context(capture_attention(model, grads=attn_grad))
            stack.enter_context(torch.set_grad_enabled(self._full or (layer_grad and spec is None)))
            raw = forward(model, self.x)
        self.frames = frames if frames.seen else None
        if cap is not None:
            self.features, self.calls, self.layout = cap.value, cap.calls, cap.layout
            self.pool_module, self.last_spatial, self.token_norm = cap.pool_module, cap.last_spatial, cap.token_norm
        return raw

    def _select(self, raw: Any) -> None:
        """Keep the raw output and the class scores selected from it (see :attr:`logits`)."""
        self.output = raw
        obj = is_target_object(self.request.targets)
        logits: torch.Tensor | None
        if obj:  # a target object receives the raw output itself (see camlens.targets.Target)
            logits = raw if isinstance(raw, torch.Tensor) and raw.dim() == 2 else None
            self.output_choice = "the raw output (a target object scores it)"
        else:
            logits, self.output_choice = select_output(raw, self.request.output, n=len(self.x))
            check_finite(self.model, self.x, logits)
        # for the extra forwards of some methods: the logits, or the raw output a target object scores
        output = self.request.output
        self.select = (lambda out: out) if obj else (lambda out: select_output(out, output)[0])
        self.logits = logits

    def _score(self, targets: TargetSpec, class_names: Any, *, grad: bool) -> None:
        """Resolve (or bind) the targets on this pass's output and compute the ``(N, K)`` scores,
        keeping their graph when a gradient will be taken."""
        if is_target_object(targets):  # a target object scores the raw output (detections, masks, embeddings)
            sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in self.x]
            self.targets: Targets = bind_target(targets, self.output, self.model, sizes)
            with torch.set_grad_enabled(grad):
                scores = self.targets.scores(self.output)
            self.scores = scores if grad else scores.detach()
        else:
            assert self.logits is not None
            self.targets = resolve_targets(targets, self.logits, class_names)
            with torch.set_grad_enabled(grad):  # also when the caller is under no_grad
                self.scores = self.targets.scores(self.logits if grad else self.logits.detach())
        if self.targets.obj is not None or self.targets.fn is not None:  # class scores: logits already checked
            check_finite_scores(self.scores, self.x, self.output)

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

    def _plan(self) -> bool:
        """Count one gradient request; whether its backward may free the graph."""
        if self._freed:
            raise RuntimeError(
                f"ForwardPass planned {self._backwards} gradient request(s) and freed its graph; "
                "pass backwards=None to keep it"
            )
        self._served += 1
        last = self._backwards is not None and self._served >= self._backwards
        free = last and not self._cut  # a cut graph is only the head: keeping it costs nothing
        self._freed = free
        return free

    def _grads(self, wrt: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        """d scores[:, k] / d wrt for each k, stacked as ``(N, K, *wrt.shape[1:])``."""
        free = self._plan()
        return stacked_grads(self.scores, wrt, free_graph=free, factor=factor, info=self.grad_info)

    def layer_grad_sums(self, name: str) -> torch.Tensor:
        """A reduction of the layer gradients :math:`G = \\partial s_k / \\partial A` registered with
        :func:`layer_grad_reduction` (``"mean"``: ``(N, K, C)`` spatial means; ``"sqmean"``:
        ``(N, K)`` mean of :math:`G^2`; ``"full"``: ``G`` itself, ``(N, K, C, h, w)``; methods add
        their own). Every reduction the pass's methods declared (``needs`` ``"layer_grads:NAME"``)
        is computed in the same sweep of batched backwards, chunk by chunk over ``K``."""
        if name not in self._layer_sums:
            if name not in self._reductions:
                known = ", ".join(sorted(self._reductions))
                raise KeyError(f"unknown layer-gradient reduction {name!r}; known to this pass: {known}")
            if self.features is None or not self.features.requires_grad:
                raise RuntimeError("layer gradients were not prepared for this pass")
            todo = sorted(({name} | _declared_reductions(self.needs)) - set(self._layer_sums))
            todo = [t for t in todo if t in self._reductions]
            A = self.features.detach()
            free = self._plan()
            ctx = self.switch.use("backprop") if self.switch is not None else contextlib.nullcontext()
            out: dict[str, torch.Tensor] = {}
            k = self.k
            with ctx:
                for k0, G in class_grads(self.scores, self.features, free_graph=free, info=self.grad_info):
                    for t in todo:
                        r = self._reductions[t](G, A)
                        if t not in out:
                            out[t] = r.new_empty((r.shape[0], k, *r.shape[2:]))
                        out[t][:, k0 : k0 + r.shape[1]] = r
            self._layer_sums.update(out)
        return self._layer_sums[name]

    def layer_grads(self) -> torch.Tensor:
        """``(N, K, C, h, w)``: gradient of each target score w.r.t. the captured features (the full
        tensor: methods that only need a reduction of it declare ``"layer_grads:NAME"`` instead)."""
        return self.layer_grad_sums("full")

    def attention(self) -> list[torch.Tensor]:
        """The attention matrices of every global self-attention call, in execution order, each
        ``(N, heads, T, T)`` (rows: queries; detached). See :mod:`camlens.core.attention`."""
        if not self.attention_weights:
            raise MethodError(
                "no global self-attention module ran in the forward pass (supported: nn.MultiheadAttention, "
                "timm Attention, Hugging Face ViT-style attention; windowed attention such as Swin's is not); "
                "use a layer method such as gradcam"
            )
        return [_upcast(a.detach()) for a in self.attention_weights]  # float32 also under autocast

    def attention_grads(self) -> list[torch.Tensor]:
        """``[(N, K, heads, T, T)]``: gradient of each target score w.r.t. each attention matrix."""
        if self._attention_grads is None:
            weights = self.attention_weights
            self.attention()  # raises if none
            if not weights[0].requires_grad:
                raise RuntimeError("attention gradients were not prepared for this pass")
            last = self._plan()  # counts the request; raises if the graph was freed
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
                _upcast(torch.stack([_or_zeros(g[i], a) for g in per_k], dim=1)) for i, a in enumerate(weights)
            ]
        return self._attention_grads

    def token_grid(self, T: int) -> tuple[int, int, int]:
        """``(prefix, h, w)`` of a sequence of ``T`` tokens of this input (see :mod:`camlens.core.layout`),
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
                    self._input_grads[rule] = self._grads(self.x, INPUT_BACKWARD_FACTOR)
            else:
                self._input_grads[rule] = self._grads(self.x, INPUT_BACKWARD_FACTOR)
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


def _output_tensors(output: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors of a raw model output (a tensor, a dict, a list of dicts…)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, dict):
        for v in output.values():
            yield from _output_tensors(v)
    elif isinstance(output, (list, tuple)):
        for v in output:
            yield from _output_tensors(v)
    else:
        for v in getattr(output, "values", lambda: [])():  # a Hugging Face ModelOutput
            yield from _output_tensors(v)


def check_finite_scores(scores: torch.Tensor, x: Any, output: Any) -> None:
    """Target scores (of a callable or a target object) that are NaN or Inf — an infinite score has
    no gradient worth a map and a NaN probability — -> :class:`NonFiniteError` naming where they
    came from: the input, the model's output (overflow), or the target itself."""
    if bool(torch.isfinite(scores.detach()).all()):
        return
    bad = (~torch.isfinite(scores.detach())).nonzero().tolist()
    where = ", ".join(f"image {i} target {k}" for i, k in bad[:6]) + (" …" if len(bad) > 6 else "")
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in x):
        cause = "the input holds NaN or Inf values: clean it (e.g. torch.nan_to_num) or drop those images"
    elif any(not bool(torch.isfinite(t.detach()).all()) for t in _output_tensors(output)):
        cause = (
            "the model's output holds NaN or Inf from a finite input: its activations overflow (run it in float32) "
            "or its weights hold NaN/Inf"
        )
    else:
        cause = (
            "the target (a callable or target object) computed them from finite model outputs: make it return "
            "finite scores (no division by zero, log of 0, or float('inf') weights)"
        )
    raise NonFiniteError(f"the target scores are NaN or Inf ({where}); {cause}")


def gradient_pass(model: nn.Module, x: torch.Tensor, targets: Targets, rule: str = "backprop", select=None) -> GradPass:
    """One extra forward of a new batch ``x`` ``(B, C, H, W)`` and the ``K``-class backward to it
    (batched over classes, see :func:`class_grads`).

    For methods that need gradients at inputs other than the explained one (SmoothGrad's noisy
    copies, Integrated Gradients' path points). ``targets`` must have one row of classes per
    row of ``x`` (or a callable acting row-wise). Under ``rule != "backprop"`` the forward runs
    inside :func:`camlens.core.rules.relu_rules`. Gradients flow to ``x`` only (never to parameters);
    the graph is freed before returning. The caller keeps the model in eval mode. ``select``
    (``ctx.select``) picks the logits from a model output that is not one tensor.
    """
    xb = x.detach().requires_grad_(True)
    with contextlib.ExitStack() as stack:
        switch = None
        stack.enter_context(torch.enable_grad())
        if rule != "backprop":  # the rules cover the model's ReLUs, not the target's own clamps
            with relu_rules(model) as switch:
                logits = forward(model, xb)
        else:
            logits = forward(model, xb)
        scores = targets.scores(select(logits) if select is not None else logits)
        if switch is not None:
            stack.enter_context(switch.use(rule))
        grads = stacked_grads(scores, xb, free_graph=True, factor=INPUT_BACKWARD_FACTOR)
    return GradPass(grads, scores.detach(), switch.relu_calls if switch else -1)
