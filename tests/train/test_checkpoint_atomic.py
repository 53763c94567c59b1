"""Checkpoints as one consistent unit: finetune interrupted (SIGINT in-process, SIGKILL in a forked
child) right after each of its file commits, then resumed, must end with the weights of an
uninterrupted run (to 1e-6) or refuse clearly; a run that diverges saves nothing of the bad epoch.

Oracle: the same run without interruption, in the same process and thread count."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import camlens.base.fsio
from camlens.base.errors import CamlensError, CheckpointError
from camlens.train import finetune
from tests.train.test_finetune import FAST, make_folder, tiny_net

KW = dict(lr=0.05, seed=1, epochs=2, **FAST)  # epoch 2 improves (val acc 0.75 -> 1.0): best.* is rewritten


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("ckdata"), {"left": 8, "right": 8})


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the forked child and the parent compute alike
    yield
    torch.set_num_threads(n)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class Commits:
    """Counts the atomic commits (``os.replace``/``os.link`` of camlens temporary files) and runs
    ``action`` right after the ``at``-th one."""

    def __init__(self, monkeypatch, at: int | None = None, action=None):
        self.names: list[str] = []
        self.at, self.action = at, action
        real_replace, real_link = os.replace, os.link

        def hook(real):
            def wrapped(src, dst, *a, **k):
                r = real(src, dst, *a, **k)
                if Path(str(src)).name.endswith(".tmp"):
                    self.names.append(Path(str(dst)).name)
                    if self.at is not None and len(self.names) == self.at:
                        self.action()
                return r

            return wrapped

        monkeypatch.setattr(camlens.base.fsio.os, "replace", hook(real_replace))
        monkeypatch.setattr(camlens.base.fsio.os, "link", hook(real_link))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run and the names of its commits, in order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("ref") / "run"
        mp = pytest.MonkeyPatch()
        c = Commits(mp)
        res = finetune(data, model=tiny_net(), out=out, **KW)
        mp.undo()
    finally:
        torch.set_num_threads(n)
    return out, c.names, res


def _same_as_reference(out: Path, ref: Path) -> None:
    for stem in ("last", "best"):
        a, b = _tensors(out / f"{stem}.safetensors"), _tensors(ref / f"{stem}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{stem} {k}")
        ca, cb = json.loads((out / f"{stem}.json").read_text()), json.loads((ref / f"{stem}.json").read_text())
        assert ca["epoch"] == cb["epoch"]
    ha = json.loads((out / "metrics.json").read_text())["history"]
    hb = json.loads((ref / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb]
    for x, y in zip(ha, hb, strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-6)
    import camlens

    camlens.train.load_checkpoint(out, model=tiny_net())  # the folder's best checkpoint verifies and loads


def _resume_and_check(out: Path, ref: Path, data: Path) -> str:
    try:
        finetune(data, model=tiny_net(), out=out, resume=True, **KW)
    except CheckpointError as exc:
        assert "nothing to resume" in str(exc)  # interrupted before the first epoch was committed
        return "refused"
    _same_as_reference(out, ref)
    return "resumed"


def _sigint():
    signal.raise_signal(signal.SIGINT)


def _interrupt_in_process(at: int, out: Path, data: Path, monkeypatch) -> None:
    with monkeypatch.context() as mp:
        Commits(mp, at, _sigint)
        with pytest.raises(KeyboardInterrupt):
            finetune(data, model=tiny_net(), out=out, **KW)


def _kill_in_child(at: int, out: Path, data: Path) -> None:
    pid = os.fork()
    if pid == 0:  # the child: run until the at-th commit, then die without any cleanup
        try:
            mp = pytest.MonkeyPatch()
            Commits(mp, at, lambda: os.kill(os.getpid(), signal.SIGKILL))
            finetune(data, model=tiny_net(), out=out, **KW)
        finally:
            os._exit(3)  # not killed: the commit count was wrong
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked finetune hung")
        time.sleep(0.05)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _boundaries(names: list[str]) -> dict[str, int]:
    """Commit index (1-based) right after which to interrupt, by what has just been written."""
    second = [i for i, n in enumerate(names) if n == "train_state.safetensors"][1]
    picks = {
        "after config.json": names.index("config.json") + 1,
        "before epoch 2's commit": second,  # every file of epoch 1 written
        "after epoch 2's commit": second + 1,
        "between last.safetensors and last.json (epoch 2)": second + names[second:].index("last.safetensors") + 1,
    }
    if "best.safetensors" in names[second:]:
        picks["between best.safetensors and best.json (epoch 2)"] = (
            second + names[second:].index("best.safetensors") + 1
        )
    return picks


def test_commit_order_is_state_first(reference):
    _, names, res = reference
    assert res.best["epoch"] == 2, "the fixture needs an improving epoch 2 to exercise best.*"
    second = [i for i, n in enumerate(names) if n == "train_state.safetensors"][1]
    epoch2 = names[second:]
    assert epoch2[:5] == ["train_state.safetensors", "best.safetensors", "best.json", "last.safetensors", "last.json"]


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_at_key_boundaries_resumes_exactly(how, reference, data, tmp_path, monkeypatch, one_thread):
    ref, names, _ = reference
    outcomes = {}
    fast = ("after config.json", "before epoch 2's commit", "after epoch 2's commit")
    for label, at in _boundaries(names).items():
        if label not in fast and "best" not in label:  # the rest: the slow sweep over every commit
            continue
        out = tmp_path / f"{how}-{at}"
        if how == "sigint":
            _interrupt_in_process(at, out, data, monkeypatch)
        else:
            _kill_in_child(at, out, data)
        outcomes[label] = _resume_and_check(out, ref, data)
    assert outcomes.pop("after config.json") == "refused"
    assert set(outcomes.values()) == {"resumed"}, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_after_every_commit_resumes_exactly(how, reference, data, tmp_path, monkeypatch, one_thread):
    ref, names, _ = reference
    first_commit = names.index("train_state.safetensors")  # epoch 1 is committed once this file is written
    outcomes = {}
    for at in range(1, len(names)):
        out = tmp_path / f"{how}-{at}"
        if how == "sigint":
            _interrupt_in_process(at, out, data, monkeypatch)
        else:
            _kill_in_child(at, out, data)
        outcomes[at] = _resume_and_check(out, ref, data)
    expected = {at: "refused" if at <= first_commit else "resumed" for at in outcomes}
    assert outcomes == expected


def test_resume_repairs_last_and_an_edited_card_fails_its_checksum(reference, data, tmp_path, one_thread):
    """last.* are rebuilt from the commit when missing or damaged; an edited card fails its checksum."""
    ref, _, _ = reference
    out = tmp_path / "r"
    finetune(data, model=tiny_net(), out=out, **{**KW, "epochs": 1})
    (out / "last.safetensors").unlink()
    (out / "last.json").write_text("{}")
    finetune(data, model=tiny_net(), out=out, resume=True, **KW)
    _same_as_reference(out, ref)

    card = json.loads((out / "best.json").read_text())
    card["epoch"] = 1
    (out / "best.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="checksum"):
        import camlens

        camlens.train.load_checkpoint(out, model=tiny_net())


def test_train_state_is_one_file_with_weights_optimizer_and_cards(reference):
    from camlens.train.checkpoint import load_train_state

    ref, _, _ = reference
    info, model, opt = load_train_state(ref)
    last = _tensors(ref / "last.safetensors")
    assert info["epoch"] == 2 and model.keys() == last.keys()
    assert all(torch.equal(model[k], last[k]) for k in last)
    assert info["cards"]["last"]["checksum"] == json.loads((ref / "last.json").read_text())["checksum"]
    assert opt["state"] and all("momentum_buffer" in s for s in opt["state"].values())
    data = bytearray((ref / "train_state.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the optimizer's buffers
    bad = ref.parent / "bad"
    bad.mkdir()
    (bad / "train_state.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_train_state(bad)


def test_divergence_is_a_clear_error_and_saves_nothing(data, tmp_path):
    """An absurd learning rate: the single batch's loss is finite, the step makes the weights inf, the
    validation NaN. finetune says so and writes no checkpoint of that epoch."""
    out = tmp_path / "d"
    with pytest.raises(CamlensError, match="diverged in epoch 1"):
        finetune(data, model=tiny_net(), out=out, **{**KW, "lr": 1e38, "batch_size": 64, "epochs": 1})
    assert not (out / "last.safetensors").exists() and not (out / "train_state.safetensors").exists()


def test_nan_weights_in_the_start_model_are_named(data, tmp_path):
    net = tiny_net()
    with torch.no_grad():
        net.fc.weight[0, 0] = float("nan")
    with pytest.raises(CamlensError, match="loss became nan|diverged"):
        finetune(data, model=net, out=tmp_path / "n", **KW)


def test_history_is_finite(reference):
    _, _, res = reference
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in res.history)
