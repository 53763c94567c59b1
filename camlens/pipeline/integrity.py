"""What keeps a result store honest: file checksums, no symbolic links, one writer at a time.

* **Checksums.** Every file the store reuses (table chunks, map chunks, the maps' ``zarr.json``,
  the merged table) is recorded as ``[size, sha256]``: the map files of a batch in its table chunk's
  Parquet metadata (written with the chunk, so the record commits with it), and every file in
  ``index.json`` at the end of a run. :func:`check_file` compares a file with its record; a rerun
  recomputes what does not match, a reader raises :class:`~camlens.base.errors.StoreError`.
* **No links.** :func:`find_links` walks the store's folders without following links; a link
  anywhere in them makes the run refuse (it would write outside ``--out``).
* **One writer.** :class:`StoreLock` is an ``O_EXCL`` lock file holding the holder's PID, host and
  process start time; a lock whose process is gone (same host) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from camlens.base.errors import StoreBusyError, StoreError
from camlens.base.fsio import os_error

#: the lock file, in the store's root
LOCK_FILE = ".lock"
_BLOCK = 1 << 20


def file_digest(path: str | os.PathLike) -> list[Any]:
    """``[size, sha256 hex]`` of a file, read without following a link (``O_NOFOLLOW``)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    size = 0
    try:
        while block := os.read(fd, _BLOCK):
            h.update(block)
            size += len(block)
    finally:
        os.close(fd)
    return [size, h.hexdigest()]


def check_file(path: Path, want: Any) -> str | None:
    """``None`` when ``path`` matches its record ``[size, sha256]``, else why not, in words."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "not a file"
    if not (isinstance(want, (list, tuple)) and len(want) == 2):
        return "without a valid record in the store's index"
    size, sha = want
    if st.st_size != size:
        return f"truncated or changed ({st.st_size} bytes, {size} written)"
    try:
        got = file_digest(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return None if got[1] == sha else "corrupt (its SHA-256 differs from the one recorded)"


def read_json_object(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object from ``path`` (``None`` when the file is absent); a file that is not one (not
    JSON, not UTF-8, a list, a link) raises :class:`StoreError` naming it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path} ({what}) is not a regular file (a link or a folder)")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} ({what}) is damaged: not valid JSON ({exc})") from None
    except OSError as exc:
        raise StoreError(f"{path} ({what}) cannot be read: {exc.strerror}") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path} ({what}) is damaged: it holds a JSON {type(obj).__name__}, not an object")
    return obj


def find_links(root: Path, names: tuple[str, ...]) -> list[Path]:
    """Symbolic links at ``root/NAME`` or anywhere below those folders (never followed)."""
    found: list[Path] = []
    stack = [root / n for n in names]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            found.append(p)
        elif stat.S_ISDIR(st.st_mode):
            with os.scandir(p) as it:
                for e in it:
                    if e.is_symlink():
                        found.append(Path(e.path))
                    elif e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
    return sorted(found)


def refuse_links(root: Path, names: tuple[str, ...]) -> None:
    """Raise :class:`StoreError` naming every link inside the store's folders."""
    links = find_links(root, names)
    if links:
        shown = ", ".join(f"{p} -> {os.readlink(p)}" for p in links[:5])
        more = f" (and {len(links) - 5} more)" if len(links) > 5 else ""
        raise StoreError(
            f"symbolic link(s) inside the result store: {shown}{more}; camlens never writes through a "
            "link in a store (it would write outside --out): remove the link(s) (or move the folder "
            "back in place) and run the same command again"
        )


# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    with contextlib.suppress(OSError):  # a zombie is dead
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    now = _start_time(pid)
    return started is None or now is None or now == started


class StoreLock:
    """``ROOT/.lock``: one writing run per store. ``acquire`` raises :class:`StoreBusyError` naming
    the holder while it lives; a lock left by a dead process on this host is removed and taken."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self.held = False

    def _record(self) -> bytes:
        pid = os.getpid()
        rec = {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid), "since": time.time()}
        return json.dumps(rec).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            obj = json.loads(os.read(fd, 4096).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        finally:
            os.close(fd)
        return obj if isinstance(obj, dict) else {}

    def acquire(self) -> None:
        for _ in range(3):
            tmp = self.path.with_name(f".lock.{os.getpid()}.tmp")
            try:
                tmp.write_bytes(self._record())
                os.link(tmp, self.path)  # atomic, with its content; fails on anything there (a link too)
                self.held = True
                return
            except FileExistsError:
                pass
            except FileNotFoundError:  # our temporary file removed by the holder's clean-up: again
                continue
            except OSError as exc:
                raise os_error(exc, self.path, "create the lock file") from None
            finally:
                tmp.unlink(missing_ok=True)
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            self._refuse_or_clear(holder)
        raise StoreBusyError(f"{self.path.parent}: cannot take the store's lock {self.path}; run again")

    def _refuse_or_clear(self, holder: dict[str, Any]) -> None:
        root = self.path.parent
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or not isinstance(host, str):
            raise StoreBusyError(
                f"{self.path} is not a camlens lock (damaged or planted); if no camlens run is writing "
                f"{root}, remove {self.path} and run the same command again"
            )
        if host == socket.gethostname() and not _alive(pid, holder.get("started")):
            self._take_over(holder)  # stale: its process is gone
            return
        since = holder.get("since")
        when = time.strftime(" since %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
        raise StoreBusyError(
            f"{root} is being written by another run (process {pid} on host {host}{when}); wait for it to "
            f"finish and run the same command again (if that process is gone, remove {self.path})"
        )

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a stale lock — that one only: it is renamed away first, and put back if another
        run replaced it meanwhile (two runs finding the same stale lock must not both proceed)."""
        grave = self.path.with_name(f".lock.stale.{os.getpid()}.tmp")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        try:
            fd = os.open(grave, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                got = json.loads(os.read(fd, 4096).decode("utf-8"))
            finally:
                os.close(fd)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            got = None
        if got != stale:  # a live lock taken meanwhile: give it back
            with contextlib.suppress(FileExistsError):
                os.link(grave, self.path)
        grave.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["LOCK_FILE", "StoreLock", "check_file", "file_digest", "find_links", "read_json_object", "refuse_links"]
