"""ONNX files as models: ``camlens.load_model("model.onnx")`` (``pip install 'camlens[onnx]'``).

An :class:`OnnxModel` is one file seen two ways, and :func:`camlens.explain` picks the way per method:

* **ONNX Runtime** (``model(x)``; the black-box methods ``rise``, ``occlusion``, ``lime``,
  ``kernelshap``): the masked copies go to an ``onnxruntime.InferenceSession`` in batches (one image
  at a time when the graph's batch dimension is fixed to 1), on the session's own execution
  providers. No gradient flows: it is a :class:`~camlens.models.blackbox.ScoringFunction`.
* **onnx2torch** (``model.converted``; gradient and layer methods): the graph rebuilt as a
  ``torch.fx.GraphModule`` with one module per ONNX node, so that autograd, hooks and the ReLU
  rules work. ``layer=`` is the ONNX node's name (``"/layer4/layer4.1/relu_1/Relu"``, as Netron
  shows it) or the name of one of its output tensors. When the graph holds an operator onnx2torch
  cannot convert, the model still loads: the black-box methods run, the others are refused with an
  error naming the operator.

Which way ran is said in ``Explanation.extras["onnx"]``. Preprocessing, class names, a default
layer and a name come from a sidecar card ``model.onnx.json`` next to the file, or from arguments::

    {"name": "my-resnet", "preprocess": "imagenet" | {"size": [224, 224], "mean": [...], ...},
     "class_names": ["cat", "dog"], "layer": "/layer4/layer4.1/relu_1/Relu", "capture": "output"}

Without them: ImageNet normalization at the graph's input size (224 x 224 when not fixed).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from camlens.base.errors import CamlensError, InputError, LayerNotFoundError
from camlens.models.blackbox import ScoringFunction
from camlens.models.card import ModelCard, attach_card
from camlens.models.preprocess import IMAGENET, PRESETS, Preprocess

EXTRA = "pip install 'camlens[onnx]'"
CARD_KEYS = ("name", "preprocess", "class_names", "layer", "capture")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxModelError(CamlensError, ValueError):
    """An ONNX file camlens cannot explain as it is (several inputs, a non-float input, a bad card)."""


def is_onnx_path(name: Any) -> bool:
    """Whether ``name`` names an ONNX file (by its ``.onnx`` suffix)."""
    return isinstance(name, (str, os.PathLike)) and str(name).lower().endswith(".onnx")


def _import(module: str) -> Any:
    """An optional dependency of ``camlens[onnx]``, imported when an ONNX file is loaded."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CamlensError(f"ONNX models need {module}: {EXTRA}") from exc


@dataclass(frozen=True)
class GraphInput:
    """The graph's single image input: its name, NumPy dtype, fixed batch size and ``(H, W)`` if fixed."""

    name: str
    dtype: Any
    batch: int | None
    size: tuple[int, int] | None

    @classmethod
    def of(cls, session: Any, path: Path) -> GraphInput:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise OnnxModelError(
                f"{path}: the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); camlens explains "
                "graphs with one image input (N, C, H, W): export the model with the others as constants"
            )
        inp = inputs[0]
        if inp.type not in _DTYPES or len(inp.shape) != 4:
            raise OnnxModelError(
                f"{path}: the input {inp.name!r} is {inp.type} of shape {inp.shape}; camlens needs a float "
                "(N, C, H, W) image batch"
            )
        dims = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        size = (dims[2], dims[3]) if dims[2] is not None and dims[3] is not None else None
        return cls(inp.name, _DTYPES[inp.type], dims[0], size)


class _Session:
    """``(B, C, H, W)`` float array -> the graph's first output, run by ONNX Runtime."""

    def __init__(self, session: Any, graph_input: GraphInput) -> None:
        self.session = session
        self.input = graph_input
        self.output = session.get_outputs()[0].name

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {self.input.name: a.astype(self.input.dtype, copy=False)})[0]


