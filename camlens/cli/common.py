"""Helpers shared by the ``camlens`` commands: inputs (files, folders, globs), output names,
overwrite checks, model loading, thresholds and small tables.

Failures of single inputs are *collected*, not raised, so a command can report them by name, go on
with the rest and exit non-zero at the end.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from camlens.base.io import IMAGE_EXTENSIONS
from camlens.base.names import output_stems

if TYPE_CHECKING:  # typing only: the CLI imports torch lazily
    from camlens.targets import Classes

#: the photo used when no image is given (skimage's "chelsea" the cat)
DEFAULT_PHOTO = "chelsea"

EXIT_OK, EXIT_FAILED = 0, 1


@dataclass
class Inputs:
    """Expanded inputs: ``sources`` (paths, or ``"skimage:NAME"`` for a bundled photo), ``names``
    (unique, file-name safe output stems, one per source) and ``problems`` (messages)."""

    sources: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)


def _is_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def _images_in(folder: Path, recursive: bool) -> list[str]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(str(f) for f in it if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def expand_inputs(items: Sequence[str], *, recursive: bool = False, default: str | None = DEFAULT_PHOTO) -> Inputs:
    """Files, folders (their image files, sorted; ``recursive`` for sub-folders) and glob patterns
    (``**`` allowed) -> :class:`Inputs`. A path that does not exist, an empty folder and a glob that
    matches nothing become ``problems``. No items at all -> the bundled ``default`` photo.

    A file named explicitly is kept whatever its suffix (a corrupt file is reported when read);
    folders and globs keep only image suffixes (:data:`IMAGE_EXTENSIONS`). Duplicates are dropped.
    """
    out = Inputs()
    if not items:
        if default:
            out.sources.append(f"skimage:{default}")
            out.names.append(default)
        return out
    paths: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = _images_in(p, recursive)
            if not found:
                out.problems.append(
                    f"{item}: folder has no image files ({', '.join(IMAGE_EXTENSIONS[:6])}…)"
                    + ("" if recursive else "; use --recursive for sub-folders")
                )
            paths += found
        elif p.exists():
            paths.append(str(p))
        elif _is_glob(item):
            found = sorted(
                f
                for f in glob.glob(item, recursive=True)
                if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                out.problems.append(f"{item}: no image file matches this pattern")
            paths += found
        else:
            out.problems.append(f"{item}: no such file or folder")
    out.sources = list(dict.fromkeys(paths))
    out.names = output_stems(out.sources)
    return out


def load_source(source: str):
    """Read one input as an RGB uint8 array (``skimage:NAME`` -> a bundled photo)."""
    from camlens.base.io import load_image, sample_image

    if source.startswith("skimage:"):
        return sample_image(source.split(":", 1)[1])
    return load_image(source)


def parse_formats(value: str | Sequence[str], allowed: Sequence[str]) -> list[str]:
    """``"png,npy"`` (or repeated values) -> ``["png", "npy"]``; unknown names are a usage error."""
    items = value.split(",") if isinstance(value, str) else [v for x in value for v in x.split(",")]
    fmts = list(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in fmts if f not in allowed]
    if bad or not fmts:
        raise click.BadParameter(
            f"unknown format(s) {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}", param_hint="--format"
        )
    return fmts


def parse_threshold(value: str | None) -> float | None:
    """``--threshold``: a fraction of the max in [0, 1), or a calibrated-threshold JSON file."""
    if value is None:
        return None
    from camlens.base.errors import CamlensError
    from camlens.metrics.loceval import load_threshold

    try:
        return load_threshold(value)
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--threshold") from None


def check_overwrite(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse (exit 1, nothing written) when any planned output exists — a file or a symbolic link,
    even a dangling one (:func:`camlens.base.fsio.check_targets`) — and ``--overwrite`` is not set."""
    from camlens.base.errors import CamlensError
    from camlens.base.fsio import check_targets

    try:
        check_targets(paths, overwrite)
    except CamlensError as exc:
        raise click.ClickException(f"{exc}; or choose another --out folder") from None


