"""``camlens serve``: the local web app (upload an image, compare methods and models, boxes, curves)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import click

from camlens.cli.common import resolve_device

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_message(host: str, port: int) -> tuple[str, str | None]:
    """The line printed at start (the URL and where it listens) and a warning for a non-loopback host."""
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    if is_loopback(host):
        return f"camlens serve: {url} (bound to {host}, loopback only: other machines cannot reach it)", None
    open_url = f"http://127.0.0.1:{port}/" if host in ("0.0.0.0", "::") else url
    return (
        f"camlens serve: {open_url} (bound to {host})",
        f"warning: bound to {host}, not loopback: anyone who can reach this machine on port {port} can use the app "
        "(there is no login) and your CPU/GPU. Use the default --host 127.0.0.1 unless you mean to share it.",
    )


def _run(app: Any, sock: socket.socket) -> None:  # pragma: no cover - blocks until Ctrl-C; tests replace it
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


@click.command("serve")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="zoo name to offer, repeatable (default: efficientnet_lite0 and every zoo model whose weights are on disk)",
)
@click.option("--checkpoint", default=None, type=click.Path(exists=True), help="a `camlens finetune` output to offer")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback by default)")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="port (0: any free one)")
@click.option("--device", default=None, help="cpu, cuda, cuda:1… (default: cuda if available)")
@click.option(
    "--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(0.01), help="largest upload accepted"
)
@click.option(
    "--max-pixels",
    default=40_000_000,
    show_default=True,
    type=click.IntRange(1),
    help="largest image accepted, in pixels (checked before decoding)",
)
def serve_cmd(
    models: tuple[str, ...],
    checkpoint: str | None,
    host: str,
    port: int,
    device: str | None,
    max_upload_mb: float,
    max_pixels: int,
) -> None:
    """Start a local web app to explain your own images in the browser.

    Upload an image (or pick a bundled photo), choose the model and methods, and compare the maps of
    the top classes side by side with their boxes (threshold slider), the pixel methods' detail, the
    cost of each method, deletion/insertion curves on request, and downloads (PNG, NPY, JSON).
    Works offline: the page loads nothing from the internet. Stop it with Ctrl-C.

    With a 3-D model offered (--model r3d_18…), a NIfTI scan or a video file dropped on the page is
    explained by it and shown one slice (axial / coronal / sagittal) or frame at a time under a slider.

    \b
    Examples:
      camlens serve                        # http://127.0.0.1:8765/
      camlens serve --checkpoint runs/shapes --port 9000
    """
    try:  # the optional web stack: camlens[serve]
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            f"camlens serve needs the web extra ({exc.name} is missing): pip install 'camlens[serve]'"
        ) from None
    sock = _bind(host, port)  # first: a taken port is reported before the (slow) model load
    try:
        app, line = _build(models, checkpoint, host, sock, device, max_upload_mb, max_pixels)
        click.echo(line)
        warning = bind_message(host, sock.getsockname()[1])[1]
        if warning:
            click.echo(warning, err=True)
        _run(app, sock)
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        hint = "; choose another --port (or --port 0 for any free one)" if port else ""
        raise click.ClickException(f"cannot bind {host}:{port}: {exc.strerror or exc}{hint}") from None
    sock.listen(128)
    return sock


def _build(
    models: tuple[str, ...],
    checkpoint: str | None,
    host: str,
    sock: socket.socket,
    device: str | None,
    max_upload_mb: float,
    max_pixels: int,
) -> tuple[Any, str]:
    """The app (with the default model loaded) and the lines to print."""
    import camlens
    from camlens.base.errors import CamlensError
    from camlens.serve.app import create_app
    from camlens.serve.service import Limits, ModelPool, Service, offline_zoo_models

    dev = resolve_device(device)
    names = list(dict.fromkeys(models)) if models else offline_zoo_models()
    sources: dict[str, Any] = {}
    for n in names:
        sources[n] = lambda n=n: camlens.load_model(n, device=dev)
    default = None
    if checkpoint:
        try:
            net = camlens.load_model(checkpoint=checkpoint, device=dev)
        except CamlensError as exc:
            raise click.ClickException(str(exc)) from None
        from pathlib import Path

        default = f"checkpoint:{Path(checkpoint).name}"
        sources = {default: net, **sources}
    limits = Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels)
    pool = ModelPool(sources, max_queue=limits.max_queue)
    first = default or names[0]
    try:
        pool.entry(first)  # load the default model now: a missing weights file is reported before serving
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    service = Service(pool, limits, default_model=first)
    app = create_app(service, allowed_hosts=LOOPBACK_NAMES if is_loopback(host) else None)

    line = bind_message(host, sock.getsockname()[1])[0]
    return app, f"{line}\nmodels: {', '.join(pool.names)} (default {first}, on {dev}); Ctrl-C to stop"
