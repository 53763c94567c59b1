"""The ``camlens serve`` web app: a small FastAPI app over :class:`camlens.serve.service.Service`
and one static page (``static/``: plain HTML, CSS and JavaScript; no CDN, no web fonts, no telemetry;
the page's Content-Security-Policy only allows this server as a source).

Why FastAPI and a static page rather than Gradio (the field's convention for model demos): Gradio
is a large dependency tree whose page loads web fonts and, by default, reports usage analytics, and
whose components do not offer what this page needs (a box that follows a slider without a round trip,
heat layers composited by opacity, per-panel curves). FastAPI, uvicorn and python-multipart are small,
pinned, and the page is three files that work with no network.

Every error answers JSON ``{"error": message}`` with a 4xx status (5xx only for a bug); the server
keeps serving. Routes (all under ``/api`` except the page)::

    GET  /                                   the page           GET  /api/info     models, methods, photos
    GET  /api/methods?model=                 the methods that apply to a model (and why not the others)
    POST /api/image        upload (raw body, or multipart field "file")      -> image info
    GET  /api/sample/{name}                  a bundled photo    GET  /api/image/{id}.png
    POST /api/explain      {image_id, model, methods, topk, explain, classes, job, prompts} -> result
    GET  /api/progress/{job}                 fraction done, ETA and cost estimate of a running request
    GET  /api/result/{id}/heat/{method}/{cls}.png?cmap=    GET /api/result/{id}/detail/{method}/{cls}.png
    GET  /api/result/{id}/figure.png?alpha=&threshold=&cmap=&pixel_boxes=
    GET  /api/result/{id}/maps/{method}.npy  GET /api/result/{id}/summary.json?threshold=
    POST /api/faithfulness {result_id, method, cls}        -> deletion / insertion curves
    POST /api/volume?model=&method=  a NIfTI scan or a video (raw body + X-Filename, or multipart)
                                     -> axes, sizes, aspect, peak, colour scale (camlens.serve.volume)
    GET  /api/volume/{id}/slice/{axis}/{index}.png?alpha=   one slice (axial/coronal/sagittal) or frame
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

# fastapi, starlette and pydantic are the optional `camlens[serve]` extra: this module is only
# imported by `camlens serve` and by code that asks for the app
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from camlens.serve import render
from camlens.serve.detect import add_detector_routes
from camlens.serve.service import (
    SAMPLES,
    SLOW_METHODS,
    THRESHOLDS,
    Limits,
    ModelPool,
    ServeError,
    Service,
    format_bytes,
    method_title,
)
from camlens.serve.volume import VolumeService, slice_png

log = logging.getLogger("camlens.serve")

CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(max_length=80)
    model: str | None = Field(default=None, max_length=200)
    methods: list[str] = Field(default_factory=lambda: ["gradcam"], max_length=32)
    topk: int = 5
    explain: int = 2
    classes: list[int] | None = Field(default=None, max_length=32)
    job: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,40}$")
    prompts: list[str] | None = Field(default=None, max_length=10)  # image–text models: zero-shot over them


class CurveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    result_id: str = Field(max_length=40)
    method: str = Field(max_length=60)
    cls: int


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _png(data: bytes, filename: str | None = None) -> Response:
    headers = {"Cache-Control": "no-store"}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return Response(data, media_type="image/png", headers=headers)


def _stem(name: str) -> str:
    from camlens.viz import safe_name

    return safe_name(name.rsplit(".", 1)[0] if "." in name else name)


def _result_json(res: Any) -> dict[str, Any]:
    from camlens.attribution.registry import get_method

    base = f"api/result/{res.id}"
    methods = []
    for m in list(res.methods) + [m for m in res.errors if m not in res.methods]:
        info = get_method(m)
        cost = res.cost_ms.get(m)
        methods.append(
            {
                "name": m,
                "title": method_title(m),
                "kind": info.kind,
                "signed": res.signed(m) if m in res.methods else None,
                "box": info.boxes,  # a box means something on this method's maps (not on pixel noise)
                "estimate": res.estimates.get(m),
                "cost_ms": None if cost is None else round(cost, 1),
                "cached": m in res.methods and cost is None,
                "error": res.errors.get(m),
                "npy_url": f"{base}/maps/{m}.npy" if m in res.methods else None,
            }
        )
    panels = []
    for (m, c), p in res.panels.items():
        panels.append(
            {
                "method": m,
                "cls": c,
                "name": p.name,
                "title": render.panel_title(res, p),
                "prob": p.prob,
                "score": p.score,
                "rank": render.rank_of(res, c),
                "layer": p.layer,
                "ms": round(p.ms, 1),
                "classes_in_call": p.n_in_call,
                "heat_url": f"{base}/heat/{m}/{c}.png",
                "detail_url": f"{base}/detail/{m}/{c}.png" if p.raw is not None else None,
                "boxes": p.boxes,
            }
        )
    return {
        "id": res.id,
        "image": res.image.info(),
        "model": res.model,
        "random_weights": res.random_weights,
        "model_label": render.model_label(res),
        "predictions": res.predictions,
        "classes": res.classes,
        "methods": methods,
        "panels": panels,
        "predict_ms": round(res.predict_ms, 1),
        "thresholds": list(THRESHOLDS),
        "figure_url": f"{base}/figure.png",
        "summary_url": f"{base}/summary.json",
    }


async def _read_body(request: Request, limit: int, slack: int = 0) -> bytes:
    """The request body, refused with a 413 as soon as it passes ``limit + slack`` bytes (the declared
    Content-Length is checked first, so an oversized upload is not even read); ``slack`` allows for a
    multipart body's headers around the file."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + slack:
        raise ServeError(
            f"the upload is {format_bytes(int(declared))}, more than this server's limit of "
            f"{format_bytes(limit)}; downscale or recompress the image (or start the server with a larger "
            "--max-upload-mb)",
            413,
        )
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit + slack:
            raise ServeError(f"the upload is more than this server's limit of {format_bytes(limit)}", 413)
    return bytes(buf)


