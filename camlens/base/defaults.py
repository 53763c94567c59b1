"""Defaults shared across the API, the CLI and the web app (one number, one place; no torch import)."""

from __future__ import annotations

#: images explained per forward: the one default of ``camlens explain`` / ``localize`` / ``compare``,
#: :func:`camlens.explain_dataset` and :func:`camlens.metrics.evaluate_model` (the metrics'
#: ``batch_size`` is another quantity: perturbed copies per forward, default 32)
EXPLAIN_BATCH = 16
