"""One camlens call at a time per model: a re-entrant lock per ``nn.Module``.

A camlens call changes state that belongs to the *model*, not to the call: it registers capture
hooks on shared modules (which fire for every thread's forward), enters a
:class:`~torch.overrides.TorchFunctionMode` from inside such a hook, switches every module to
eval mode and restores each flag afterwards, and may patch ReLU behaviour for the backward.
Two threads doing this on one model at once see each other's forwards (wrong maps), pop each
other's function modes ("empty mode stack"), and one thread's restore of the train/eval flags
can put a module back in training mode while another thread's forward runs through it.

Keying the captures to their call (a context variable checked in every hook) would fix the
first two but not the third: the train/eval flags and the module-level patches are global to
the model. So camlens serializes its calls per model with :func:`model_lock`, taken by
:func:`camlens.base._util.eval_mode` — the context every model-touching camlens function enters.
Calls on *different* models still run in parallel; the lock is re-entrant, so nested camlens
calls on one model in one thread (``explain`` inside a metric) do not deadlock. Its cost is an
uncontended ``RLock`` acquire (well under a microsecond) per call.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def lock_of(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serializes camlens calls on ``model`` (created on first use)."""
    lock = _LOCKS.get(model)
    if lock is None:
        with _GUARD:
            lock = _LOCKS.get(model)
            if lock is None:
                lock = threading.RLock()
                _LOCKS[model] = lock
    return lock


@contextlib.contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s camlens lock for the duration of the block (see the module docstring)."""
    with lock_of(model):
        yield


__all__ = ["lock_of", "model_lock"]