def create_app(service: Service | None = None, *, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The web app over ``service`` (default: EfficientNet-Lite0, loaded on first use).

    ``allowed_hosts``: the Host header values accepted (``camlens serve`` passes the loopback
    names when bound to loopback, which stops DNS-rebinding pages from reaching the app).
    """
    if service is None:
        import camlens

        service = Service(ModelPool({"efficientnet_lite0": lambda: camlens.load_model("efficientnet_lite0")}))
    svc = service
    app = FastAPI(title="camlens serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        return _error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
        return _error(422, "bad request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # pragma: no cover - a bug; logged
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps running")

    static = resources.files("camlens.serve") / "static"

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    _add_input_routes(app, svc)
    _add_result_routes(app, svc)
    _add_volume_routes(app, VolumeService(svc.pool, svc.limits))
    add_detector_routes(app, svc, _result_json)  # a served detector: its detections, one explained
    return app


def _add_volume_routes(app: FastAPI, vol: VolumeService) -> None:
    """A NIfTI scan or a video uploaded and explained (``POST /api/volume?model=&method=``), then
    shown one slice at a time (``GET /api/volume/{id}/slice/{axis}/{index}.png``), see
    :mod:`camlens.serve.volume`."""
    app.state.volumes = vol

    @app.post("/api/volume")
    async def volume_upload(request: Request, model: str, method: str = "gradcam") -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        ctype = request.headers.get("content-type", "")
        slack = 64 * 1024 if ctype.startswith("multipart/form-data") else 0
        body = await _read_body(request, vol.limits.max_upload_bytes, slack)
        if ctype.startswith("multipart/form-data"):
            data, name = await _multipart_file(request, body)
        else:
            from urllib.parse import unquote

            data, name = body, unquote(request.headers.get("x-filename") or "")
        entry = await run_in_threadpool(vol.explain_upload, data, name, model, method)
        return entry.info()

    @app.get("/api/volume/{entry_id}/slice/{axis}/{index}.png")
    def volume_slice(entry_id: str, axis: str, index: int, alpha: float = 0.5) -> Response:
        return _png(slice_png(vol.get(entry_id), axis, index, min(1.0, max(0.0, alpha))))


def _add_input_routes(app: FastAPI, svc: Service) -> None:
    """The routes that list models and methods, take images and report progress."""
    lim = svc.limits

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        import camlens
        from camlens.attribution.registry import methods

        return {
            "version": camlens.__version__,
            "default_model": svc.default_model,
            "models": [{"name": n, "loaded": svc.pool.loaded(n)} for n in svc.pool.names],
            "methods": [
                {
                    "name": i.name,
                    "title": method_title(i.name),
                    "kind": i.kind,
                    "paper": i.paper,
                    "summary": i.summary,
                    "slow": i.name in SLOW_METHODS or i.cost is not None,
                    "box": i.boxes,
                    "applies_to": i.applies_to.text,
                }
                for i in methods().values()
            ],
            "samples": list(SAMPLES),
            "thresholds": list(THRESHOLDS),
            "colormaps": list(render.COLORMAPS),
            "limits": {
                "max_upload_bytes": lim.max_upload_bytes,
                "max_pixels": lim.max_pixels,
                "max_classes": lim.max_classes,
            },
        }

    @app.get("/api/methods")
    def methods_for(model: str | None = None) -> dict[str, Any]:
        return svc.methods_for(model)

    @app.get("/api/progress/{job}")
    def progress(job: str) -> dict[str, Any]:
        return svc.progress(job)

    @app.post("/api/image")
    async def upload(request: Request) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        ctype = request.headers.get("content-type", "")
        # a multipart body carries a few hundred bytes of headers around the file
        slack = 64 * 1024 if ctype.startswith("multipart/form-data") else 0
        body = await _read_body(request, lim.max_upload_bytes, slack)
        name = request.headers.get("x-filename")
        if ctype.startswith("multipart/form-data"):
            data, name = await _multipart_file(request, body)
        else:
            data = body
            if name:
                from urllib.parse import unquote

                name = unquote(name)
        entry = await run_in_threadpool(svc.upload, data, name)
        return entry.info()

    @app.get("/api/sample/{name}")
    def sample(name: str) -> dict[str, Any]:
        return svc.sample(name).info()

    @app.get("/api/image/{image_id}.png")
    def image_png(image_id: str, max_side: int | None = None) -> Response:
        from camlens.serve.service import display_copy

        img = svc.image(image_id).display
        if max_side is not None:
            img = display_copy(img, max(16, min(max_side, 1024)))
        return _png(render.png_bytes(img))


def _add_result_routes(app: FastAPI, svc: Service) -> None:
    """The routes that explain an image and serve the results (PNG, NPY, JSON, curves)."""

    @app.post("/api/explain")
    def explain(req: ExplainRequest) -> dict[str, Any]:
        res = svc.explain(
            req.image_id,
            req.model,
            req.methods,
            topk=req.topk,
            n_explain=req.explain,
            classes=req.classes,
            job=req.job,
            prompts=req.prompts,
        )
        return _result_json(res)

    def _panel(result_id: str, method: str, cls: int):
        res = svc.result(result_id)
        p = res.panels.get((method, cls))
        if p is None:
            raise ServeError(f"result {result_id} has no {method} map of class {cls}", 404)
        return res, p

    @app.get("/api/result/{result_id}/heat/{method}/{cls}.png")
    def heat(result_id: str, method: str, cls: int, cmap: str = "auto") -> Response:
        res, p = _panel(result_id, method, cls)
        return _png(render.png_bytes(render.heat_rgb(res, p, cmap)))

    @app.get("/api/result/{result_id}/detail/{method}/{cls}.png")
    def detail(result_id: str, method: str, cls: int) -> Response:
        res, p = _panel(result_id, method, cls)
        return _png(render.png_bytes(render.detail_rgb(res, p)))

    @app.get("/api/result/{result_id}/figure.png")
    def figure(
        result_id: str, alpha: float = 0.5, threshold: float = 0.3, cmap: str = "auto", pixel_boxes: bool = False
    ) -> Response:
        res = svc.result(result_id)
        data = render.figure_png(res, alpha=alpha, threshold=threshold, cmap=cmap, pixel_boxes=pixel_boxes)
        return _png(data, f"{_stem(res.image.name)}_camlens.png")

    @app.get("/api/result/{result_id}/maps/{method}.npy")
    def maps(result_id: str, method: str) -> Response:
        res = svc.result(result_id)
        data = render.maps_npy(res, method)
        from camlens.viz import safe_name

        fname = f"{_stem(res.image.name)}_{safe_name(method)}.npy"
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{fname}"'},
        )

    @app.get("/api/result/{result_id}/summary.json")
    def summary(result_id: str, threshold: float = 0.3) -> Response:
        res = svc.result(result_id)
        return Response(
            render.summary_json(res, threshold),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{_stem(res.image.name)}_camlens.json"'},
        )

    @app.post("/api/faithfulness")
    def faithfulness(req: CurveRequest) -> dict[str, Any]:
        return svc.faithfulness(req.result_id, req.method, req.cls)


async def _multipart_file(request: Request, body: bytes) -> tuple[bytes, str | None]:
    """The ``file`` field of a multipart body already read (and size-checked) by :func:`_read_body`."""
    from starlette.datastructures import UploadFile

    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    req = Request(request.scope, replay)
    try:
        form = await req.form(max_files=1, max_fields=8)
    except Exception as exc:
        raise ServeError(
            f"cannot read the multipart upload ({exc}); send the image in a field named 'file'", 400
        ) from None
    f = form.get("file")
    if not isinstance(f, UploadFile):
        raise ServeError("the multipart upload has no file field named 'file'", 400)
    data = await f.read()
    await form.close()
    return data, f.filename


__all__ = ["Limits", "create_app"]
