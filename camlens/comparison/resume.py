"""A comparison that an interruption does not lose: the maps go through the pipeline's result store,
the metric values of every finished (method, stage) are kept, and the same call continues.

Layout of ``OUT/`` (the ``out=`` / ``--out`` folder)::

    compare.json          the comparison's signature (what decides the numbers: sample, targets,
                          model checksum, settings, seed) and what each run reused
    maps/<method>/        one result store per method (camlens.pipeline.store: Parquet table chunks
                          + Zarr maps, one chunk per batch, checked on reuse); ``open_results`` reads it
    values/<method>.<stage>.npz   the per-image values of one finished stage (faithfulness,
                          localization, sanity, robustness…), written atomically
    values/<method>.cost-<first image>.npz   seconds and peak MiB of one batch of maps (written
                          before the batch's table chunk, which is the commit)
    table.parquet, table.csv, report.html   the outputs

A rerun with the same signature reuses every committed batch of maps and every finished stage and
computes the rest, with the same batches: the table is bit-equal to an uninterrupted run (the cost
rows keep the timings of the run that computed each batch). Another signature is refused with
:class:`~camlens.pipeline.store.StoreMismatchError` naming what differs, unless ``overwrite`` (then
the folder's comparison files are removed first). Methods are not part of the signature: a rerun
with more methods reuses the ones already done.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camlens._version import versions
from camlens.api.explanation import Explanation
from camlens.base.errors import StoreError
from camlens.base.fsio import atomic_write, safe_out_dir
from camlens.base.localization import DEFAULT_THRESHOLD
from camlens.comparison.measure import PeakMemory
from camlens.pipeline.integrity import StoreLock, read_json_object
from camlens.pipeline.run import BatchResult, StoreSink
from camlens.pipeline.sources import Batch
from camlens.pipeline.store import ResultStore, StoreMismatchError, open_results

COMPARE_FILE = "compare.json"
MAPS_DIR = "maps"
VALUES_DIR = "values"
OUTPUTS = ("table.parquet", "table.csv", "report.html")
ENTRIES = (COMPARE_FILE, MAPS_DIR, VALUES_DIR, *OUTPUTS)

Values = dict[str, np.ndarray]


def tensor_digest(*parts: Any) -> str:
    """SHA-256 over tensors / arrays (dtype, shape and bytes) and JSON-able values, in order."""
    h = hashlib.sha256()
    _digest_into(h, parts)
    return h.hexdigest()


def _digest_into(h: Any, parts: Any) -> None:
    # Arrays inside lists (per-image boxes) are hashed by their bytes too, never by ``repr``: numpy's
    # repr follows the process's print options, so another test or a user's notebook changed the hash.
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().contiguous().numpy()
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype}|{a.shape}|".encode())
            h.update(a.tobytes())
        elif isinstance(p, (list, tuple)) and any(isinstance(q, (np.ndarray, torch.Tensor, list, tuple)) for q in p):
            h.update(f"[{len(p)}|".encode())
            _digest_into(h, p)
            h.update(b"]")
        else:
            h.update(json.dumps(p, sort_keys=True, default=repr).encode())
        h.update(b"\n")


@dataclass
class MapsRun:
    """What :meth:`CompareStore.maps` returns: the ``(N, H, W)`` maps, the seconds and peak MiB of
    every batch, and how many images were reused from the store."""

    maps: torch.Tensor
    seconds: list[float]
    peaks: list[float]
    reused: int = 0


@dataclass
class MapsPlan:
    """A method's maps to make: ``n`` images in ``batches``, their ``names`` and input ``size``."""

    method: str
    n: int
    batches: list[slice]
    names: list[str]
    size: tuple[int, int]
    device: torch.device


