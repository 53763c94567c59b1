"""Safe output files: atomic, symlink-safe writes with clear errors. Every camlens writer uses this.

The guarantees, for every file camlens writes into an output folder:

* **Complete or absent.** The bytes go to a temporary file in the *same folder*
  (``.NAME.XXXX.tmp``, created with ``O_CREAT | O_EXCL``, so never through a link), are flushed and
  ``fsync``-ed, and the temporary file is renamed over the final name with :func:`os.replace` (one
  atomic step on POSIX and Windows). On any failure — an ``OSError``, ``KeyboardInterrupt``, a
  ``SIGKILL`` before the rename — the final name keeps its old content (or stays absent) and the
  temporary file is removed (after a ``SIGKILL`` a stray ``.*.tmp`` may remain; it is never read).
* **Never through a symbolic link.** The target is examined with :func:`os.lstat`. An existing
  entry — a regular file, *or a symbolic link, even a dangling one* — is refused with
  :class:`~camlens.base.errors.OutputExistsError` unless ``overwrite=True``; with ``overwrite`` a link is
  *replaced* by the new file (``os.replace`` renames over the link itself), so the file it points to
  is neither created nor modified. A folder in the way is always refused. Without ``overwrite`` the
  final step is ``os.link`` (fails if anything appeared meanwhile), so a racing writer cannot be
  clobbered either.
* **Clear errors.** Every ``OSError`` becomes :class:`~camlens.base.errors.WriteError` naming the path and
  the cause in words (no space left on the device, permission denied, a parent that is not a folder,
  a read-only file system, …) and the fix.

API (``data_or_writer`` is ``bytes``, ``str`` (UTF-8), or a callable that writes into a binary file
object, e.g. ``lambda f: image.save(f, format="PNG")`` or ``lambda f: fig.savefig(f, format="png")``)::

    from camlens.base.fsio import atomic_write, atomic_write_json, safe_out_dir, check_targets

    out = safe_out_dir("results/")                      # mkdir -p, must be a folder, clear errors
    check_targets([out / "a.png", out / "b.json"], overwrite=False)   # refuse before any work
    atomic_write(out / "a.png", png_bytes)              # refuses an existing file or link
    atomic_write(out / "b.json", text, overwrite=True)  # replaces a file or a link (never follows it)
    atomic_write_json(out / "c.json", {"k": 1})

The output folder itself (``--out``) may be a symbolic link the user chose; links *inside* it are
never followed. Writers that must produce a file through a library that only takes a path should
write into a :class:`io.BytesIO` through the callable form instead.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from camlens.base.errors import OutputExistsError, WriteError

#: what a writer accepts: the bytes, a text (UTF-8), or a function writing into a binary file object
Data = bytes | bytearray | memoryview | str | Callable[[IO[bytes]], Any]

_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free some space or write to another --out folder"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write to another --out folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted (immutable or protected file or folder)", "choose another folder"),
    errno.EROFS: ("read-only file system", "choose a folder on a writable file system"),
    errno.ENOTDIR: ("a parent of it is not a folder", "choose a path whose parents are folders"),
    errno.EISDIR: ("it is a folder", "remove the folder or choose another name"),
    errno.ENOENT: ("its folder does not exist (or was removed while writing)", "create the folder first"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose shorter names"),
    errno.ELOOP: ("too many levels of symbolic links", "remove the links"),
    errno.EIO: ("input/output error from the device", "check the disk"),
    errno.EXDEV: ("the temporary file is on another device", "report this as a camlens bug"),
}


def describe_os_error(exc: OSError) -> str:
    """The cause of an ``OSError`` in words (``"no space left on the device"``…)."""
    cause = _CAUSES.get(exc.errno or -1)
    return cause[0] if cause else (exc.strerror or type(exc).__name__)


def os_error(exc: OSError, path: str | os.PathLike, action: str = "write") -> WriteError:
    """An :class:`WriteError` for ``exc`` that names ``path``, the cause and the fix."""
    cause, fix = _CAUSES.get(exc.errno or -1, (exc.strerror or type(exc).__name__, "check the path"))
    err = WriteError(f"cannot {action} {os.fspath(path)}: {cause} [errno {exc.errno}]; {fix}")
    err.errno = exc.errno
    err.filename = os.fspath(path)
    return err


def _lstat(path: Path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError as exc:
        raise os_error(exc, path) from None
    except OSError as exc:
        raise os_error(exc, path, "inspect") from None


def check_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to write ``path`` when something is there (a file, a link — even dangling — or a
    folder) and ``overwrite`` is false; a folder is refused even with ``overwrite``. Returns ``path``."""
    p = Path(path)
    st = _lstat(p)
    if st is None:
        return p
    if stat.S_ISDIR(st.st_mode):
        raise WriteError(f"cannot write {p}: it is a folder; remove it or choose another output name")
    if not overwrite:
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
        raise OutputExistsError(
            f"{p} already exists ({kind}); pass --overwrite (overwrite=True) to replace it "
            "(a link is replaced, never followed), or choose another output folder"
        )
    return p


