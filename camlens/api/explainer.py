"""``camlens.explain``: the one call that turns a model, images and targets into maps.

    model, images ──preprocess──▶ x ──one forward (features captured)──▶ logits ─▶ targets
                                                 │
                 methods (one shared pass) ◀─────┘──▶ Explanation(maps, raw, classes, scores…)

The model is left exactly as it was: hooks removed, every module's train/eval flag restored,
``requires_grad`` untouched, no ``.grad`` written — also when an exception is raised.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast, overload

import torch
from torch import nn

from camlens.api.explanation import Explanation, Upsampled
from camlens.attribution.cost import reported
from camlens.attribution.registry import MethodInfo, ModelTraits, applicable, get_method, reductions_for
from camlens.attribution.registry import methods as all_methods
from camlens.attribution.traits import model_traits
from camlens.base._util import eval_mode, model_device
from camlens.base.errors import InputError, MethodError, NonFiniteError, NotApplicableError, TargetError
from camlens.core.capture import CaptureSpec
from camlens.core.engine import ForwardPass, PassRequest, forward, wants_layer_grads
from camlens.core.extra import ExtraInputs
from camlens.core.inputs import prepare_batch, prepare_inputs
from camlens.core.layers import check_capture, resolve_layer
from camlens.core.layout import ReshapeSpec
from camlens.core.outputs import OutputSpec, select_output
from camlens.core.precision import autocast_dtype, autocast_forwards, check_precision
from camlens.core.resolve import run_resolved
from camlens.models.blackbox import ScoringFunction, unsupported
from camlens.models.card import attach_card
from camlens.models.detectors import as_detector, is_detector
from camlens.models.imagetext import ImageText, ZeroShotClassifier, family_of, image_text, zero_shot
from camlens.models.input_size import fit_input
from camlens.models.onnxmodel import OnnxModel, is_onnx_path
from camlens.models.preprocess import IMAGENET, Preprocess
from camlens.models.tasks import frame_maps
from camlens.models.zoo import card_of, class_names_of, load_model
from camlens.targets import Detection, Segmentation, TargetSpec, is_target_object


def method_names(method: Any) -> list[str]:
    """``method=`` as a non-empty list of names; anything else is a :class:`MethodError`."""
    if isinstance(method, str):
        return [method]
    if isinstance(method, (list, tuple)) and method and all(isinstance(m, str) for m in method):
        return list(method)
    if isinstance(method, (list, tuple)) and not method:
        raise MethodError("no method given: pass a name such as method='gradcam' or a list of names")
    raise MethodError(
        f"method must be a method name (e.g. method='gradcam') or a list of names, not {method!r}; "
        "camlens.methods() lists them"
    )


def check_materialized(model: nn.Module) -> None:
    """A model whose parameters are on the ``meta`` device has no values to explain."""
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        raise InputError(
            "the model's parameters are on the 'meta' device (shapes without values, e.g. built under "
            "torch.device('meta') or with init_empty_weights); load real weights first: "
            "model.to_empty(device='cpu') then model.load_state_dict(state), or "
            "model.load_state_dict(state, assign=True)"
        )


def target_ranks(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` 1-based rank of each target class among all logits: 1 + the number of classes whose
    logit is strictly higher (tied classes share a rank)."""
    with torch.no_grad():
        lg = logits.detach()
        tl = lg.gather(1, classes.to(lg.device))
        return (1 + (lg[:, None, :] > tl[:, :, None]).sum(-1)).cpu()