@dataclass
class Reuse:
    """What a run found done: ``{method: images of maps reused}`` and ``{method: [stages reused]}``."""

    maps: dict[str, int] = field(default_factory=dict)
    stages: dict[str, list[str]] = field(default_factory=dict)

    def words(self, n: int) -> str:
        """In words, for the report and the terminal (empty when nothing was reused)."""
        parts = [f"{m}: maps of {k}/{n} images" for m, k in self.maps.items() if k]
        parts += [f"{m}: {', '.join(s)}" for m, s in self.stages.items() if s]
        return "; ".join(parts)


class MemoryStore:
    """No output folder: every stage and every batch is computed (the interface of :class:`CompareStore`)."""

    def __init__(self) -> None:
        self.reuse = Reuse()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def stage(self, method: str, stage: str, compute: Callable[[], Values]) -> Values:
        return compute()

    def maps(self, plan: MapsPlan, run_batch: Callable[[slice], Explanation]) -> MapsRun:
        out, secs, peaks = [], [], []
        for sl in plan.batches:
            exp, dt, peak = _timed(run_batch, sl, plan.device)
            out.append(exp.maps[:, 0].detach().float().cpu())
            secs.append(dt)
            peaks.append(peak)
        return MapsRun(torch.cat(out), secs, peaks)


def _timed(
    run_batch: Callable[[slice], Explanation], sl: slice, device: torch.device
) -> tuple[Explanation, float, float]:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        exp = run_batch(sl)
        dt = time.perf_counter() - t0
    return exp, dt, mem.peak_mib


def _npz(values: Values) -> bytes:
    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in values.items()}
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


