"""Safe outputs (camlens.base.fsio and every writer): atomic writes, symbolic links never followed, a full
disk or an unusable folder reported by cause, a partial run's files complete or absent.

Oracles: the file system itself (lstat of what exists after the run, byte contents, the directory
listing), and the errno a patched ``os.write`` raises."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from camlens.base import fsio
from camlens.base.errors import OutputExistsError, WriteError
from camlens.cli import main


def listing(folder: Path) -> dict[str, bytes | str]:
    """Every entry of ``folder``: file -> bytes, link -> 'link:' + target."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.iterdir()):
        out[p.name] = f"link:{os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


@pytest.fixture
def full_disk(monkeypatch):
    """``os.write`` raises ENOSPC once ``limit`` bytes were written (set ``state['limit']``)."""
    state = {"limit": 0, "written": 0}
    real = os.write

    def write(fd, data):
        if state["written"] + len(data) > state["limit"]:
            take = max(0, state["limit"] - state["written"])
            if take:
                state["written"] += real(fd, bytes(memoryview(data)[:take]))
                return take
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, data)
        state["written"] += n
        return n

    monkeypatch.setattr(fsio.os, "write", write)
    return state


# ------------------------------------------------------------------------------------------------ the helper
def test_atomic_write_kinds_and_overwrite(tmp_path):
    p = tmp_path / "a.bin"
    fsio.atomic_write(p, b"abc")
    assert p.read_bytes() == b"abc" and oct(p.stat().st_mode & 0o777) != "0o600"  # normal permissions
    with pytest.raises(OutputExistsError, match="--overwrite"):
        fsio.atomic_write(p, b"new")
    assert p.read_bytes() == b"abc"
    fsio.atomic_write(p, "é", overwrite=True)
    assert p.read_text(encoding="utf-8") == "é"
    fsio.atomic_write(p, lambda f: np.save(f, np.arange(3)), overwrite=True)
    assert np.load(p).tolist() == [0, 1, 2]
    fsio.atomic_write_json(tmp_path / "x.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": [1, 2]}
    with pytest.raises(WriteError, match="is a folder"):
        fsio.atomic_write(tmp_path, b"x", overwrite=True)
    assert no_temporaries(tmp_path)


def test_links_are_refused_or_replaced_never_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dangling.png").symlink_to(elsewhere / "x.png")
    (out / "live.txt").symlink_to(victim)
    for name in ("dangling.png", "live.txt"):
        with pytest.raises(OutputExistsError, match="symbolic link"):
            fsio.atomic_write(out / name, b"data")
    assert not (elsewhere / "x.png").exists() and victim.read_text() == "precious"
    for name in ("dangling.png", "live.txt"):
        fsio.atomic_write(out / name, b"data", overwrite=True)  # the link is replaced by a file
        assert not (out / name).is_symlink() and (out / name).read_bytes() == b"data"
    assert not (elsewhere / "x.png").exists() and victim.read_text() == "precious"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim.txt"]


def test_full_disk_leaves_no_truncated_file_and_keeps_the_old_one(tmp_path, full_disk):
    p = tmp_path / "big.bin"
    full_disk["limit"] = 1000
    with pytest.raises(WriteError, match=r"big\.bin: no space left on the device"):
        fsio.atomic_write(p, b"x" * 5000)
    assert not p.exists() and no_temporaries(tmp_path)
    full_disk["limit"], full_disk["written"] = 10**9, 0
    fsio.atomic_write(p, b"old")
    full_disk["limit"], full_disk["written"] = 2, 0
    with pytest.raises(WriteError, match="no space left"):
        fsio.atomic_write(p, b"new content", overwrite=True)
    assert p.read_bytes() == b"old" and no_temporaries(tmp_path)