def check_targets(paths: Iterable[str | os.PathLike], overwrite: bool = False) -> None:
    """:func:`check_target` on every path before any work; the error names the first clash and counts
    the others."""
    clash: list[Path] = []
    first: Exception | None = None
    for p in paths:
        try:
            check_target(p, overwrite)
        except (OutputExistsError, WriteError) as exc:
            first = first or exc
            clash.append(Path(p))
    if first is not None:
        if len(clash) > 1:
            raise type(first)(f"{first} (and {len(clash) - 1} more file(s) in the way)")
        raise first


def safe_out_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """An output folder: created with its parents when missing; an existing non-folder, a parent that
    is a file, or an unwritable place gives :class:`WriteError` naming the cause."""
    p = Path(path)
    try:
        if create:
            p.mkdir(parents=True, exist_ok=True)
        if not p.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(p))
    except FileExistsError:
        raise WriteError(f"cannot use {p} as an output folder: it exists and is not a folder") from None
    except NotADirectoryError:
        if p.exists() and not p.is_dir():
            raise WriteError(f"cannot use {p} as an output folder: it exists and is not a folder") from None
        raise WriteError(
            f"cannot create the output folder {p}: a parent of it is not a folder; choose another --out"
        ) from None
    except OSError as exc:
        raise os_error(exc, p, "create the output folder") from None
    return p


def _as_bytes(data: Data) -> bytes | memoryview:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data)
    if callable(data):
        buf = io.BytesIO()
        data(buf)
        return buf.getbuffer()
    raise TypeError(f"atomic_write needs bytes, str or a writer callable, not {type(data).__name__}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    off = 0
    while off < len(view):
        off += os.write(fd, view[off : off + (1 << 22)])


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data_or_writer: Data, overwrite: bool = False, fsync: bool = True) -> Path:
    """Write ``path`` atomically and symlink-safely (see the module docstring); return ``path``.

    ``fsync=False`` skips the flush to the disk (for many small files, e.g. a generated dataset): the
    file is still complete or absent after a crash of the process, only not after a power loss.

    Raises :class:`OutputExistsError` when something is at ``path`` and ``overwrite`` is false,
    :class:`WriteError` for every OS error (naming the path and the cause). The folder must exist
    (see :func:`safe_out_dir`).
    """
    p = Path(path)
    check_target(p, overwrite)
    data = _as_bytes(data_or_writer)  # a writer's own exceptions propagate unchanged
    folder = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{p.name[:80]}.", suffix=".tmp")
    except OSError as exc:
        raise os_error(exc, p) from None
    done = False
    try:
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # mkstemp creates 0600; give the usual permissions
            os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # fails if anything (even a dangling link) appeared meanwhile
            except FileExistsError:
                raise OutputExistsError(
                    f"{p} appeared while camlens was writing it; pass --overwrite to replace it"
                ) from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV):
                    raise
                check_target(p, overwrite=False)  # no hard links here: check, then rename
                os.replace(tmp, p)
            else:
                os.unlink(tmp)
        done = True
    except OSError as exc:
        if isinstance(exc, (WriteError, OutputExistsError)):
            raise
        raise os_error(exc, p) from None
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    if fsync:
        _fsync_dir(folder)
    return p


_UMASK: int | None = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        current = os.umask(0)
        os.umask(current)
        _UMASK = current
    return _UMASK


def atomic_write_json(path: str | os.PathLike, obj: Any, overwrite: bool = False, **dumps: Any) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj, indent=2) + "\\n"`` (``dumps`` options passed on)."""
    dumps.setdefault("indent", 2)
    return atomic_write(path, json.dumps(obj, **dumps) + "\n", overwrite=overwrite)


def remove_output(path: str | os.PathLike) -> None:
    """Remove a file or a link (never what a link points to); a missing file is fine."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise os_error(exc, p, "remove") from None
    if stat.S_ISDIR(st.st_mode):
        raise WriteError(f"cannot remove {p}: it is a folder")
    try:
        os.unlink(p)
    except OSError as exc:
        raise os_error(exc, p, "remove") from None


__all__ = [
    "atomic_write",
    "atomic_write_json",
    "check_target",
    "check_targets",
    "describe_os_error",
    "os_error",
    "remove_output",
    "safe_out_dir",
]