def resolve_device(device: str | None) -> str:
    """``--device`` -> a device string that exists here; anything else is a usage error listing the
    devices this machine has (``cuda`` on a CPU-only machine, ``gpu``…)."""
    from camlens.base.devices import parse_device
    from camlens.base.errors import CamlensError

    try:
        return str(parse_device(device))
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cap_workers(ctx: click.Context | None, param: click.Parameter | None, value: int | None) -> int | None:
    """``--workers`` callback: more DataLoader workers than CPUs only adds processes (and torch's
    warning, twice per process): cap at the CPU count, said in one line (by rank 0 under torchrun)."""
    import os

    cpus = usable_cpus()
    if value is None or value <= cpus:
        return value
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"camlens: --workers {value} capped to {cpus}, the CPUs this process may use", err=True)
    return cpus


#: the Python spellings in library messages -> the command line's flags
_FLAG_SPELLINGS = (
    ("weights=PATH", "--weights PATH"),
    ("weights='random'", "--weights random"),
    ("overwrite=True", "--overwrite"),
    ("resume=True", "--resume"),
)


def cli_message(exc: BaseException) -> str:
    """A library error's message as the command line says it: ``pass weights=PATH`` becomes
    ``pass --weights PATH`` (the keyword is the flag there)."""
    text = str(exc)
    for py, flag in _FLAG_SPELLINGS:
        text = text.replace(f"{py} ({flag})", flag).replace(py, flag)  # "overwrite=True (--overwrite)" too
    return text


def load_model_opts(model: str, weights: str | None, checkpoint: str | None, device: str | None):
    """``--model/--weights/--checkpoint/--device`` -> a loaded model; camlens errors exit 1 with
    their message (which names the fix)."""
    import camlens
    from camlens.base.errors import CamlensError
    from camlens.models.onnxmodel import is_onnx_path

    if is_onnx_path(model) and weights == "random":  # `layers`/`methods` ask for random weights to load fast;
        weights = None  # an ONNX file carries its own
    try:
        return camlens.load_model(model, weights, checkpoint=checkpoint, device=resolve_device(device))
    except CamlensError as exc:
        raise click.ClickException(cli_message(exc)) from None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _convert(text: str, hint: Any, default: Any) -> Any:
    """One ``--option`` value typed by its parameter's annotation (``int``, ``float``, ``bool``,
    ``str``, ``X | None``); without a usable annotation, by the default's type, else as a Python
    literal (``1.5``, ``[1, 2]``, ``None``) or the string itself."""
    import ast
    import types
    import typing

    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    if args:
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        kinds = [a for a in args if a is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else None
    if hint in (None, typing.Any) or not isinstance(hint, type):
        hint = type(default) if default is not None and type(default) in (bool, int, float, str) else None
    if hint is bool:
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError("true or false")
    if hint is int:
        return int(text)
    if hint is float:
        return float(text)
    if hint is str:
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method_options(values: Sequence[str], methods: Sequence[str]) -> dict[str, Any]:
    """``--option key=value`` (repeatable) -> keyword options for :func:`camlens.explain`, each value
    typed by the signature of the methods that take it; an unknown key gets the API's error (the
    valid options of the chosen methods)."""
    import typing

    from camlens.api.explainer import _split_options
    from camlens.attribution.registry import get_method
    from camlens.base.errors import CamlensError

    infos = [get_method(m) for m in methods]
    raw: dict[str, str] = {}
    for v in values:
        key, sep, text = v.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE, e.g. max_channels=64", param_hint="--option")
        raw[key] = text
    try:
        _split_options(infos, raw)  # unknown keys: the same error as camlens.explain(..., key=...)
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--option") from None
    out: dict[str, Any] = {}
    for key, text in raw.items():
        for info in infos:
            opts = info.options()
            if key not in opts:
                continue
            hint = typing.get_type_hints(info.fn).get(key)
            try:
                out[key] = _convert(text, hint, opts[key])
            except ValueError:
                want = getattr(hint, "__name__", None) or str(hint)
                raise click.BadParameter(
                    f"{key}={text!r}: {info.name}'s {key} takes {want} (default {opts[key]!r})", param_hint="--option"
                ) from None
            break
    return out


def method_option(f: Callable) -> Callable:
    """``--option KEY=VALUE`` (repeatable): method options, as listed by ``camlens methods -v``."""
    return click.option(
        "--option",
        "method_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="method option, repeatable, typed by the method (`camlens methods -v` lists them), "
        "e.g. --option max_channels=64",
    )(f)


def check_layer(net, layer: str | None) -> None:
    """``--layer`` checked against the loaded model before any image is read (a usage error with
    the closest names), so that a typo is not reported once per input."""
    if layer is None:
        return
    from camlens.base.errors import CamlensError
    from camlens.core.layers import resolve_layer

    try:
        resolve_layer(net, layer)
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--layer") from None


def parse_classes(values: Sequence[str], class_names: Sequence[str] | None) -> Classes:
    """``--class`` values (ids, or names and their synonyms, case-insensitive: ``"tabby cat"`` finds
    ImageNet's ``"tabby"``; see :mod:`camlens.base.classnames`) -> the same class ids for every image,
    duplicates dropped."""
    from camlens.base.classnames import class_id
    from camlens.base.errors import TargetError
    from camlens.targets import Classes

    ids = []
    for v in values:
        for part in (x.strip() for x in v.split(",")):
            if not part:
                continue
            if part.lstrip("-").isdigit():
                c = int(part)
                if class_names and not 0 <= c < len(class_names):
                    raise click.BadParameter(
                        f"class id {c} is out of range 0..{len(class_names) - 1}", param_hint="--class"
                    )
                ids.append(c)
                continue
            if not class_names:
                raise click.BadParameter(
                    f"unknown class {part!r}; this model has no class names, pass ids", param_hint="--class"
                )
            try:
                ids.append(class_id(part, class_names))
            except TargetError as exc:
                raise click.BadParameter(str(exc), param_hint="--class") from None
    return Classes(*dict.fromkeys(ids))


def batches(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), max(1, size)):
        yield seq[i : i + max(1, size)]