def test_interrupt_inside_a_writer_leaves_nothing(tmp_path):
    def writer(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fsio.atomic_write(tmp_path / "a.png", writer)
    assert list(tmp_path.iterdir()) == []


def test_unusable_folders_give_the_cause(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(WriteError, match="not a folder"):
        fsio.safe_out_dir(f)
    with pytest.raises(WriteError, match="parent of it is not a folder"):
        fsio.safe_out_dir(f / "sub")
    with pytest.raises(WriteError, match="not a folder"):
        fsio.atomic_write(f / "x.png", b"1")
    with pytest.raises(WriteError, match=r"/proc/camlens-x"):
        fsio.safe_out_dir("/proc/camlens-x")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(WriteError, match="permission denied"):
                fsio.atomic_write(ro / "x.png", b"1")
        finally:
            ro.chmod(0o700)
    err = fsio.os_error(OSError(errno.EROFS, "Read-only file system"), "/mnt/x.png")
    assert "read-only file system" in str(err) and "/mnt/x.png" in str(err)


# ------------------------------------------------------------------------------------------------ the commands
def _plant_links(out: Path, names: list[str], elsewhere: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        (out / n).symlink_to(elsewhere / n)  # dangling: Path.exists() is False for them


def _run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "cmd, names",
    [
        (["explain", "--method", "gradcam", "--topk", "1"], ["chelsea_gradcam_top1.png", "chelsea_gradcam.json"]),
        (["localize", "--method", "gradcam"], ["boxes.json"]),
    ],
)
def test_commands_never_write_through_a_link(cmd, names, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    _plant_links(out, names, elsewhere)
    before = listing(out)
    r = _run(*cmd, "--out", out)
    assert r.exit_code != 0 and "symbolic link" in r.output and "--overwrite" in r.output
    assert listing(out) == before and list(elsewhere.iterdir()) == []
    r = _run(*cmd, "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert list(elsewhere.iterdir()) == []  # nothing created outside --out
    for n in names:
        assert (out / n).is_file() and not (out / n).is_symlink()


def test_evaluate_never_writes_through_a_link_and_skips_unreadable_images(tmp_path):
    from skimage import data as skd

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, name in enumerate(("chelsea", "coffee", "astronaut")):
        Image.fromarray(getattr(skd, name)()).resize((64, 64)).save(imgs / f"{i}_{name}.png")
    (imgs / "3_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    _plant_links(out, ["summary.json"], elsewhere)
    args = ["evaluate", imgs, "--size", "64", "--metrics", "average_drop", "--no-plots", "--quiet", "--out", out]
    r = _run(*args)
    assert r.exit_code != 0 and "symbolic link" in r.output
    r = _run(*args, "--overwrite")
    assert r.exit_code == 1, r.output  # like explain and localize: the rest is done, the bad one named
    assert "3_broken.png" in r.output and "skipped 1 unreadable" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["skipped"] == [str(imgs / "3_broken.png")]
    rows = (out / "per_image.csv").read_text().splitlines()[1:]
    assert {r.split(",")[0] for r in rows} == {"0_chelsea", "1_coffee", "2_astronaut"}
    assert list(elsewhere.iterdir()) == []


def test_finetune_never_writes_through_a_link(tmp_path):
    from camlens.train import finetune
    from tests.train.test_finetune import FAST, make_folder, tiny_net

    data = make_folder(tmp_path / "d", {"a": 4, "b": 4})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    names = ["last.safetensors", "best.json", "metrics.csv", "curves.png", "train_state.safetensors"]
    _plant_links(out, names, elsewhere)
    with pytest.raises(OutputExistsError):
        finetune(data, model=tiny_net(), out=out, epochs=1, **FAST)
    finetune(data, model=tiny_net(), out=out, epochs=1, overwrite=True, **FAST)
    assert list(elsewhere.iterdir()) == []
    assert all((out / n).is_file() and not (out / n).is_symlink() for n in names)
    (out / "metrics.json").unlink()
    (out / "metrics.json").symlink_to(elsewhere / "m.json")
    finetune(data, model=tiny_net(), out=out, epochs=2, resume=True, **FAST)  # resume replaces, never follows
    assert list(elsewhere.iterdir()) == [] and not (out / "metrics.json").is_symlink()


def test_bench_refuses_a_dangling_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "r.md").symlink_to(elsewhere / "r.md")
    r = _run("bench", "--quick", "--markdown", tmp_path / "r.md")
    assert r.exit_code != 0 and "symbolic link" in r.output and "--overwrite" in r.output
    assert list(elsewhere.iterdir()) == []


def test_explain_on_a_full_disk_names_the_cause_and_a_rerun_succeeds(tmp_path, full_disk):
    out = tmp_path / "out"
    full_disk["limit"] = 65536  # the first PNG is larger: the disk fills while it is written
    r = _run("explain", "--method", "gradcam", "--topk", "1", "--format", "png", "--out", out)
    assert r.exit_code == 1 and "no space left on the device" in r.output and "chelsea_gradcam_top1.png" in r.output
    assert "Traceback" not in r.output
    assert not out.exists() or (listing(out) == {} and no_temporaries(out))  # complete or absent
    full_disk["limit"], full_disk["written"] = 10**12, 0
    r = _run("explain", "--method", "gradcam", "--topk", "1", "--format", "png", "--out", out)
    assert r.exit_code == 0, r.output
    with Image.open(out / "chelsea_gradcam_top1.png") as im:
        im.load()  # complete


def test_unusable_out_folders_are_clear_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub", "/proc/camlens-x"):
        r = _run("explain", "--method", "gradcam", "--topk", "1", "--format", "json", "--out", out)
        assert r.exit_code in (1, 2) and "error" in r.output.lower(), r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), r.output  # no traceback
        assert str(out) in r.output and any(w in r.output for w in ("not a folder", "is a file", "cannot")), r.output


def test_finetune_on_a_full_disk_leaves_no_temporary_and_resumes(tmp_path, full_disk):
    """The disk fills during the resumed run: a clear WriteError naming the file, no .tmp left, and
    the folder still resumes to the end (the last commit is intact)."""
    from camlens.train import finetune
    from tests.train.test_finetune import FAST, make_folder, tiny_net

    full_disk["limit"] = 10**12
    data = make_folder(tmp_path / "d", {"a": 4, "b": 4})
    out = tmp_path / "run"
    finetune(data, model=tiny_net(), out=out, epochs=1, **FAST)
    full_disk["limit"], full_disk["written"] = 5000, 0  # the disk fills during the resumed run's writes
    with pytest.raises(WriteError, match=r"run/[\w.]+: no space left on the device"):
        finetune(data, model=tiny_net(), out=out, epochs=2, resume=True, **FAST)
    assert no_temporaries(out)
    full_disk["limit"] = 10**12
    res = finetune(data, model=tiny_net(), out=out, epochs=2, resume=True, **FAST)
    assert [h["epoch"] for h in res.history] == [1, 2]
