"""What ``camlens serve`` does, without the web framework: models, uploads, explanations, curves.

* :class:`ModelPool` keeps **one model per name** in memory (loaded on first use) and serializes the
  work on each model with a lock: a second request for the same model waits its turn (up to
  ``max_queue`` waiting requests; more get a clear "busy" error), requests for different models run
  side by side. camlens' captures are per call, but a model's hooks fire for every thread's forward,
  so one call at a time per model is what makes concurrent requests give the sequential results.
* :func:`decode_upload` checks an upload's size and its pixel count (read from the header, before
  any decoding: a decompression bomb is refused without being decoded), then reads it with
  :func:`camlens.base.io.decode_image` — the same reader as the library and the CLI. **Decode only
  what is seen**: an upload is decoded at upload time only as large as the page shows it (a JPEG at
  the smallest DCT scale covering ``display_side``), and again for each model at the smallest scale
  covering that model's input (:meth:`ImageEntry.for_model`, cached; a model that takes the image at
  its own size, e.g. a detector, gets the full decode), as ``camlens.explain`` does for a path; the
  maps are at the model's input resolution either way and boxes are given in the photo's pixels
  (``ImageEntry.size``, from the header). ``Service(exact_decode=True)`` decodes every upload in full.
* :class:`Service` explains with :func:`camlens.explain`, caches each (image, model, method, class)
  map so that clicking one more class only computes that class, and precomputes each map's box at
  every threshold of :data:`THRESHOLDS` with :func:`camlens.localize` (so the page's threshold
  slider shows exactly the box the library and ``camlens localize`` give, with no JavaScript copy
  of the algorithm and no round trip per slider step).

Nothing is written to disk except an upload's temporary file while it is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from camlens.api.explanation import Explanation
from camlens.base.errors import CamlensError
from camlens.base.io import Decoded, FitSize
from camlens.base.progress import Estimate, Reporter, format_seconds, reporting
from camlens.models.preprocess import IMAGENET, Preprocess

#: box thresholds offered by the page's slider (fractions of each map's maximum)
THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(20))
#: photos bundled with scikit-image offered on the page
SAMPLES: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket")
#: methods whose default settings take many passes (the page marks them)
SLOW_METHODS = frozenset({"scorecam", "smoothgrad", "integrated_gradients"})  # and every method with a cost
#: a pixel-method map clipped at this percentile of |m| before colouring (as camlens.viz does)
PIXEL_PERCENTILE = 99.5


class ServeError(CamlensError):
    """A request the server refuses, with the HTTP status to answer and a message naming the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Request limits: upload bytes, image pixels (checked before decoding), waiting requests per
    model, classes and methods per request, and the longest side of the images the page shows."""

    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_queue: int = 8
    max_classes: int = 10
    max_methods: int = 8
    display_side: int = 640


# --------------------------------------------------------------------------------------------
# small LRU cache
# --------------------------------------------------------------------------------------------
class LRU:
    """A thread-safe dict that keeps the ``capacity`` most recently used entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key: Any, value: Any) -> Any:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._d)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class FifoLock:
    """A lock granted in arrival order (a ticket queue): the requests waiting for a model are served
    first come, first served (:class:`threading.Lock` promises no order)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket that holds the lock

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Requests queued behind the holder."""
        with self._cond:
            return max(0, self._next - self._serving - 1)


@dataclass
class ModelEntry:
    name: str
    model: nn.Module
    lock: FifoLock = field(default_factory=FifoLock)
    waiting: int = 0
    calls: int = 0


ModelSource = nn.Module | Callable[[], nn.Module]