@dataclass
class Conversion:
    """The onnx2torch conversion: the module, ONNX node / output tensor name -> module name, or the
    reason it failed."""

    module: nn.Module | None
    names: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)  # module name -> the ONNX node's name
    error: str | None = None


def fold_identities(graph: Any) -> Any:
    """A copy of ``graph`` (a ``ModelProto``) where each ``Identity`` node reading an initializer is
    replaced by a copy of that initializer under the node's output name. PyTorch's exporter writes
    such nodes for weights it deduplicates (e.g. the equal zero biases of folded batch norms), and
    onnx2torch expects weights as initializers."""
    graph = copy.deepcopy(graph)
    inits = {t.name: t for t in graph.graph.initializer}
    keep = []
    for node in graph.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in inits:
            t = copy.deepcopy(inits[node.input[0]])
            t.name = node.output[0]
            graph.graph.initializer.append(t)
        else:
            keep.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(keep)
    return graph


def unsupported_operators(graph: Any) -> list[str]:
    """``"OpType (opset V; N nodes: 'first', …)"`` for each operator onnx2torch has no converter for
    at the graph's opset, in graph order."""
    registry = _import("onnx2torch.node_converters.registry")
    opsets = {o.domain: o.version for o in graph.opset_import}
    bad: dict[tuple[str, str], list[str]] = {}
    for node in graph.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        version = opsets.get(domain, opsets.get("ai.onnx" if domain == "" else domain, 1))
        try:
            registry.get_converter(domain=domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            bad.setdefault((f"{domain}.{node.op_type}" if domain else node.op_type, str(version)), []).append(node.name)
    return [
        f"{op} (opset {v}; {len(nodes)} node{'s' * (len(nodes) > 1)}: {', '.join(map(repr, nodes[:2]))}"
        f"{', …' if len(nodes) > 2 else ''})"
        for (op, v), nodes in bad.items()
    ]


def convert(graph: Any) -> Conversion:
    """``graph`` rebuilt by onnx2torch, with the name map; the failure said, never raised."""
    graph = fold_identities(graph)
    bad = unsupported_operators(graph)
    if bad:
        return Conversion(None, error=f"onnx2torch cannot convert operator {', '.join(bad)}")
    onnx2torch = _import("onnx2torch")
    graph_names = _import("onnx2torch.onnx_graph")
    try:
        module = onnx2torch.convert(graph)
    except Exception as exc:  # a converter's own refusal (an attribute it lacks, a dynamic weight)
        return Conversion(None, error=f"onnx2torch could not convert the graph: {type(exc).__name__}: {exc}")
    names: dict[str, str] = {}
    nodes: dict[str, str] = {}
    # onnx2torch names its modules after the nodes, in graph order, made unique: the same walk here
    unique = graph_names.OnnxGraph(graph.graph).nodes.keys()
    modules = dict(module.named_modules())
    for node, name in zip(graph.graph.node, unique):
        if name not in modules:
            continue
        nodes[name] = node.name or name
        names.setdefault(name, name)
        for out in node.output:
            names.setdefault(out, name)
        names[nodes[name]] = name
    return Conversion(module, names, nodes)


class OnnxModel(ScoringFunction):
    """An ONNX file as a model (see the module's docstring). ``forward`` runs ONNX Runtime;
    ``converted`` is the onnx2torch module (``None`` when the conversion failed: ``conversion_error``)."""

    def __init__(self, path: Path, session: Any, conversion: Conversion, *, max_batch: int | None = None) -> None:
        graph_input = GraphInput.of(session, path)
        if graph_input.batch is not None:  # a graph exported for a fixed batch size takes exactly that many
            max_batch = graph_input.batch if graph_input.batch == 1 else max_batch
        super().__init__(_Session(session, graph_input), max_batch=max_batch)
        self.path = path
        self.graph_input = graph_input
        self.providers = tuple(session.get_providers())
        self.conversion_error = conversion.error
        self.node_names = dict(conversion.names)
        self.onnx_names = dict(conversion.nodes)
        self.converted = conversion.module  # a registered child: .to(device) and .eval() reach it

    @property
    def gradients_missing(self) -> str:
        """Why the gradient and layer methods cannot run, in the words of a refusal."""
        if self.conversion_error:
            return f"the ONNX model {self.path.name} cannot give ({self.conversion_error})"
        return f"ONNX Runtime does not give (explain {self.path.name} through model.converted)"

    def module_name(self, name: str) -> str:
        """The converted module of an ONNX node (or output tensor) name; a name that is neither
        raises an error listing the closest node names."""
        if name in self.node_names:
            return self.node_names[name]
        nodes = list(self.onnx_names.values())
        close = difflib.get_close_matches(name, nodes, n=6, cutoff=0.4)
        hint = f"closest: {', '.join(close)}" if close else f"the last ones: {', '.join(nodes[-6:])}"
        raise LayerNotFoundError(
            f"the ONNX graph {self.path.name} has no node or tensor named {name!r} ({len(nodes)} nodes; {hint}). "
            "Give the node's name as Netron or onnx.load(path).graph.node[i].name shows it, or leave the layer out"
        )

    def onnx_label(self, text: str) -> str:
        """``text`` (``"output of layer4/Relu, call 2"``) with each converted module's name replaced
        by its ONNX node's name."""
        return re.sub(r"[^\s(),]+", lambda m: self.onnx_names.get(m.group(), m.group()), text)

    def describe(self, path: str, max_batch: int | None = None) -> dict[str, Any]:
        """What ``Explanation.extras["onnx"]`` says for the way that ran (``"onnxruntime"`` / ``"onnx2torch"``;
        ``max_batch``: the call's, when it set one)."""
        out: dict[str, Any] = {"file": str(self.path), "path": path}
        if path == "onnxruntime":
            out |= {"providers": list(self.providers), "max_batch": max_batch or self.max_batch}
        return out

    def extra_repr(self) -> str:
        conv = "converted" if self.converted is not None else f"not converted ({self.conversion_error})"
        return f"path={str(self.path)!r}, providers={list(self.providers)}, torch={conv}"


# ---------------------------------------------------------------------------------------------- the card
def read_card(path: Path, card: str | os.PathLike | dict | None) -> dict[str, Any]:
    """The sidecar card (``card=`` a dict or a JSON file; by default ``PATH.json`` if it exists),
    checked: only :data:`CARD_KEYS`, each of the right type."""
    where = "card="
    if card is None:
        side = path.with_name(path.name + ".json")
        if not side.is_file():
            return {}
        card = side
    if not isinstance(card, dict):
        where = str(card)
        try:
            card = json.loads(Path(card).read_text())
        except (OSError, ValueError) as exc:
            raise OnnxModelError(f"{where}: cannot read the model card ({exc}); fix or remove it") from None
    if not isinstance(card, dict):
        raise OnnxModelError(f"{where}: a model card is a JSON object with keys {', '.join(CARD_KEYS)}")
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise OnnxModelError(f"{where}: unknown key(s) {', '.join(unknown)}; a card may hold {', '.join(CARD_KEYS)}")
    names = card.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise OnnxModelError(f"{where}: class_names must be a list of strings")
    if card.get("capture", "output") not in ("output", "input"):
        raise OnnxModelError(f"{where}: capture must be 'output' or 'input', not {card['capture']!r}")
    return dict(card) | {"_where": where}


def _preprocess(value: Any, where: str, fixed: tuple[int, int] | None) -> Preprocess | None:
    """A :class:`Preprocess`, its fields as a dict, or a preset name (a normalization: its size
    becomes the graph's input size when that is fixed)."""
    if value is None or isinstance(value, Preprocess):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise OnnxModelError(f"{where}: unknown preprocessing preset {value!r}; presets: {', '.join(PRESETS)}")
        return replace(PRESETS[value], size=fixed) if fixed else PRESETS[value]
    try:
        return Preprocess.from_dict(value)
    except (TypeError, ValueError) as exc:
        fields = ", ".join(Preprocess.__dataclass_fields__)
        raise OnnxModelError(f"{where}: bad preprocess ({exc}); fields: {fields}") from None


@dataclass(frozen=True)
class OnnxOptions:
    """What :func:`load_onnx` takes besides the path (arguments win over the card)."""

    preprocess: Preprocess | str | dict | None = None
    class_names: list[str] | None = None
    card: str | os.PathLike | dict | None = None
    providers: tuple[Any, ...] | None = None
    max_batch: int | None = None


def model_card(model: OnnxModel, card: dict[str, Any], opts: OnnxOptions) -> ModelCard:
    """The :class:`ModelCard` from the sidecar card and the arguments, its preprocessing at the graph's
    input size (a conflicting size is an error), the default layer as the converted module's name."""
    where = card.get("_where", "card")
    fixed = model.graph_input.size
    pp = _preprocess(opts.preprocess, "preprocess=", fixed) or _preprocess(card.get("preprocess"), where, fixed)
    if pp is None:
        pp = replace(IMAGENET, size=fixed or IMAGENET.size)
    elif fixed is not None and tuple(pp.size) != fixed and pp.resize != "none":
        raise OnnxModelError(
            f"{model.path.name} takes {fixed[0]}x{fixed[1]} images but the preprocessing resizes to "
            f"{pp.size[0]}x{pp.size[1]}; set its size to {list(fixed)}"
        )
    names = list(opts.class_names) if opts.class_names is not None else card.get("class_names")
    layer = card.get("layer")
    if layer is not None and model.converted is not None:
        layer = model.module_name(str(layer))
    extra = {"onnx": str(model.path), "providers": list(model.providers)}
    if model.conversion_error:
        extra["conversion_error"] = model.conversion_error
    return ModelCard(
        name=str(card.get("name") or model.path.stem),
        preprocess=pp,
        class_names=names,
        layer=layer,
        capture=card.get("capture", "output"),
        extra=extra,
    )


def default_providers(device: Any = None) -> list[str]:
    """ONNX Runtime's CUDA provider (then the CPU) for a CUDA ``device``, else the CPU provider."""
    ort = _import("onnxruntime")
    if device is not None and str(device).startswith("cuda"):
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ["CPUExecutionProvider"]


def load_onnx(path: str | os.PathLike, opts: OnnxOptions | None = None, device: Any = None) -> OnnxModel:
    """An ONNX file as an :class:`OnnxModel` (eval mode) carrying its :class:`ModelCard`.

    Args:
        path: the ``.onnx`` file.
        opts: preprocessing (a :class:`Preprocess`, a preset name or its fields as a dict), class
            names, a card (dict or JSON file; default ``PATH.json`` when it exists), ONNX Runtime
            providers (default: CPU, or CUDA then CPU for a CUDA ``device``), ``max_batch``.
        device: where the converted module lives.
    """
    opts = opts or OnnxOptions()
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{file}: no such ONNX file; give the path of a .onnx model")
    onnx = _import("onnx")
    ort = _import("onnxruntime")
    card = read_card(file, opts.card)
    try:
        graph = onnx.load(str(file))
        session = ort.InferenceSession(str(file), providers=list(opts.providers or default_providers(device)))
    except Exception as exc:  # onnx / onnxruntime raise their own types for a damaged or foreign file
        raise OnnxModelError(f"{file}: not an ONNX model ONNX Runtime can run ({type(exc).__name__}: {exc})") from None
    model = OnnxModel(file, session, convert(graph), max_batch=opts.max_batch)
    mc = model_card(model, card, opts)
    attach_card(model, mc)
    if model.converted is not None:
        attach_card(model.converted, mc)
    model.eval()
    if device is not None:
        model.to(device)
    return model


__all__ = ["OnnxModel", "OnnxModelError", "OnnxOptions", "is_onnx_path", "load_onnx"]
