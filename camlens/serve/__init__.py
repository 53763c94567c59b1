"""``camlens serve``: a local web app to upload an image and compare where models look.

:mod:`camlens.serve.service` holds the work (models, uploads, explanations; no web framework),
:mod:`camlens.serve.render` the pictures and files, :mod:`camlens.serve.app` the FastAPI app
(the optional ``camlens[serve]`` extra) and ``static/`` the page.
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """The FastAPI app; see :func:`camlens.serve.app.create_app` (imports FastAPI on first use)."""
    from camlens.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