class ModelPool:
    """Named models, each loaded once (on first use, or given ready) and used by one call at a time.

    ``sources`` maps a name to a loaded ``nn.Module`` or to a zero-argument loader.
    """

    def __init__(self, sources: dict[str, ModelSource], max_queue: int = 8) -> None:
        if not sources:
            raise ServeError("no model to serve", 500)
        self._sources = dict(sources)
        self._entries: dict[str, ModelEntry] = {
            n: ModelEntry(n, m) for n, m in sources.items() if isinstance(m, nn.Module)
        }
        self._load_locks = {n: threading.Lock() for n in sources}
        self._count_lock = threading.Lock()
        self.max_queue = max_queue

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def loaded(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> ModelEntry:
        """The model named ``name``, loading it the first time (one load at a time per name)."""
        if name not in self._sources:
            raise ServeError(f"unknown model {name!r}; this server offers: {', '.join(self._sources)}", 400)
        if name in self._entries:
            return self._entries[name]
        with self._load_locks[name]:
            if name not in self._entries:
                src = self._sources[name]
                try:
                    model = src if isinstance(src, nn.Module) else src()
                except CamlensError as exc:
                    raise ServeError(f"cannot load model {name!r}: {exc}", 409) from None
                self._entries[name] = ModelEntry(name, model)
        return self._entries[name]

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """Hold model ``name`` for one call; waits while another request uses it (a queue of at most
        ``max_queue`` waiting requests: more get a 503 asking to retry)."""
        e = self.entry(name)
        with self._count_lock:
            if e.waiting >= self.max_queue:
                raise ServeError(
                    f"the server is busy: {e.waiting} requests are waiting for {name}; try again in a moment", 503
                )
            e.waiting += 1
        try:
            e.lock.acquire()
        finally:
            with self._count_lock:
                e.waiting -= 1
        try:
            e.calls += 1
            yield e.model
        finally:
            e.lock.release()


def offline_zoo_models() -> list[str]:
    """Zoo names whose weights are on this machine: the bundled EfficientNet-Lite0, and the torchvision
    classifiers whose weight file is in the torch hub cache (camlens never downloads)."""
    import torchvision

    from camlens.models.zoo import DEFAULT_MODEL

    found = [DEFAULT_MODEL]
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    files = [f.name for f in ckpt.iterdir()] if ckpt.is_dir() else []
    if files:
        for name in torchvision.models.list_models(module=torchvision.models):
            if any(f.startswith(f"{name}-") for f in files):
                found.append(name)
    return found


# --------------------------------------------------------------------------------------------
# progress of a request
# --------------------------------------------------------------------------------------------
class JobProgress(Reporter):
    """The progress of one explain request, for the page to poll (``GET /api/progress/{job}``).

    Each of the request's ``n`` methods weighs ``1/n`` of the fraction; within a method, the images
    forwarded out of its estimate (methods without a declared cost jump from 0 to 1 when done), so
    the fraction never decreases and ends at 1. ``eta_s``: the current method's remaining time at its
    measured rate (its estimate before the first forward)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "waiting"  # waiting (for the model) -> predicting -> explaining -> done | error
        self.n_methods = 1
        self.methods_done = 0
        self.method: str | None = None
        self.done = 0
        self.total = 0
        self.started = time.perf_counter()
        self.estimates: dict[str, Estimate] = {}

    def stage(self, state: str, n_methods: int | None = None) -> None:
        with self._lock:
            self.state = state
            if n_methods is not None:
                self.n_methods = max(1, n_methods)

    def start_method(self, method: str) -> None:
        with self._lock:
            self.method, self.done, self.total, self.started = method, 0, 0, time.perf_counter()

    def end_method(self) -> None:
        with self._lock:
            self.methods_done = min(self.methods_done + 1, self.n_methods)
            self.method, self.done, self.total = None, 0, 0

    def estimate(self, est: Estimate) -> None:
        with self._lock:
            self.estimates[est.method] = est
            self.total = est.forwards

    def advance(self, method: str, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total = done, total

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            part = min(1.0, self.done / self.total) if self.total else 0.0
            fraction = 1.0 if self.state == "done" else (self.methods_done + part) / self.n_methods
            est = self.estimates.get(self.method or "")
            eta = None
            if est is not None:
                elapsed = time.perf_counter() - self.started
                eta = est.seconds if not self.done else elapsed / self.done * max(0, self.total - self.done)
            return {
                "state": self.state,
                "fraction": round(min(fraction, 1.0), 4),
                "method": self.method,
                "methods_done": self.methods_done,
                "methods": self.n_methods,
                "done": self.done,
                "total": self.total,
                "eta_s": None if eta is None else round(eta, 1),
                "eta": None if eta is None else format_seconds(eta),
                "estimate": None if est is None else estimate_text(est),
            }


def estimate_text(est: Estimate) -> str:
    """``≈1,517 masked forwards, ~3 min here (max_channels=64: ~8 s)`` for the page."""
    line = f"{est.count()}, ~{format_seconds(est.seconds)} here"
    if est.cheaper and est.cheaper_seconds is not None:
        line += f" ({est.cheaper_text('')}: ~{format_seconds(est.cheaper_seconds)})"
    return line


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
@dataclass
class ImageEntry:
    """An image the page can explain: ``rgb`` the image as decoded at upload (the full image, or a
    scaled decode that still covers ``display``), ``display`` at most ``display_side`` pixels on its
    longest side (what the page shows and the maps are resized to), ``size`` the photo's own
    ``(H, W)`` (``None``: ``rgb``'s), ``data`` the uploaded file (kept to decode it for each model)."""

    id: str
    name: str
    rgb: np.ndarray
    display: np.ndarray
    size: tuple[int, int] | None = None
    data: bytes | None = field(default=None, repr=False)
    exact: bool = False
    _decoded: dict[tuple[int, int] | None, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def photo_size(self) -> tuple[int, int]:
        """The photo's own upright ``(H, W)`` (boxes in the photo's pixels use it)."""
        return self.size or (int(self.rgb.shape[0]), int(self.rgb.shape[1]))

    def for_model(self, preprocess: Preprocess, limits: Limits) -> np.ndarray:
        """The image as ``preprocess`` needs it: the upload decoded at the smallest scale that covers
        the model's input (:meth:`~camlens.models.preprocess.Preprocess.min_decode_size`; in full when
        it needs the full image, ``exact``, or no file was kept), cached per size."""
        need = None if self.exact else preprocess.min_decode_size(self.photo_size)
        if self.data is None or (need is None and not self.reduced):
            return self.rgb
        if need not in self._decoded:
            self._decoded[need] = read_upload(self.data, self.name, limits, fit=lambda _: need).rgb
        return self._decoded[need]

    @property
    def reduced(self) -> bool:
        return tuple(self.rgb.shape[:2]) != self.photo_size

    def info(self) -> dict[str, Any]:
        h, w = self.photo_size
        dh, dw = self.display.shape[:2]
        return {
            "id": self.id,
            "name": self.name,
            "width": w,
            "height": h,
            "display_width": dw,
            "display_height": dh,
            "url": f"api/image/{self.id}.png",
        }


def display_copy(rgb: np.ndarray, side: int) -> np.ndarray:
    """``rgb`` downscaled (Lanczos) so that its longest side is at most ``side`` pixels."""
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    if s >= 1:
        return rgb
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def format_bytes(n: float) -> str:
    """``1.5 MiB``, ``48 KiB``."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _safe_filename(name: str | None) -> str:
    base = os.path.basename((name or "").replace("\\", "/")).strip() or "upload"
    return "".join(ch if ch.isprintable() else "_" for ch in base)[:120]


def decode_upload(data: bytes, filename: str | None, limits: Limits) -> np.ndarray:
    """An uploaded file -> RGB uint8 array decoded in full, or a :class:`ServeError`: 400 for an empty
    upload, 413 for one over ``limits.max_upload_bytes`` or an image over ``limits.max_pixels`` pixels
    (read from the header, so a decompression bomb is never decoded), 415 for a file that is not a
    readable image."""
    return read_upload(data, filename, limits).rgb


def display_fit(side: int) -> FitSize:
    """``fit`` for :func:`camlens.base.io.decode_image`: cover a copy whose longest side is ``side``."""

    def fit(size: tuple[int, int]) -> tuple[int, int] | None:
        s = side / max(size)
        return None if s >= 1 else (max(1, math.ceil(size[0] * s)), max(1, math.ceil(size[1] * s)))

    return fit


def read_upload(data: bytes, filename: str | None, limits: Limits, fit: FitSize | None = None) -> Decoded:
    """:func:`decode_upload`'s checks, then the upload decoded reduced when ``fit`` allows (see
    :func:`camlens.base.io.decode_image`), with the photo's own size."""
    from camlens.base.io import decode_image

    name = _safe_filename(filename)
    if not data:
        raise ServeError(f"{name}: the upload is empty; choose an image file", 400)
    if len(data) > limits.max_upload_bytes:
        raise ServeError(
            f"{name}: the upload is {format_bytes(len(data))}, more than this server's limit of "
            f"{format_bytes(limits.max_upload_bytes)}; downscale or recompress the image (or start the server "
            "with a larger --max-upload-mb)",
            413,
        )
    suffix = Path(name).suffix.lower()[:8] if Path(name).suffix.isascii() else ""
    fd, tmp = tempfile.mkstemp(prefix="camlens-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(tmp) as im:
                    w, h = im.size
        except Image.DecompressionBombError as exc:  # PIL refuses to even open it: its message has the count
            found = re.search(r"\((\d+) pixels\)", str(exc))
            w, h = (int(found.group(1)), 1) if found else (-1, -1)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise ServeError(
                f"{name}: not an image file camlens can read (corrupt, or not an image despite its name); "
                "upload a JPEG, PNG, WebP, BMP, GIF or TIFF image",
                415,
            ) from None
        if w < 0 or w * h > limits.max_pixels:
            size = "far too many pixels" if w < 0 else f"{w * h:,} pixels" if h == 1 else f"{w}x{h} = {w * h:,} pixels"
            raise ServeError(
                f"{name}: {size}, more than this server's limit of {limits.max_pixels:,} pixels "
                "(possibly a decompression bomb); downscale the image first",
                413,
            )
        try:
            return decode_image(tmp, fit)
        except CamlensError as exc:
            msg = str(exc).replace(tmp, name)
            raise ServeError(msg, 413 if "too large" in msg or "pixel" in msg else 415) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# explanations
# --------------------------------------------------------------------------------------------
@dataclass
class Panel:
    """One map: ``method`` for class ``cls`` of one image, as computed by :func:`camlens.explain`.

    ``map`` is the ``(H, W)`` map at the model's input resolution (``Explanation.maps``), ``raw`` the
    pixel attribution ``(C, H, W)`` for pixel methods (else ``None``), ``ms`` the wall time of the
    ``explain`` call that computed it (shared by the ``n_in_call`` classes of that call),
    ``boxes`` the box at each of :data:`THRESHOLDS` in the display image's pixels."""

    method: str
    cls: int
    name: str
    prob: float
    score: float
    map: np.ndarray
    raw: np.ndarray | None
    layer: str | None
    extras: dict[str, Any]
    ms: float
    n_in_call: int
    boxes: list[list[int]]


@dataclass
class Result:
    """The answer to one explain request (immutable once built)."""

    id: str
    image: ImageEntry
    model: str
    predictions: list[dict[str, Any]]
    classes: list[int]
    methods: list[str]
    panels: dict[tuple[str, int], Panel]
    errors: dict[str, str]
    cost_ms: dict[str, float | None]
    predict_ms: float
    channel_order: str = "RGB"
    curves: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    estimates: dict[str, str] = field(default_factory=dict)  # method -> its cost estimate, as shown
    random_weights: bool = False  # the model's weights are random: the page and the files say so
    served: str = ""  # the pool's model name (``model`` adds the prompts of an image–text model)
    prompts: tuple[str, ...] = ()

    def signed(self, method: str) -> bool:
        """Whether ``method``'s maps here take both signs (then a diverging colormap centred at 0 is used)."""
        return any(is_signed(p.map) for (m, _), p in self.panels.items() if m == method)


def is_signed(m: np.ndarray) -> bool:
    """A map with negative values that matter (below -1% of its largest magnitude): it is then drawn
    with a diverging colormap centred at zero."""
    lo = float(np.min(m)) if m.size else 0.0
    return lo < 0 and -lo > 1e-2 * float(np.max(np.abs(m)))


def method_title(name: str) -> str:
    """The display name of a registered method (its registry ``title``: ``"Grad-CAM"``)."""
    from camlens.attribution.registry import get_method

    return get_method(name).title


def display_boxes(m: np.ndarray, display_hw: Sequence[int]) -> list[list[int]]:
    """The box of ``m`` (model frame) at every threshold of :data:`THRESHOLDS` with
    :func:`camlens.localize`, scaled to the display image (``-1`` = no box)."""
    from camlens.base.localization import localize, scale_boxes

    boxes = np.stack([localize(m, t) for t in THRESHOLDS])
    return scale_boxes(boxes, m.shape[-2:], tuple(display_hw)).tolist()


def _class_name(names: Sequence[str] | None, c: int) -> str:
    return names[c] if names and 0 <= c < len(names) else str(c)


class Service:
    """The server's state and work; the web app (:mod:`camlens.serve.app`) only translates HTTP."""

    def __init__(
        self,
        pool: ModelPool,
        limits: Limits | None = None,
        *,
        default_model: str | None = None,
        exact_decode: bool = False,
    ) -> None:
        self.pool = pool
        self.limits = limits or Limits()
        self.exact_decode = exact_decode  # uploads decoded in full (see the module docstring)
        self.default_model = default_model or pool.names[0]
        # bounded memory: a panel holds one map (and a pixel method's C x H x W attribution)
        self.images = LRU(32)
        self.results = LRU(16)
        self._panels = LRU(256)
        self._predictions = LRU(256)
        self._zero_shot = LRU(8)  # (model, *prompts) -> zero-shot classifier (text embedded once)
        self.jobs = LRU(64)  # request id -> JobProgress, polled by the page

    # --- images -------------------------------------------------------------------------------
    def _add_image(self, image_id: str, name: str, rgb: np.ndarray) -> ImageEntry:
        e = ImageEntry(image_id, name, rgb, display_copy(rgb, self.limits.display_side))
        return self.images.put(image_id, e)

    def upload(self, data: bytes, filename: str | None) -> ImageEntry:
        fit = None if self.exact_decode else display_fit(self.limits.display_side)
        d = read_upload(data, filename, self.limits, fit)
        image_id, name = f"u{hashlib.sha256(data).hexdigest()[:20]}", _safe_filename(filename)
        e = ImageEntry(
            image_id, name, d.rgb, display_copy(d.rgb, self.limits.display_side), d.size, data, self.exact_decode
        )
        return self.images.put(image_id, e)

    def sample(self, name: str) -> ImageEntry:
        if name not in SAMPLES:
            raise ServeError(f"no bundled photo {name!r}; choose one of {', '.join(SAMPLES)}", 404)
        got = self.images.get(f"sample-{name}")
        if got is not None:
            return got
        from camlens.base.io import sample_image

        return self._add_image(f"sample-{name}", name, sample_image(name))

    def image(self, image_id: str) -> ImageEntry:
        if image_id.startswith("sample-"):
            return self.sample(image_id.removeprefix("sample-"))
        got = self.images.get(image_id)
        if got is None:
            raise ServeError(f"unknown or expired image {image_id!r}; upload it again", 404)
        return got

    def result(self, result_id: str) -> Result:
        got = self.results.get(result_id)
        if got is None:
            raise ServeError(f"unknown or expired result {result_id!r}; explain the image again", 404)
        return got

    # --- methods --------------------------------------------------------------------------------
    def methods_for(self, model: str | None) -> dict[str, Any]:
        """The methods that apply to ``model`` (loading it if needed; the check needs no forward), and
        why the others do not."""
        from camlens.attribution.registry import methods
        from camlens.attribution.traits import model_traits
        from camlens.models.imagetext import ImageText

        name = model or self.default_model
        net = self.pool.entry(name).model
        traits = model_traits(net)
        infos = methods()
        return {
            "model": name,
            "image_text": isinstance(net, ImageText),  # the page shows its prompt box
            "describe": traits.describe(),
            "methods": [n for n, i in infos.items() if i.applies(traits)],
            "not_applicable": {n: i.applies_to.text for n, i in infos.items() if not i.applies(traits)},
        }

    def progress(self, job: str) -> dict[str, Any]:
        got = self.jobs.get(job)
        return got.snapshot() if got is not None else {"state": "unknown", "fraction": 0.0}

    # --- explanations -------------------------------------------------------------------------
    def _check_applicable(self, net: nn.Module, name: str, meths: Sequence[str]) -> None:
        from camlens.api.explainer import check_applicable
        from camlens.attribution.registry import get_method
        from camlens.attribution.traits import model_traits

        try:
            check_applicable([get_method(m) for m in meths], model_traits(net))
        except CamlensError as exc:
            raise ServeError(str(exc), 400) from None

    def _check_methods(self, methods: Sequence[str]) -> list[str]:
        from camlens.attribution.registry import get_method

        if not methods:
            raise ServeError("choose at least one method", 400)
        if len(methods) > self.limits.max_methods:
            raise ServeError(f"{len(methods)} methods in one request; at most {self.limits.max_methods}", 400)
        out = []
        for m in methods:
            if not isinstance(m, str):
                raise ServeError(f"a method name must be a string, not {m!r}", 400)
            try:
                out.append(get_method(m).name)
            except CamlensError as exc:
                raise ServeError(str(exc), 400) from None
        return list(dict.fromkeys(out))

    def explain(
        self,
        image_id: str,
        model: str | None,
        methods: Sequence[str],
        *,
        topk: int = 5,
        n_explain: int = 2,
        classes: Sequence[int] | None = None,
        job: str | None = None,
        prompts: Sequence[str] | None = None,
    ) -> Result:
        """Predict the top-``topk`` classes and explain ``classes`` (default: the ``n_explain`` most
        probable) with every method; panels already computed for this image and model are reused.
        ``job``: an id under which the request's progress can be polled (:meth:`progress`).
        ``prompts`` (an image–text model: CLIP, SigLIP, OpenCLIP): the texts typed in the prompt box,
        the classes of a zero-shot classifier (:func:`camlens.models.imagetext.zero_shot`)."""
        progress = self.jobs.put(job, JobProgress()) if job else JobProgress()
        try:
            res = self._explain(image_id, model, methods, topk, n_explain, classes, progress, prompts)
        except BaseException:
            progress.stage("error")
            raise
        progress.stage("done")
        return res

    def _with_prompts(self, net: nn.Module, name: str, prompts: Sequence[str] | None) -> tuple[nn.Module, str]:
        """An image–text model with the prompt box's texts: a zero-shot classifier over them (cached
        per model and prompts, which also key the cached predictions and panels)."""
        from camlens.models.imagetext import ImageText, ZeroShotClassifier, zero_shot

        texts = [p.strip() for p in prompts or [] if p.strip()]
        bare = isinstance(net, ImageText) and not isinstance(net, ZeroShotClassifier)
        if texts and not isinstance(net, ImageText):
            raise ServeError(f"{name} is not an image–text model (CLIP, SigLIP, OpenCLIP): it takes no prompts", 400)
        if not texts:
            if bare:
                raise ServeError(f"{name} is an image–text model: type one or more prompts to explain", 400)
            return net, name
        key = (name, *texts)
        clf = self._zero_shot.get(key)
        if clf is None:
            try:
                clf = self._zero_shot.put(key, zero_shot(net, texts))
            except CamlensError as exc:
                raise ServeError(f"{name} cannot embed these prompts: {exc}", 422) from None
        return clf, f"{name} | {' | '.join(texts)}"

    def _check_counts(self, topk: int, n_explain: int, classes: Sequence[int] | None) -> list[int] | None:
        """The request's class counts within the limits; ``classes`` deduplicated."""
        lim = self.limits.max_classes
        if not 1 <= topk <= lim or not 1 <= n_explain <= lim:
            raise ServeError(f"topk and the number of classes to explain must be in 1..{lim}", 400)
        if classes is None:
            return None
        out = list(dict.fromkeys(int(c) for c in classes))
        if not out or len(out) > lim:
            raise ServeError(f"explain between 1 and {lim} classes at once", 400)
        return out

    def _predict(self, net: Any, name: str, img: Any, rgb: np.ndarray) -> tuple[list[dict[str, Any]], float]:
        """The most classes a request may ask for, once per image and model (cached; ``rgb``: the
        image as decoded for this model); milliseconds."""
        import camlens

        key = (img.id, name)
        preds = self._predictions.get(key)
        t0 = time.perf_counter()
        if preds is None:
            try:
                top = camlens.predict(net, [rgb], topk=self.limits.max_classes)[0]
            except CamlensError as exc:
                raise ServeError(f"{name} cannot classify this image: {exc}", 422) from None
            preds = [{"id": c, "name": n, "prob": p, "rank": r + 1} for r, (c, n, p) in enumerate(top)]
            self._predictions.put(key, preds)
        return preds, (time.perf_counter() - t0) * 1e3

    def _explain(
        self,
        image_id: str,
        model: str | None,
        methods: Sequence[str],
        topk: int,
        n_explain: int,
        classes: Sequence[int] | None,
        progress: JobProgress,
        prompts: Sequence[str] | None = None,
    ) -> Result:
        import camlens
        from camlens.models.zoo import card_of

        name = model or self.default_model
        served = name
        meths = self._check_methods(methods)
        classes = self._check_counts(topk, n_explain, classes)
        img = self.image(image_id)
        cost: dict[str, float | None] = {}
        errors: dict[str, str] = {}
        self._check_applicable(self.pool.entry(name).model, name, meths)  # before waiting for the model
        with self.pool.use(served) as net:
            net, name = self._with_prompts(net, served, prompts)
            progress.stage("predicting")
            card = card_of(net)
            names = card.class_names if card else None
            rgb = img.for_model(card.preprocess if card else IMAGENET, self.limits)
            preds, predict_ms = self._predict(net, name, img, rgb)
            n_classes = _num_classes(net, names)
            if classes is None:
                classes = [p["id"] for p in preds[:n_explain]]
            bad = [c for c in classes if not 0 <= c < n_classes]
            if bad:
                raise ServeError(f"class id {bad[0]} is out of range 0..{n_classes - 1} for {name}", 400)
            order = card.preprocess.channel_order if card else "RGB"
            fresh: list[tuple[str, Explanation, float]] = []
            have: dict[tuple[str, int], Panel] = {}  # cached panels, held here so no eviction loses them
            progress.stage("explaining", len(meths))
            for m in meths:
                progress.start_method(m)
                for c in classes:
                    got = self._panels.get((img.id, name, m, c))
                    if got is not None:
                        have[(m, c)] = got
                missing = [c for c in classes if (m, c) not in have]
                if not missing:
                    cost[m] = None  # everything cached
                    progress.end_method()
                    continue
                t0 = time.perf_counter()
                try:
                    with reporting(progress):  # the estimate before the work, then its progress
                        exp = camlens.explain(net, [rgb], method=m, targets=[missing])
                except CamlensError as exc:
                    errors[m] = str(exc)
                    continue
                finally:
                    progress.end_method()
                ms = (time.perf_counter() - t0) * 1e3
                cost[m] = ms
                fresh.append((m, exp, ms))
        # boxes and splitting need no model: outside the lock
        for m, exp, ms in fresh:
            for panel in _panels_of(exp, m, ms, names, img.display.shape[:2]):
                have[(m, panel.cls)] = self._panels.put((img.id, name, m, panel.cls), panel)
        panels = {(m, c): have[(m, c)] for m in meths if m not in errors for c in classes}
        if not panels:
            raise ServeError("; ".join(f"{m}: {e}" for m, e in errors.items()) or "nothing to explain", 400)
        res = Result(
            id=uuid.uuid4().hex[:16],
            image=img,
            model=name,
            predictions=preds[:topk],
            classes=list(classes),
            methods=[m for m in meths if m not in errors],
            panels=panels,
            errors=errors,
            cost_ms=cost,
            predict_ms=predict_ms,
            channel_order=order,
            estimates={m: estimate_text(e) for m, e in progress.estimates.items()},
            random_weights=bool(card and card.extra.get("weights") == "random"),
            served=served,
            prompts=tuple(p.strip() for p in prompts or [] if p.strip()),
        )
        return self.results.put(res.id, res)

    def faithfulness(self, result_id: str, method: str, cls: int, steps: int = 20) -> dict[str, Any]:
        """Deletion and insertion curves (Petsiuk et al., BMVC 2018; :mod:`camlens.metrics`) of one
        shown map, beside the same curves for a smooth random map (the metrics' baseline)."""
        from camlens.metrics import deletion_curve, insertion_curve
        from camlens.models.zoo import card_of

        res = self.result(result_id)
        panel = res.panels.get((method, int(cls)))
        if panel is None:
            raise ServeError(f"result {result_id} has no {method} map of class {cls}", 404)
        got = res.curves.get((method, int(cls)))
        if got is not None:
            return got
        t0 = time.perf_counter()
        out: dict[str, Any] = {"method": method, "cls": int(cls), "steps": steps}
        with self.pool.use(res.served or res.model) as net:
            net, _ = self._with_prompts(net, res.served or res.model, res.prompts)
            card = card_of(net)
            rgb = res.image.for_model(card.preprocess if card else IMAGENET, self.limits)
            for kind, fn in (("deletion", deletion_curve), ("insertion", insertion_curve)):
                for which, maps in (("map", torch.from_numpy(panel.map)[None]), ("random", "random")):
                    c = fn(net, [rgb], maps, [int(cls)], steps=steps, batch_size=steps + 1)
                    out.setdefault(kind, {})[which] = {
                        "fractions": [round(float(f), 4) for f in c.fractions],
                        "probs": [float(p) for p in c.probs[0]],
                        "auc": float(c.auc[0]),
                    }
        out["ms"] = (time.perf_counter() - t0) * 1e3
        res.curves[(method, int(cls))] = out
        return out


def _num_classes(net: nn.Module, names: Sequence[str] | None) -> int:
    if names:
        return len(names)
    last = None
    for m in net.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else 10**9


def _panels_of(
    exp: Explanation, method: str, ms: float, names: Sequence[str] | None, display_hw: Sequence[int]
) -> list[Panel]:
    out = []
    k = exp.shape[1]
    for j in range(k):
        c = int(exp.classes[0, j])
        m = exp.map(0, j).detach().float().cpu().numpy()
        raw = exp.raw[0, j].detach().float().cpu().numpy() if exp.kind == "pixel" else None
        extras = {
            key: (v if isinstance(v, (int, float, str, bool)) else v.detach().cpu().tolist())
            for key, v in exp.extras.items()
            if isinstance(v, (int, float, str, bool)) or (isinstance(v, torch.Tensor) and v.numel() <= 16)
        }
        out.append(
            Panel(
                method=method,
                cls=c,
                name=_class_name(names, c),
                prob=float(exp.probs[0, j]),
                score=float(exp.scores[0, j]),
                map=m,
                raw=raw,
                layer=exp.layer,
                extras=extras,
                ms=ms,
                n_in_call=k,
                boxes=display_boxes(m, display_hw),
            )
        )
    return out


__all__ = [
    "SAMPLES",
    "THRESHOLDS",
    "ImageEntry",
    "JobProgress",
    "Limits",
    "ModelPool",
    "Panel",
    "Result",
    "ServeError",
    "Service",
    "decode_upload",
    "display_boxes",
    "format_bytes",
    "is_signed",
    "method_title",
    "offline_zoo_models",
]
