"""Cost estimates and progress of long methods, told to whoever listens (the CLI, the web app).

:func:`camlens.explain` asks each method's registered ``cost`` hook (see
:mod:`camlens.attribution.registry`) how many forwards it will run, times the shared forward pass, and,
when a :class:`Reporter` is active (:func:`reporting`), tells it an :class:`Estimate` *before* the
method runs, then the method's progress: the images the model has forwarded so far out of the
estimate. Nothing is reported, and no hook is added to the model, when no reporter listens.

The reporter is a context variable: it belongs to the thread (or task) that set it, so a web server
explaining for several clients at once gives each request its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass


def format_seconds(s: float) -> str:
    """A duration for people: ``0.4 s``, ``8 s``, ``3 min``, ``1.5 h``."""
    if not math.isfinite(s):
        return "?"
    if s < 1:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass(frozen=True)
class Estimate:
    """What one method is about to cost: ``forwards`` images through the model (``unit`` says what
    they are: "masked forwards", "path points"), ``backwards`` of them also back-propagated to the
    input, ``seconds`` at the rate of the timed forward pass; ``cheaper``: options that cut the cost
    (``{"max_channels": 64}``) and ``cheaper_seconds`` their estimate."""

    method: str
    forwards: int
    unit: str
    seconds: float
    backwards: int = 0
    cheaper: dict | None = None
    cheaper_seconds: float | None = None

    def count(self) -> str:
        """``≈1,517 masked forwards`` (``≈136 forwards + 128 backwards`` when it back-propagates)."""
        return f"≈{self.forwards:,} {self.unit}" + (f" + {self.backwards:,} backwards" if self.backwards else "")

    def cheaper_text(self, prefix: str = "--option ") -> str:
        """``--option max_channels=64`` (empty when there is no cheaper setting)."""
        if not self.cheaper:
            return ""
        return " ".join(f"{prefix}{k}={v}" for k, v in self.cheaper.items())

    def text(self, prefix: str = "--option ") -> str:
        """``scorecam: ≈1,517 masked forwards, ~3 min here; --option max_channels=64 for ~8 s``."""
        line = f"{self.method}: {self.count()}, ~{format_seconds(self.seconds)} here"
        if self.cheaper and self.cheaper_seconds is not None:
            line += f"; {self.cheaper_text(prefix)} for ~{format_seconds(self.cheaper_seconds)}"
        return line


class Reporter:
    """Receives estimates and progress (override what you need; the base class ignores both)."""

    def wants(self, method: str) -> bool:
        """Whether to estimate and follow ``method`` this time (``False``: no timed forward, no hook)."""
        return True

    def estimate(self, est: Estimate) -> None:
        """Called before a method with a declared cost runs."""

    def advance(self, method: str, done: int, total: int) -> None:
        """Called as the method forwards images: ``done`` of the ``total`` estimated (``done`` may
        pass ``total`` when the estimate is short; the caller reports ``done == total`` at the end)."""


_CURRENT: ContextVar[Reporter | None] = ContextVar("camlens_reporter", default=None)


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[Reporter | None]:
    """While active, :func:`camlens.explain` calls in this thread or task report to ``reporter``."""
    token = _CURRENT.set(reporter)
    try:
        yield reporter
    finally:
        _CURRENT.reset(token)


def current_reporter() -> Reporter | None:
    """The active reporter of this thread or task, or ``None``."""
    return _CURRENT.get()


__all__ = ["Estimate", "Reporter", "current_reporter", "format_seconds", "reporting"]
