"""Progress with an ETA across the whole comparison, and the peak memory a method adds."""

from __future__ import annotations

import os
import threading
from types import TracebackType

import torch
from tqdm.auto import tqdm


class Progress:
    """One bar over every (method, stage) of the run: tqdm's ETA covers the whole comparison."""

    def __init__(self, total: int, enabled: bool = True, per_method: int = 1) -> None:
        self.per_method = per_method
        self._bar = tqdm(total=total, desc="compare", unit="step", disable=not enabled, dynamic_ncols=True)
        self._open = False

    def stage(self, method: str, what: str) -> None:
        """Mark the previous stage done and show ``method: what`` as the current one."""
        if self._open:
            self._bar.update(1)
        self._open = True
        self._bar.set_postfix_str(f"{method}: {what}", refresh=False)

    def skip(self, method: str) -> None:
        """A method dropped: its remaining stages leave the total."""
        self._bar.total = max(self._bar.n, (self._bar.total or 0) - (self.per_method - 1))
        self._bar.refresh()

    def close(self) -> None:
        if self._open:
            self._bar.update(1)
        self._bar.close()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory added inside the block, in MiB: ``torch.cuda.max_memory_allocated`` on a GPU, else
    the resident set size sampled every 2 ms (Linux ``/proc``; NaN where it cannot be read)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        base = _rss_bytes()
        if base is not None:
            self._base, self._peak = base, base
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            now = _rss_bytes() or 0
            self._peak = max(self._peak, now)

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes() or 0)
            self.peak_mib = max(0, self._peak - self._base) / 2**20