def _split_options(infos: list[MethodInfo], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    per: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for info in infos:
        params = inspect.signature(info.fn).parameters
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        mine = {k: v for k, v in options.items() if k in params or accepts_any}
        used |= set(mine)
        per[info.name] = mine
    unknown = set(options) - used
    if unknown:
        valid = sorted({k for info in infos for k in info.options()})
        raise MethodError(
            f"unknown option(s) {', '.join(sorted(unknown))} for {', '.join(i.name for i in infos)}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    return per


def check_applicable(infos: Sequence[MethodInfo], traits: ModelTraits) -> None:
    """Refuse, before any work, a method that cannot run on a model with ``traits`` (an attention
    method on a CNN, D-RISE without a detection target), naming the methods that can."""
    for info in infos:
        if not info.applies(traits):
            fix = info.applies_to.hint_for(traits)
            hint = f"; {fix}" if fix else ""
            raise NotApplicableError(
                f"{info.name} does not apply to {traits.describe()}: it is for {info.applies_to.text}{hint}. "
                f"Methods for this model: {', '.join(applicable(traits))}."
            )


def check_volumes(infos: Sequence[MethodInfo], x: Any) -> None:
    """Refuse, before the forward pass, a method that only explains images when ``x`` is a batch of
    volumes or clips ``(N, C, D, H, W)``, naming the methods that do explain them."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return
    bad = [i.name for i in infos if not i.volumes]
    if bad:
        able = [n for n, i in all_methods().items() if i.volumes]
        raise NotApplicableError(
            f"{', '.join(bad)} explain(s) images (N, C, H, W) only, and the input is a batch of volumes or clips "
            f"of shape {tuple(x.shape)}. Methods for volumes and clips: {', '.join(able)}."
        )


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """``torch.isfinite(t).all()`` in chunks of ``chunk`` elements: the full-size temporaries
    (``abs``, two boolean masks) of a ``(16, 100, 224, 224)`` map batch would cost ~0.5 GB."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(c).all()) for c in flat.split(chunk))


@overload
def explain(
    model: nn.Module | str | Callable[[Any], Any],
    inputs: Any,
    method: str = "gradcam",
    targets: TargetSpec = None,
    layer: str | nn.Module | None = None,
    capture: str = "output",
    *,
    call: int = -1,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
    output: OutputSpec = None,
    reshape: ReshapeSpec = None,
    **options: Any,
) -> Explanation: ...


@overload
def explain(
    model: nn.Module | str | Callable[[Any], Any],
    inputs: Any,
    method: Sequence[str],
    targets: TargetSpec = None,
    layer: str | nn.Module | None = None,
    capture: str = "output",
    *,
    call: int = -1,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
    output: OutputSpec = None,
    reshape: ReshapeSpec = None,
    **options: Any,
) -> dict[str, Explanation]: ...


def explain(
    model: nn.Module | str | Callable[[Any], Any],
    inputs: Any,
    method: str | Sequence[str] = "gradcam",
    targets: TargetSpec = None,
    layer: str | nn.Module | None = None,
    capture: str = "output",
    *,
    call: int = -1,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
    output: OutputSpec = None,
    reshape: ReshapeSpec = None,
    **options: Any,
) -> Explanation | dict[str, Explanation]:
    """Explain a classifier's decision for a batch of images.

    Args:
        model: an ``nn.Module`` classifier returning ``(N, num_classes)`` logits, a zoo name
            (``"efficientnet_lite0"``), or a model from :func:`camlens.load_model`; a TorchScript
            module (black-box and input-gradient methods); or any scoring function
            ``fn(batch) -> (N, K)`` taking a float32 NumPy ``(N, C, H, W)`` array (black-box
            methods only: ``rise``, ``occlusion``, ``lime``, ``kernelshap``; option
            ``max_batch=`` caps the images per call). See :mod:`camlens.models.blackbox`. An ONNX
            file (its path, or ``load_model("model.onnx")``): black-box methods on ONNX Runtime, the
            others on its onnx2torch conversion with ``layer=`` an ONNX node name; see
            :mod:`camlens.models.onnxmodel`.
        inputs: a preprocessed ``(N, C, H, W)`` tensor (``(N, C, D, H, W)`` for volumes and clips:
            the methods registered with ``volumes=True`` give ``(N, K, D, H, W)`` maps), or an image
            path / PIL image / HxWx3 array / list of them (then the model's preprocessing is applied:
            resize without cropping).
            Detectors take RGB in ``[0, 1]`` at any size, also a list of ``(3, H, W)`` tensors or
            images of different sizes (one batched forward; layer methods only); their maps are in
            each image's original pixels, zero-padded to the largest (``extras["image_sizes"]``).
        method: a registered method name (see :func:`camlens.methods`) or a list of names, computed
            from one shared forward pass and returned as ``{name: Explanation}``.
        targets: ``None`` (top-1), an int, N ints, an ``(N, K)`` table, ``"topK"``, class names,
            or a callable ``logits -> (N,)`` scores; or a target object that scores the model's
            raw output: :class:`~camlens.targets.Detection`, :class:`~camlens.targets.Segmentation`,
            :class:`~camlens.targets.Similarity` or your own :class:`~camlens.targets.Target`.
            A zoo detector defaults to ``Detection()`` (its own detections), a zoo segmenter to
            ``Segmentation(None)`` (its largest predicted class). See :mod:`camlens.targets`.
        layer: dotted module name, module, or ``None``: the features entering the final global
            pooling (a module or a functional call); for a transformer without global pooling the
            norm before the last block's attention (the token features the class token reads);
            else the last spatial module output.
        capture: ``"output"`` or ``"input"`` of ``layer``.
        call: which call of a module that runs several times per forward (default: the last).
        preprocess: override the preprocessing applied to image inputs.
        class_names: class names for a plain ``nn.Module`` (zoo models carry theirs; Hugging Face
            models give their ``config.id2label``).
        output: which part of the model's output holds the class scores: ``None`` (a tensor,
            ``.logits``, a dict's ``"logits"``, a tuple's first ``(N, C)`` tensor), a key, an index
            or a callable; see :mod:`camlens.core.outputs`. The choice is stated in ``extras["output"]``.
        reshape: layout of token ``(N, T, D)`` or channels-last ``(N, h, w, D)`` features:
            ``None`` detects it (prefix tokens from the count, the grid from the input size and
            patch size), or ``"none"``, ``"nhwc"``, ``(h, w)``, ``(prefix, h, w)``; see
            :mod:`camlens.core.layout`. What was done is stated in ``extras["layout"]``.
        **options: method options, e.g. ``max_channels=``, ``batch_size=``, ``grad_norm="rms"``,
            ``steps=``, ``n_samples=``; two fields of the request (:data:`REQUEST_OPTIONS`):
            ``precision=`` ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the model's forward
            passes run under ``torch.autocast`` where the device supports it (CPU: ``bf16``), the
            maps' arithmetic stays in float32, ``extras["precision"]`` says so (see
            :mod:`camlens.core.precision` for the measured tolerance); ``exact_decode=True``:
            decode image files in full instead of at the smallest JPEG scale (or ``Image.reduce``
            factor) that still covers the model's input (see :mod:`camlens.base.io`; maps and
            boxes are in the photo's pixels either way, ``extras["image_sizes"]`` gives each
            photo's size when its image was decoded reduced).
            And, for a model with several inputs:
        forward_args, forward_kwargs: the model's other inputs, for a model ``model(image, *args,
            **kwargs)`` (image + metadata, two images…): tensors batched along dim 0 (one row per
            image; every forward a method runs gets the rows of the images it forwards: masked,
            noisy and path copies alike, never interpolated or noised) or constants
            (:class:`camlens.Constant`, non-tensors), passed unchanged. The maps are of the image.
            See :mod:`camlens.core.extra`.
        input_index, input_key: where the image goes among the model's arguments when it is not
            the first positional one (``model(meta, image)``: ``input_index=1``).

    Returns:
        An :class:`Explanation`, or a dict of them when ``method`` is a list.

    Example::

        >>> import camlens
        >>> model = camlens.load_model("efficientnet_lite0")      # bundled ImageNet weights, offline
        >>> exp = camlens.explain(model, "cat.jpg", "gradcam", targets="top2")
        >>> exp.labels()                                          # [['Egyptian cat', 'tiger cat']]
        >>> exp.maps.shape                                        # (1, 2, H, W): one map per class
        >>> exp.boxes()                                           # (1, 2, 4) boxes in the photo's pixels
        >>> exp.save("out/")                                      # overlays, .npy maps, JSON summary
        >>> both = camlens.explain(model, "cat.jpg", ["gradcam", "scorecam"], max_channels=64)
        >>> both["scorecam"].show()                               # {method: Explanation}
    """
    options = dict(options)
    fields = {k: options.pop(k) for k in REQUEST_OPTIONS if k in options}
    request = ExplainRequest(
        methods=tuple(method_names(method)),
        targets=targets,
        layer=layer,
        capture=capture,
        call=call,
        preprocess=preprocess,
        class_names=None if class_names is None else tuple(class_names),
        output=output,
        reshape=reshape,
        options=options,
        **fields,
    )
    results = run_request(model, inputs, request)
    named = {n: results[get_method(n).name] for n in request.methods}  # aliases as the caller spelled them
    return named[request.methods[0]] if isinstance(method, str) else named


#: explain()'s keywords that describe the model's inputs, not a method's options
INPUT_KEYWORDS = ("forward_args", "forward_kwargs", "input_index", "input_key")
#: keyword arguments of :func:`explain` that are fields of the :class:`ExplainRequest`, not method options
REQUEST_OPTIONS = ("precision", "exact_decode")


@dataclass(frozen=True)
class ExplainRequest:
    """What :func:`explain` was asked, whole: the unit of work that the CLI, the web app and the
    dataset pipeline hand on (see :func:`explain` for each field). ``options``: the methods'
    keyword options, split between the methods by their signatures."""

    methods: tuple[str, ...]
    targets: TargetSpec = None
    layer: str | nn.Module | None = None
    capture: str = "output"
    call: int = -1
    preprocess: Preprocess | None = None
    class_names: tuple[str, ...] | None = None
    output: OutputSpec = None
    reshape: ReshapeSpec = None
    forward_args: tuple[Any, ...] = ()
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    input_index: int = 0
    input_key: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    exact_decode: bool = False

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not isinstance(self.exact_decode, bool):
            raise InputError(f"exact_decode must be True or False, not {self.exact_decode!r}")

    def with_inputs(self, options: dict[str, Any]) -> ExplainRequest:
        """This request with the model-input keywords (``forward_args``, ``forward_kwargs``,
        ``input_index``, ``input_key``) and the request fields (``precision``, ``exact_decode``)
        taken out of ``options`` (the rest are method options): the CLI and the dataset pipeline
        hand them on among the options."""
        rest = dict(options)
        given = {k: rest.pop(k) for k in (*INPUT_KEYWORDS, *REQUEST_OPTIONS) if k in rest}
        if "forward_args" in given:
            args = given["forward_args"]
            given["forward_args"] = tuple(args) if isinstance(args, (list, tuple)) else args
        if given.get("forward_kwargs") is None:
            given.pop("forward_kwargs", None)
        return replace(self, options=rest, **given)

    def extra_inputs(self, x: Any, model: nn.Module) -> ExtraInputs:
        """The model's other inputs checked against the batch ``x`` (see :mod:`camlens.core.extra`)."""
        if (self.forward_args or self.forward_kwargs) and not isinstance(x, torch.Tensor):
            raise InputError(
                "forward_args/forward_kwargs need one batch tensor of images; these images differ in size: "
                "resize them or explain them one at a time"
            )
        if isinstance(model, ScoringFunction) and (self.forward_args or self.forward_kwargs):
            raise InputError(
                "forward_args/forward_kwargs need an nn.Module; a scoring function takes one batch: close over "
                "the other inputs in it"
            )
        n = len(x) if isinstance(x, list) else int(x.shape[0])
        return ExtraInputs(
            self.forward_args,
            self.forward_kwargs,
            n=n,
            input_index=self.input_index,
            input_key=self.input_key,
            device=model_device(model),
        )


@dataclass
class _Plan:
    """The request checked against the model: registry entries, each method's options, what the
    shared pass must prepare, the model's card, class names and the targets (task defaults)."""

    infos: list[MethodInfo]
    options: dict[str, dict[str, Any]]
    needs: frozenset[str]
    card: Any
    classes: list[str] | None
    targets: TargetSpec


def run_request(model: Any, inputs: Any, request: ExplainRequest) -> dict[str, Explanation]:
    """Run one :class:`ExplainRequest`: ``{registered method name: Explanation}`` in the request's
    order, from one shared forward pass. Steps: the model (:func:`as_model`), the plan (every check
    before any work), the batch, the layer, one forward, then each method. An ONNX model runs
    each method the way it can (:func:`run_onnx`)."""
    request = request.with_inputs(request.options)  # forward_args=… given among the options
    if is_onnx_path(model):
        model = load_model(model)
    if isinstance(model, OnnxModel):
        return run_onnx(model, inputs, request)
    return _run_request(model, inputs, request)


def _run_request(model: Any, inputs: Any, request: ExplainRequest) -> dict[str, Explanation]:
    """:func:`run_request` on one model (an ONNX model through ONNX Runtime: black-box methods only)."""
    options = dict(request.options)
    model = as_model(model, options.pop("max_batch", None))
    if isinstance(model, ImageText) and not isinstance(model, ZeroShotClassifier) and request.class_names:
        model = zero_shot(model, request.class_names)  # class names typed by the user: a zero-shot classifier
    plan = _plan(model, request, options)
    x, images, sources, sizes = _batch(inputs, model, request, plan)
    check_volumes(plan.infos, x)
    spec = _layer_spec(model, request, plan)
    # one method asks for at most one layer, one input and one attention gradient: the last backward
    # may free the graph
    needs = plan.needs
    n_grads = wants_layer_grads(needs) + ("input_grads" in needs) + ("attention_grads" in needs)
    backwards = n_grads if len(plan.infos) == 1 else None
    request_pass = PassRequest(
        targets=plan.targets,
        class_names=plan.classes,
        needs=needs,
        backwards=backwards,
        output=request.output,
        reshape=request.reshape,
        reductions=reductions_for(needs),
    )

    def forward_pass(spec: CaptureSpec | None) -> ForwardPass:
        return ForwardPass.run(model, x, spec, request_pass)

    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
    results: dict[str, Explanation] = {}
    # works under the caller's inference_mode too; a transformer at another size: see fit_input
    extra = request.extra_inputs(x, model)
    with (
        torch.inference_mode(False),
        eval_mode(model),
        extra.attached(model),
        fit_input(model, shape) as fitted,
        autocast_forwards(model, request.precision, model_device(model)) as low,
    ):
        resolved = run_resolved(model, x, spec, forward_pass)
        ctx = resolved.ctx
        ctx.autocast = low
        shared = _Shared.of(ctx, model, request, plan, x, images, sources, resolved.layer_name, fitted)
        shared.sizes, shared.precision = sizes, request.precision
        timing: dict[str, float] = {}  # one timed forward for the estimates of all methods
        for info in plan.infos:
            with reported(info, ctx, plan.options[info.name], timing):  # estimate and progress, when asked
                out = info.fn(ctx, **plan.options[info.name])
            results[info.name] = _explanation(info, out, ctx, shared, x)
        del ctx, resolved  # free the graph before returning
    return results


#: methods whose result depends on the module structure, not only on the function computed (refused on ONNX)
STRUCTURE_RULES = frozenset({"lrp", "lrp_layer", "attnlrp"})


def run_onnx(model: OnnxModel, inputs: Any, request: ExplainRequest) -> dict[str, Explanation]:
    """The black-box methods through ONNX Runtime (the model itself), the others through the
    onnx2torch conversion with ``layer=`` as an ONNX node name; ``extras["onnx"]`` says which ran.
    Without a conversion every method goes to ONNX Runtime, which refuses the gradient methods
    naming the operator that could not be converted."""
    infos = [get_method(m) for m in request.methods]
    structural = [i.name for i in infos if i.name in STRUCTURE_RULES]
    if structural:
        raise MethodError(
            f"{', '.join(structural)} assign(s) rules by the network's own modules (composites, canonizers); an ONNX "
            "graph rebuilt by onnx2torch has other modules, so the relevance would not be the original network's: "
            "explain the original nn.Module, or use a gradient or black-box method on the .onnx file"
        )
    per = _split_options(infos, {k: v for k, v in request.options.items() if k != "max_batch"})
    groups = [[i for i in infos if i.blackbox], [i for i in infos if not i.blackbox]]
    if model.converted is None:
        groups = [infos]
    results: dict[str, Explanation] = {}
    for group in (g for g in groups if g):
        path = "onnx2torch" if model.converted is not None and not group[0].blackbox else "onnxruntime"
        options = {k: v for i in group for k, v in per[i.name].items()}
        layer = request.layer
        if path == "onnx2torch":
            net: Any = model.converted
            layer = model.module_name(layer) if isinstance(layer, str) else layer
        else:
            net = model
            options["max_batch"] = 1 if model.graph_input.batch == 1 else request.options.get("max_batch")
        sub = replace(request, methods=tuple(i.name for i in group), options=options, layer=layer)
        for name, exp in _run_request(net, inputs, sub).items():
            exp.extras["onnx"] = model.describe(path, options.get("max_batch"))
            if exp.layer is not None and path == "onnx2torch":  # "output of NODE": the node as the graph names it
                exp.layer = model.onnx_label(exp.layer)
            results[name] = exp
    return {i.name: results[i.name] for i in infos}


def as_model(model: Any, max_batch: int | None = None) -> nn.Module:
    """A zoo name loaded, a scoring function wrapped (black-box methods only), anything else refused."""
    if isinstance(model, str):
        model = load_model(model)
    if is_detector(model):  # a DETR-family or Ultralytics YOLO object: its adapter (camlens.models.detectors)
        model = as_detector(model)
    if callable(model) and not isinstance(model, nn.Module):  # a scoring function: black-box methods only
        model = ScoringFunction(model, max_batch=max_batch)
    elif isinstance(model, ScoringFunction) and max_batch not in (None, model.max_batch):
        card = card_of(model)  # a copy with the call's max_batch: the caller's model is left as it is
        model = ScoringFunction(model.fn, max_batch=max_batch)
        if card is not None:
            attach_card(model, card)
    if isinstance(model, nn.Module) and not isinstance(model, ImageText) and family_of(model) is not None:
        model = image_text(model)  # CLIP, SigLIP, OpenCLIP: the image tower's embeddings (camlens.models.imagetext)
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be an nn.Module, a zoo name or a scoring function (N, C, H, W) -> (N, K), "
            f"not {type(model).__name__}"
        )
    check_materialized(model)
    return model


def _plan(model: nn.Module, request: ExplainRequest, options: dict[str, Any]) -> _Plan:
    """Every check that needs no image: methods, options, model kind, targets' task defaults."""
    check_capture(request.capture)
    infos = [get_method(m) for m in request.methods]
    per_options = _split_options(infos, options)
    refused = unsupported(model, infos, per_options, all_methods().values(), lambda n: get_method(n).name)
    if refused is not None:
        raise refused
    if request.precision != "fp32" and isinstance(model, ScoringFunction):
        raise InputError(
            f"precision={request.precision!r} runs a torch model's forward under autocast; a scoring function "
            "decides its own precision: leave precision='fp32'"
        )
    autocast_dtype(request.precision, model_device(model))  # a precision the device cannot run: before any work
    pixel = [i.name for i in infos if "input_grads" in i.needs]
    if request.precision != "fp32" and pixel:
        warnings.warn(
            f"{', '.join(pixel)} at precision={request.precision!r}: input gradients back-propagated through a "
            f"{request.precision} network are far from fp32's (Pearson ~0.6 for saliency on EfficientNet-Lite0, "
            "benchmarks/precision.py); use precision='fp32' for pixel methods",
            UserWarning,
            stacklevel=3,
        )
    card = card_of(model)
    classes = list(request.class_names) if request.class_names is not None else class_names_of(model)
    task = card.extra.get("task") if card else None
    targets = request.targets
    if targets is None and task == "detection":
        targets = Detection()  # the model's own detections (score >= 0.5, at most 5 per image)
    elif targets is None and task == "segmentation":
        targets = Segmentation(None)  # each image's largest predicted non-background class
    if isinstance(model, ImageText) and not isinstance(model, ZeroShotClassifier) and not is_target_object(targets):
        raise TargetError(
            "an image–text model has no classes of its own: pass targets=camlens.targets.Text(['a red bicycle', ...]) "
            "to explain prompts, or class_names=[...] (zero-shot classification)"
        )
    check_applicable(infos, model_traits(model, targets))
    needs = frozenset().union(*(i.needs for i in infos))
    return _Plan(infos, per_options, needs, card, classes, targets)


def _batch(
    inputs: Any, model: nn.Module, request: ExplainRequest, plan: _Plan
) -> tuple[Any, Any, list[str], list[tuple[int, int]] | None]:
    """The model's input (a batch tensor, or a detector's list of ``(C, H, W)`` images of different
    sizes, which only layer methods take), the images, their names, and the photos' own sizes
    when an image was decoded reduced (else ``None``)."""
    with torch.inference_mode(False):
        x, images, sources, sizes = prepare_batch(inputs, model, request.preprocess, exact=request.exact_decode)
    if images is None or sizes is None or all(tuple(im.shape[:2]) == s for im, s in zip(images, sizes, strict=True)):
        sizes = None
    if isinstance(x, list):
        bad = [i.name for i in plan.infos if i.kind != "layer"]
        if bad:
            raise InputError(
                f"{', '.join(bad)} need(s) images of one size; these differ in size "
                f"({sorted({tuple(t.shape[-2:]) for t in x})}): explain them one at a time or resize them"
            )
    return x, images, sources, sizes


def _layer_spec(model: nn.Module, request: ExplainRequest, plan: _Plan) -> CaptureSpec | None:
    """The layer to capture (the card's for a zoo model when none is asked), if a method needs one."""
    if not ("features" in plan.needs or wants_layer_grads(plan.needs)):
        return None
    card = plan.card
    if request.layer is None and card is not None and card.layer is not None:
        return resolve_layer(model, card.layer, card.capture, request.call)
    return resolve_layer(model, request.layer, request.capture, request.call)


@dataclass
class _Shared:
    """What every method's :class:`Explanation` of one call shares."""

    model_name: str
    card: Any
    classes: list[str] | None
    probs: torch.Tensor
    logits: torch.Tensor | None
    ranks: torch.Tensor | None
    images: Any
    sources: list[str]
    preprocess: Preprocess | None
    shown: torch.Tensor | None
    layer_name: str | None
    fitted: Any
    sizes: list[tuple[int, int]] | None = None  # the photos' own sizes, when decoded reduced
    precision: str = "fp32"

    @classmethod
    def of(cls, ctx, model, request, plan, x, images, sources, layer_name, fitted) -> _Shared:
        """From the forward pass: class probabilities, the logits kept whole (``Explanation.top(k)``
        needs no second forward; None for a target object's raw output), true ranks."""
        with torch.no_grad():
            # no class probability: a target object's or callable's scores, or one output (a regression)
            if (
                ctx.logits is None
                or ctx.targets.obj is not None
                or ctx.targets.fn is not None
                or ctx.logits.shape[1] < 2
            ):
                probs = torch.full(ctx.scores.shape, float("nan"), device=ctx.scores.device)
            else:
                probs = ctx.logits.detach().float().softmax(dim=1).gather(1, ctx.targets.classes.to(ctx.logits.device))
        plain = ctx.logits is not None and ctx.targets.fn is None and ctx.targets.obj is None
        card = plan.card
        pp = request.preprocess or (card.preprocess if card else (IMAGENET if images is not None else None))
        return cls(
            model_name=card.name if card else type(model).__name__,
            card=card,
            classes=plan.classes,
            probs=probs,
            logits=ctx.logits.detach() if ctx.logits is not None else None,
            ranks=target_ranks(ctx.logits, ctx.targets.classes) if plain else None,
            images=images,
            sources=sources,
            preprocess=pp,
            shown=x.detach() if images is None and isinstance(x, torch.Tensor) else None,  # for figures
            layer_name=layer_name,
            fitted=fitted,
        )


def _explanation(info: MethodInfo, out: Any, ctx: ForwardPass, shared: _Shared, x: Any) -> Explanation:
    """One method's output as an :class:`Explanation`: skipped images zeroed, detector maps mapped
    to the original pixels, the finite check, lazy upsampling, and the extras said."""
    raw = out.raw.detach()
    maps = out.maps
    skipped = ctx.targets.skipped
    if skipped:  # nothing to explain there: zeros, whatever the method made of a 0 score
        raw, maps = _zero_rows(raw, skipped), None if maps is None else _zero_rows(maps, skipped)
    # finite input and logits, yet a NaN map: say so. Maps resized from ``raw`` (convex
    # combinations of its values) are finite when ``raw`` is, so the small tensor is checked.
    checked = raw if maps is None else maps
    if maps is None and ctx.frames is not None:  # detector: the padded, resized frame -> original pixels
        maps = frame_maps(raw, ctx.frames, [tuple(t.shape[-2:]) for t in x])
    if not _all_finite(checked):
        raise NonFiniteError(
            f"{info.name} produced NaN/Inf in its maps (the features or gradients overflow in "
            f"{checked.dtype}); run the model in float32 or choose another layer"
        )
    lazy: torch.Tensor | Upsampled
    if maps is None:  # bilinear (trilinear for volumes) as F.interpolate, computed when the maps are first used
        lazy = Upsampled(raw, tuple(int(s) for s in x.shape[-(raw.dim() - 2) :]))
    else:
        lazy = maps.detach().float()
    return Explanation(
        maps=cast(torch.Tensor, lazy),  # an Upsampled is computed on first access
        raw=raw,
        classes=ctx.targets.classes.clone(),
        scores=ctx.scores.detach().clone(),
        probs=shared.probs,
        method=info.name,
        layer=shared.layer_name if "features" in info.needs else None,
        class_names=shared.classes,
        images=shared.images,
        sources=shared.sources,
        model_name=shared.model_name,
        extras=_common_extras(ctx, info) | _extras(out, ctx, shared, x),
        ranks=shared.ranks,
        inputs=shared.shown,
        preprocess=shared.preprocess,
        logits=shared.logits,
    )


def _extras(out: Any, ctx: ForwardPass, shared: _Shared, x: Any) -> dict[str, Any]:
    """A method's extras with what the call adds: the target object's, random weights, skipped
    images, a detector's image sizes, a transformer's fitted input size."""
    extras = dict(getattr(ctx.targets.obj, "extras", None) or {}) if ctx.targets.obj is not None else {}
    if shared.card is not None and shared.card.extra.get("weights") == "random":
        extras["weights"] = "random"  # Explanation.random_weights: titles and summaries say so
    card = shared.card
    default = card is not None and card.layer and shared.layer_name == f"{card.capture} of {card.layer}"
    if default and "layer_choice" in card.extra:  # a detector adapter's default layer, and why
        extras["layer_choice"] = card.extra["layer_choice"]
    extras.update(out.extras)
    if ctx.targets.skipped:  # images whose target selects nothing: said, not explained
        extras["skipped"] = sorted(ctx.targets.skipped)
        extras["skipped_reasons"] = dict(sorted(ctx.targets.skipped.items()))
    if isinstance(x, list):
        extras["image_sizes"] = [tuple(t.shape[-2:]) for t in x]
    elif shared.sizes is not None:  # a scaled decode: the photos' own frame for boxes and summaries
        extras["image_sizes"] = list(shared.sizes)
    if shared.precision != "fp32":
        extras["precision"] = shared.precision  # forward under autocast; maps computed in float32
    if shared.fitted:
        extras["input_size"] = shared.fitted
    return extras


def _zero_rows(t: torch.Tensor, rows: dict[int, str]) -> torch.Tensor:
    """A copy of ``t`` with the images ``rows`` set to zero."""
    t = t.detach().clone()
    t[sorted(rows)] = 0
    return t


def _common_extras(ctx: ForwardPass, info: MethodInfo) -> dict[str, Any]:
    """What explain() chose for every method: the output part taken as logits, the layout adapter."""
    extras: dict[str, Any] = {"output": ctx.output_choice}
    if ctx.layout is not None and ctx.layout.adapted and "features" in info.needs:
        extras["layout"] = ctx.layout.describe()
    return extras


def predict(
    model: nn.Module | str,
    inputs: Any,
    topk: int = 5,
    *,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
    output: OutputSpec = None,
) -> list[list[tuple[int, str, float]]]:
    """Top-k classes per image as ``[(class_id, name, probability), …]`` (one inference forward)."""
    if isinstance(model, str):
        model = load_model(model)
    model = as_model(model)
    if isinstance(model, ImageText) and not isinstance(model, ZeroShotClassifier):
        if not class_names:
            raise TargetError(
                "an image–text model has no classes of its own: pass class_names=[...] (zero-shot classification)"
            )
        model, class_names = zero_shot(model, class_names), None
    x, _, _ = prepare_inputs(inputs, model, preprocess)
    names = list(class_names) if class_names is not None else class_names_of(model)
    with eval_mode(model), torch.inference_mode(), fit_input(model, tuple(x.shape)):
        p = select_output(forward(model, x), output, n=x.shape[0])[0].float().softmax(dim=1)
    v, i = p.topk(min(topk, p.shape[1]), dim=1)
    return [
        [(int(c), names[c] if names else str(int(c)), float(q)) for q, c in zip(vr, ir)]
        for vr, ir in zip(v.tolist(), i.tolist())
    ]


__all__ = ["explain", "predict"]
