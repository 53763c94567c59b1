"""Select the class scores from whatever a model returns.

A classifier may return one ``(N, C)`` tensor, a tuple or list (``(logits, aux)``, Inception's
auxiliary logits, a distillation head…), a dict, a Hugging Face ``ModelOutput`` (``.logits``), or
something only its author understands. :func:`select_output` turns the raw output into the
``(N, C)`` logits the targets are computed from, and says in words what it chose, so that the
choice can be stated in :attr:`camlens.Explanation.extras` (key ``"output"``).

``output=`` (the argument of :func:`camlens.explain`):

* ``None`` (automatic): a tensor is the logits (a 1-D ``(N,)`` tensor, a regression model's one
  score per image, is read as ``(N, 1)``: explained with no target); a ``ModelOutput`` or any object with a tensor
  ``.logits`` attribute gives ``.logits``; a dict gives its ``"logits"`` entry; a tuple/list gives
  its first ``(N, C)`` tensor (``(logits, aux)``). Anything else — a dict without a ``"logits"``
  key included (one ``(N, C)`` entry may as well be an embedding) — raises
  :class:`~camlens.base.errors.OutputError` listing what was found and how to choose.
* a string: a dict key or an attribute name (``output="logits_distilled"``);
* an int: an index into a tuple or list (``output=1``);
* a callable ``raw -> (N, C) tensor`` (``output=lambda out: out["logits"]``).

A target object (detection, segmentation…) receives the raw output itself; only class-score
targets go through this selection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from camlens.base.errors import OutputError

OutputSpec = None | str | int | Callable[[Any], torch.Tensor]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)}"
    return type(value).__name__


def describe_output(raw: Any) -> str:
    """A one-line description of a raw model output: types, keys and shapes (for error messages)."""
    if isinstance(raw, Mapping):
        items = ", ".join(f"{k!r}: {_describe(v)}" for k, v in raw.items())
        return f"{type(raw).__name__} {{{items}}}"
    if isinstance(raw, (tuple, list)):
        items = ", ".join(f"[{i}] {_describe(v)}" for i, v in enumerate(raw))
        return f"{type(raw).__name__} ({items})"
    return _describe(raw)


def _is_logits(t: Any, n: int | None) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 2 and (n is None or t.shape[0] == n)


def _check(t: Any, what: str, raw: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise OutputError(
            f"{what} is {got}, not class scores: logits of shape (N, num_classes). The model returned "
            f"{describe_output(raw)}; choose the scores with output=KEY, output=INDEX or output=callable"
        )
    return t


def select_output(raw: Any, output: OutputSpec = None, n: int | None = None) -> tuple[torch.Tensor, str]:
    """``raw`` model output -> ``(logits (N, C), description of the choice)``.

    Args:
        raw: what ``model(x)`` returned.
        output: ``None`` (automatic), a key/attribute name, an index, or a callable; see the module
            docstring.
        n: the batch size, when known: automatic choices then only accept tensors with ``n`` rows.

    Raises:
        OutputError: the output holds no (or more than one) candidate, or the chosen part is not
            an ``(N, C)`` tensor. The message lists what the model returned.
    """
    if callable(output) and not isinstance(output, (str, int)):
        name = getattr(output, "__name__", type(output).__name__)
        try:
            t = output(raw)
        except Exception as exc:
            raise OutputError(
                f"output={name} raised {type(exc).__name__}: {exc} on the model's output {describe_output(raw)}"
            ) from exc
        return _check(t, f"output={name}(model output)", raw), f"output={name}"
    if isinstance(output, bool):
        raise OutputError("output= must be None, a key, an index or a callable, not a bool")
    if isinstance(output, int):
        if not isinstance(raw, (tuple, list)):
            raise OutputError(f"output={output} indexes a tuple or list, but the model returned {describe_output(raw)}")
        if not -len(raw) <= output < len(raw):
            raise OutputError(f"output={output} is out of range: the model returned {describe_output(raw)}")
        return _check(raw[output], f"element {output} of the output", raw), f"element {output} of the {_describe(raw)}"
    if isinstance(output, str):
        if isinstance(raw, Mapping) and output in raw:
            return _check(raw[output], f"output[{output!r}]", raw), f"{output!r} entry"
        if not isinstance(raw, (Mapping, torch.Tensor, tuple, list)) and isinstance(
            getattr(raw, output, None), torch.Tensor
        ):
            return _check(getattr(raw, output), f"output.{output}", raw), f".{output} of {type(raw).__name__}"
        raise OutputError(
            f"output={output!r}: the model's output has no such entry; it returned {describe_output(raw)}"
        )
    if output is not None:
        raise OutputError(f"output= must be None, a key, an index or a callable, not {type(output).__name__}")

    # automatic
    if isinstance(raw, torch.Tensor) and raw.dim() == 1 and (n is None or raw.shape[0] == n):
        return raw[:, None], "tensor (N,): one score per image (a regression output, K = 1)"
    if isinstance(raw, torch.Tensor):
        return _check(raw, "the model's output", raw), "tensor"
    logits = raw.get("logits", None) if isinstance(raw, Mapping) else getattr(raw, "logits", None)
    if isinstance(logits, torch.Tensor):  # Hugging Face ModelOutput (a dict too), or any .logits
        where = "'logits' entry" if isinstance(raw, Mapping) else ".logits"
        return _check(logits, f"the {where}", raw), f"{where} of {type(raw).__name__}"
    if isinstance(raw, Mapping):
        found = [k for k, v in raw.items() if _is_logits(v, n)]
        why = "no (N, C) tensor" if not found else f"(N, C) tensor(s) {', '.join(map(repr, found))}"
        raise OutputError(
            f"the model returned {describe_output(raw)}: {why} but no 'logits' entry, so which are the class "
            "scores (logits of shape (N, num_classes)) is not obvious. Choose them with output='KEY' or "
            "output=lambda out: ..."
        )
    if isinstance(raw, (tuple, list)):
        for i, v in enumerate(raw):
            if _is_logits(v, n):
                return v, f"element {i} of the {_describe(raw)} (its first (N, C) tensor)"
        raise OutputError(
            f"the model returned {describe_output(raw)} with no (N, C) tensor of class scores (logits of shape "
            "(N, num_classes)); choose them with output=INDEX or output=lambda out: ..."
        )
    raise OutputError(
        f"the model returned {describe_output(raw)}, not class scores (logits of shape (N, num_classes)); "
        "choose them with output=lambda out: ..."
    )


__all__ = ["OutputSpec", "describe_output", "select_output"]
