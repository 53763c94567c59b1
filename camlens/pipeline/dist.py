"""Many processes with ``torchrun``: rank, world size, sharding and exact reductions.

``torchrun --nproc-per-node=N -m camlens explain DATA --out DIR`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (and the rendezvous) in each process; :func:`setup` joins the process group
(``nccl`` when the model runs on CUDA, ``gloo`` on CPU) unless the caller already did. Without
those variables everything here is the single-process identity, so the same code runs alone.

Dataset-wide numbers are reduced with collectives, never by re-reading other ranks' files:
counts with an ``int64`` all-reduce (exact), float sums as exact rationals
(:class:`fractions.Fraction`, gathered and added in any order: the same result as one process).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world`` (``owned``: we initialized the group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a list of one alone)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_ints(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of an integer array (an ``int64`` all-reduce: exact)."""
        arr = np.asarray(values, dtype=np.int64)
        if not self.active:
            return arr
        t = torch.from_numpy(arr.copy()).to(self._device())
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.cpu().numpy()

    def sum_exact(self, value: Fraction) -> Fraction:
        """Sum over ranks of an exact rational (gathered as integer pairs, added exactly)."""
        if not self.active:
            return value
        parts = self.gather((value.numerator, value.denominator))
        return sum((Fraction(n, d) for n, d in parts), Fraction(0))

    def close(self) -> None:
        """Leave the group we joined. Every rank first waits at a barrier: a rank that tore gloo
        down while its peer still had a collective in flight made the peer abort (``terminate
        called without an active exception``, SIGABRT) about one run in three. No barrier while an
        exception is propagating (``close`` is called from ``finally``): the other ranks may be in
        another collective, and torchrun stops them anyway."""
        if self.owned and tdist.is_initialized():
            try:
                if sys.exc_info()[0] is None:
                    tdist.barrier()
            finally:
                tdist.destroy_process_group()
                self.owned = False


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with ``WORLD_SIZE > 1``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str | torch.device | None) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher."""
    d = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return d


def setup(device: str | torch.device | None = None) -> DistContext:
    """Join (or reuse) the process group; ``nccl`` for a CUDA device, ``gloo`` otherwise."""
    if tdist.is_available() and tdist.is_initialized():
        return DistContext(
            tdist.get_rank(),
            tdist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", "0")),
            tdist.get_backend(),
            owned=False,
        )
    if not launched():
        return DistContext()
    dev = torch.device(local_device(device))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tdist.init_process_group(backend)
    return DistContext(
        tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend, owned=True
    )


def shard(todo: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous block of ``todo`` (sizes differ by at most one; no padding, so
    every index is in exactly one shard)."""
    n = len(todo)
    lo, hi = n * rank // world, n * (rank + 1) // world
    return todo[lo:hi]


def exact(value: float) -> Fraction:
    """A float as the exact rational it is (NaN/inf refused by Fraction: callers skip them)."""
    return Fraction(float(value))


__all__ = ["DistContext", "exact", "launched", "local_device", "setup", "shard"]