class CompareStore:
    """The comparison's folder ``root`` (see the module docstring); a context manager holding the
    folder's lock. ``signature``: what decides the numbers; ``note``: where notes go."""

    def __init__(
        self, root: str | Path, signature: dict[str, Any], *, overwrite: bool, note: Callable[[str], None]
    ) -> None:
        self.root = Path(root)
        self.signature = json.loads(json.dumps(signature, default=repr))  # as it reads back
        self.overwrite = overwrite
        self.note = note
        self.reuse = Reuse()
        self._lock = StoreLock(self.root)

    # --- open / close ---------------------------------------------------------------------------
    def __enter__(self) -> CompareStore:
        safe_out_dir(self.root)
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def _open(self) -> None:
        path = self.root / COMPARE_FILE
        if self.overwrite:
            self._wipe()
            old = None
        else:
            try:
                old = read_json_object(path, "the comparison record")
            except StoreError as exc:
                raise StoreMismatchError(f"{exc}; pass --overwrite (overwrite=True) to start again") from None
            if old is None:
                clash = [e for e in ENTRIES if (self.root / e).exists() or (self.root / e).is_symlink()]
                if clash:
                    raise StoreMismatchError(
                        f"{self.root / clash[0]} exists but {path} does not (not a camlens compare folder, or one "
                        "of an older camlens); pass --overwrite (overwrite=True) to replace it, or choose another --out"
                    )
            elif old.get("signature") != self.signature:
                differ = "; ".join(self._diff(old.get("signature")))
                raise StoreMismatchError(
                    f"{self.root} holds a comparison with other settings ({differ}); "
                    "pass --overwrite (overwrite=True) to replace it, or choose another --out folder"
                )
        this = {"versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        runs = [*((old or {}).get("runs") or []), this]
        self._write_record(runs)

    def _diff(self, old: Any) -> list[str]:
        old = old if isinstance(old, dict) else {}
        keys = sorted(set(old) | set(self.signature))
        new = self.signature
        return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]

    def _write_record(self, runs: list[Any]) -> None:
        reused = {"maps": self.reuse.maps, "stages": self.reuse.stages}
        rec = {"signature": self.signature, "runs": runs, "reused": reused}
        atomic_write(self.root / COMPARE_FILE, json.dumps(rec, indent=2, sort_keys=True) + "\n", overwrite=True)

    def _wipe(self) -> None:
        for e in ENTRIES:
            p = self.root / e
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)  # removes links inside, never follows them

    def record_reuse(self) -> None:
        """Write what this run reused into ``compare.json`` (the last run's entry)."""
        old = read_json_object(self.root / COMPARE_FILE, "the comparison record") or {}
        self._write_record(list(old.get("runs") or []))

    # --- stages ---------------------------------------------------------------------------------
    def _values_path(self, method: str, stage: str) -> Path:
        return self.root / VALUES_DIR / f"{method}.{stage}.npz"

    def _load(self, path: Path) -> Values | None:
        if path.is_symlink() or not path.is_file():
            return None
        try:
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as exc:  # edited or damaged: computed again
            self.note(f"note: {path} is not readable ({type(exc).__name__}); computing it again")
            return None

    def _save(self, path: Path, values: Values) -> None:
        safe_out_dir(path.parent)
        atomic_write(path, _npz(values), overwrite=True, fsync=False)

    def stage(self, method: str, stage: str, compute: Callable[[], Values]) -> Values:
        """The values of ``method``'s ``stage``: read back when a run finished it, else computed and kept."""
        path = self._values_path(method, stage)
        got = self._load(path)
        if got is not None:
            self.reuse.stages.setdefault(method, []).append(stage)
            return got
        values = compute()
        self._save(path, values)
        return values

    # --- maps -----------------------------------------------------------------------------------
    def maps(self, plan: MapsPlan, run_batch: Callable[[slice], Explanation]) -> MapsRun:
        """``plan.method``'s maps, batch by batch through its result store ``maps/<method>``: a batch
        whose table chunk is committed (and checked) is read back, the others computed and written."""
        root = self.root / MAPS_DIR / plan.method
        safe_out_dir(root)
        sig = {**self.signature, "n_images": plan.n, "methods": [plan.method]}
        info = {"versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "compare": True}
        store = ResultStore(root, sig, info, note=self.note)
        store.prepare(overwrite=False)
        done = store.check().done
        sink = StoreSink(store, plan.n, DEFAULT_THRESHOLD)
        secs, peaks, reused = [], [], 0
        for sl in plan.batches:
            cost_path = self._values_path(plan.method, f"cost-{sl.start:09d}")
            cost = self._load(cost_path)
            if cost is not None and set(range(sl.start, sl.stop)) <= done:
                secs.append(float(cost["seconds"]))
                peaks.append(float(cost["peak_mib"]))
                reused += sl.stop - sl.start
                continue
            exp, dt, peak = _timed(run_batch, sl, plan.device)
            self._save(cost_path, {"seconds": np.array(dt), "peak_mib": np.array(peak)})
            sink.write(BatchResult(self._batch(plan, sl), {plan.method: _on_cpu(exp)}))  # the commit
            secs.append(dt)
            peaks.append(peak)
        store.finalize(plan.n, [], complete=True)
        self.reuse.maps[plan.method] = reused
        stored = np.asarray(open_results(root).maps(plan.method)[:])  # (N, 1, H, W), checked
        return MapsRun(torch.from_numpy(np.ascontiguousarray(stored[:, 0])), secs, peaks, reused)

    @staticmethod
    def _batch(plan: MapsPlan, sl: slice) -> Batch:
        ids = list(range(sl.start, sl.stop))
        names = [plan.names[i] for i in ids]
        return Batch(None, ids, names, names, [plan.size] * len(ids), [None] * len(ids), [None] * len(ids), None)


def _on_cpu(exp: Explanation) -> Explanation:
    """The batch's explanation with float32 CPU maps (what the store writes); the caller's is untouched."""
    return replace(
        exp,
        maps=exp.maps.detach().float().cpu(),
        raw=exp.raw.detach()[:, :0].cpu(),
        classes=exp.classes.cpu(),
        scores=exp.scores.detach().float().cpu(),
        probs=exp.probs.detach().float().cpu(),
        logits=None,
        images=None,
        sources=None,
    )


__all__ = ["COMPARE_FILE", "CompareStore", "MapsPlan", "MapsRun", "MemoryStore", "Reuse", "tensor_digest"]