def progress(total: int, desc: str, enabled: bool | None = None):
    """A tqdm bar on stderr for ``total`` items (shown for 4 or more items unless told)."""
    from tqdm import tqdm

    show = total >= 4 if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit="img", disable=not show, file=sys.stderr, leave=False)


def echo_err(msg: str, bar=None) -> None:
    """An error/warning line on stderr that does not break a progress bar."""
    if bar is not None and not bar.disable:
        bar.write(msg, file=sys.stderr)
    else:
        click.echo(msg, err=True)


def echo(msg: str, bar=None) -> None:
    if bar is not None and not bar.disable:
        bar.write(msg)
    else:
        click.echo(msg)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, indent: str = "") -> str:
    """A plain left-aligned text table."""
    cells = [[str(c) for c in r] for r in ([header] if header else []) + list(rows)]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(indent + ln for ln in lines)


def common_model_options(f: Callable) -> Callable:
    """``--model --weights --checkpoint --layer --device`` shared by explain and localize."""
    opts = [
        click.option("--model", default="efficientnet_lite0", show_default=True, help="zoo name (`camlens models`)"),
        click.option(
            "--weights", default=None, help="weights file (.pth/.safetensors), 'random', or a torchvision weights name"
        ),
        click.option(
            "--checkpoint",
            default=None,
            type=click.Path(),
            help="a `camlens finetune` output folder or checkpoint (replaces --model)",
        ),
        click.option(
            "--layer",
            default=None,
            help="dotted layer name (default: the features entering global pooling; `camlens layers MODEL` lists them)",
        ),
        click.option("--device", default=None, help="cpu, cuda, cuda:1… (default: cuda if available)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def quiet_methods(names, options: dict | None) -> dict:
    """``options`` plus ``progress=False`` when one of the methods ``names`` has a progress bar of
    its own (Score-CAM, RISE, occlusion…) and the user did not set it: ``-q`` hides every bar."""
    from camlens.attribution.registry import get_method

    opts = dict(options or {})
    if "progress" not in opts and any("progress" in get_method(n).options() for n in names):
        opts["progress"] = False
    return opts
