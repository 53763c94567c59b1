"""Concurrent camlens calls on one model (issue 12 item 17): equal to serial results, nothing left behind."""

from __future__ import annotations

import threading

import pytest
import torch

import camlens
from camlens.base.concurrency import lock_of, model_lock


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _photos():
    from camlens.base.io import sample_image

    names = ["chelsea", "coffee", "astronaut", "rocket"]
    return [sample_image(n)[::4, ::4].copy() for n in names]  # small: keeps the test fast


@pytest.mark.slow
def test_threads_on_one_model_equal_serial(lite0):
    photos = _photos()
    methods = ["gradcam", "cam", "guided_backprop"]  # capture hooks, lazy pooling mode, ReLU rules
    hooks_before = _hook_count(lite0)
    serial = {(t, j): camlens.explain(lite0, photos[t], method=methods[j]).maps for t in range(4) for j in range(3)}
    results: dict = {}
    errors: list = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            start.wait()
            for j in range(3):
                results[(t, j)] = camlens.explain(lite0, photos[t], method=methods[j]).maps
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 12
    for key, ref in serial.items():
        torch.testing.assert_close(results[key], ref, rtol=1e-5, atol=1e-6, msg=f"thread/call {key} differs")
    assert _hook_count(lite0) == hooks_before
    assert not any(m.training for m in lite0.modules())


def test_mixed_train_flag_restored_under_threads(tiny):
    """A model with a module in training mode: concurrent calls never leave the flags changed, and
    no call sees the model in training mode (the output of a dropout model would differ)."""
    model = torch.nn.Sequential(tiny, torch.nn.Dropout(0.9)).double()
    model[1].train()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    ref = camlens.explain(model, x, method="gradcam").maps
    out: list = []
    errors: list = []

    def work() -> None:
        try:
            for _ in range(5):
                out.append(camlens.explain(model, x, method="gradcam").maps)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(out) == 20
    for m in out:
        torch.testing.assert_close(m, ref)
    assert model[1].training and not model[0].training


def test_lock_is_per_model_and_reentrant(tiny):
    other = torch.nn.Linear(2, 2)
    assert lock_of(tiny) is lock_of(tiny)
    assert lock_of(tiny) is not lock_of(other)
    with model_lock(tiny), model_lock(tiny):  # re-entrant: nested calls in one thread do not deadlock
        got = threading.Event()

        def other_model() -> None:
            with model_lock(other):
                got.set()

        th = threading.Thread(target=other_model)
        th.start()
        th.join(5)
        assert got.is_set()  # another model is not blocked
