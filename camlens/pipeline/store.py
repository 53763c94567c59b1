"""The result store of a dataset run: a Parquet table and Zarr maps, resumable and shared by ranks.

Layout of ``OUT/``::

    run.json             the run's signature (arguments that decide the results, model checksum)
                         and information (camlens/torch/pyarrow/zarr versions, world size, time)
    chunks/part-*.parquet  one file per written batch: one row per image x target x method,
                         written atomically (temporary name, then rename); the set of their
                         ``image_id`` values is the record of what is done
    maps.zarr/<method>   float32 (or float16) array ``(N, K, H, W)``, one Zarr chunk per image, so
                         ranks never write the same chunk; row ``(image_id, rank)`` of the table
                         is ``maps[method][image_id, rank - 1]``
    results.parquet      the merged table (rank 0, at the end), index.json its summary
                         (images done, failed files with their messages, chunk list)

A batch's maps are written before its table chunk, and the table chunk is the commit: a run
killed at any point leaves only whole chunks, and images without a table row are simply done
again on the next run (rewriting their map chunks with the same values).

Table columns: ``image_id, source, name, label, height, width, method, layer, model, rank,
class_id, class_name, score, prob, x0, y0, x1, y1`` (box in image pixels at the run's threshold,
``x1``/``y1`` exclusive, ``-1`` = no box). Why Parquet + Zarr: both are read by pandas, polars,
DuckDB, xarray and dask without camlens; a column store keeps the table small and fast to filter,
and chunked maps give random access to any one map without loading the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CamlensError, InputError, OutputExistsError
from ..fsio import atomic_write, check_target

RUN_FILE = "run.json"
INDEX_FILE = "index.json"
RESULTS_FILE = "results.parquet"
CHUNKS_DIR = "chunks"
MAPS_DIR = "maps.zarr"
FIGURES_DIR = "figures"
STORE_ENTRIES = (RUN_FILE, INDEX_FILE, RESULTS_FILE, CHUNKS_DIR, MAPS_DIR, FIGURES_DIR)

COLUMNS = (
    "image_id",
    "source",
    "name",
    "label",
    "height",
    "width",
    "method",
    "layer",
    "model",
    "rank",
    "class_id",
    "class_name",
    "score",
    "prob",
    "x0",
    "y0",
    "x1",
    "y1",
)


class StoreMismatchError(OutputExistsError):
    """A store written by a run with other arguments (pass overwrite=True / --overwrite)."""


def _pa():
    import pyarrow as pa  # optional heavy dependency (the "store" extra)
    import pyarrow.parquet as pq

    return pa, pq


def _zarr():
    import zarr  # optional heavy dependency (the "store" extra)

    return zarr


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically with :func:`camlens.fsio.atomic_write` (a temporary file
    in the same folder, then a rename): a reader sees the old file or the new one, never half of one,
    and a symbolic link planted at ``path`` is replaced, never followed. Chunks skip ``fsync`` (bulk
    writes: atomic, not durable through a power loss); the run record and the index keep it."""
    atomic_write(path, data, overwrite=True, fsync=fsync)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), fsync=True)


def _table_bytes(table) -> bytes:
    pa, pq = _pa()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def schema():
    pa, _ = _pa()
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("source", pa.string()),
            ("name", pa.string()),
            ("label", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("method", pa.string()),
            ("layer", pa.string()),
            ("model", pa.string()),
            ("rank", pa.int32()),
            ("class_id", pa.int64()),
            ("class_name", pa.string()),
            ("score", pa.float32()),
            ("prob", pa.float32()),
            ("x0", pa.int32()),
            ("y0", pa.int32()),
            ("x1", pa.int32()),
            ("y1", pa.int32()),
        ]
    )


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k)]


class ResultStore:
    """One run's view of ``OUT``: create or check it, write chunks, merge the index.

    ``signature``: what decides the results (sources digest, methods, targets, layer, model
    checksum, threshold, map dtype…). A store with another signature is refused unless
    ``overwrite``; with the same one, the run resumes.
    """

    def __init__(
        self, root: str | os.PathLike, signature: dict[str, Any], info: dict[str, Any], *, map_dtype: str = "float32"
    ):
        if map_dtype not in ("float32", "float16"):
            raise InputError(f"map dtype must be 'float32' or 'float16', not {map_dtype!r}")
        self.root = Path(root)
        self.signature = signature
        self.info = info
        self.map_dtype = map_dtype
        self._arrays: dict[str, Any] = {}

    # --- set-up (rank 0), then every rank reads what is done ---------------------------------
    def prepare(self, overwrite: bool) -> None:
        """Rank 0: refuse a foreign or mismatching store, wipe it with ``overwrite``, record the run."""
        run = self.root / RUN_FILE
        if run.exists() and not overwrite:
            try:
                old = json.loads(run.read_text())["signature"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                raise StoreMismatchError(
                    f"{run} is not a camlens run record; pass --overwrite or use another --out"
                ) from None
            if old != self.signature:
                diff = "; ".join(_diff(old, self.signature))
                raise StoreMismatchError(
                    f"{self.root} holds a run with other arguments ({diff}); pass --overwrite "
                    "(overwrite=True) to replace it, or choose another --out folder"
                )
        elif not run.exists() and not overwrite:
            clash = [e for e in STORE_ENTRIES if os.path.lexists(self.root / e)]  # a dangling link too
            if clash:
                raise StoreMismatchError(
                    f"{self.root / clash[0]} exists but {run} does not; pass --overwrite to replace it"
                )
        if overwrite:
            for e in STORE_ENTRIES:
                p = self.root / e
                if p.is_symlink() or p.is_file():
                    p.unlink()
                elif p.is_dir():
                    shutil.rmtree(p)
        (self.root / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (self.root / CHUNKS_DIR).glob(".part-*.tmp"):  # a killed writer's temporary file
            stale.unlink(missing_ok=True)
        prev = json.loads(run.read_text()).get("info", {}) if run.exists() else {}
        runs = [*prev.get("runs", []), self.info]
        atomic_write_json(run, {"signature": self.signature, "info": {**self.info, "runs": runs}})

    def chunk_files(self) -> list[Path]:
        d = self.root / CHUNKS_DIR
        return sorted(d.glob("part-*.parquet")) if d.is_dir() else []

    def done(self) -> set[int]:
        """Image ids with a committed table chunk."""
        _, pq = _pa()
        out: set[int] = set()
        for f in self.chunk_files():
            out.update(int(v) for v in pq.read_table(f, columns=["image_id"]).column(0).to_pylist())
        return out

    # --- writing ------------------------------------------------------------------------------
    def _array(self, method: str, n: int, shape: tuple[int, ...]):
        arr = self._arrays.get(method)
        if arr is not None:
            return arr
        zarr = _zarr()
        path = self.root / MAPS_DIR / method
        full = (n, *shape)
        try:
            arr = zarr.open_array(str(path), mode="r+")
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            # several ranks may get here at once: never overwrite (another rank may already have
            # written chunks); the metadata they write is identical and written atomically
            try:
                arr = zarr.create_array(
                    store=str(path),
                    shape=full,
                    chunks=(1, *shape),
                    dtype=self.map_dtype,
                    fill_value=float("nan"),
                    overwrite=False,
                )
            except zarr.errors.ContainsArrayError:
                arr = zarr.open_array(str(path), mode="r+")
        if tuple(arr.shape) != full:
            raise StoreMismatchError(
                f"{path} holds maps of shape {tuple(arr.shape)}, this run makes {full}; pass --overwrite"
            )
        self._arrays[method] = arr
        return arr

    def write(
        self, n_images: int, ids: Sequence[int], rows: dict[str, list], maps: dict[str, np.ndarray], rank: int
    ) -> Path:
        """Maps first (one Zarr chunk per image), then the table chunk (atomic): the commit."""
        pa, _ = _pa()
        idx = np.asarray(ids, dtype=np.int64)
        for method, m in maps.items():
            arr = self._array(method, n_images, tuple(m.shape[1:]))
            arr.set_orthogonal_selection((idx,), m.astype(self.map_dtype, copy=False))
        table = pa.Table.from_pydict({c: rows[c] for c in COLUMNS}, schema=schema())
        path = self.root / CHUNKS_DIR / f"part-{int(idx.min()):09d}-{int(idx.max()):09d}-r{rank:04d}.parquet"
        atomic_write_bytes(path, _table_bytes(table))
        return path

    # --- the merged index (rank 0) ---------------------------------------------------------------
    def finalize(
        self, n_images: int, failed: list[dict[str, Any]], complete: bool, timing: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Merge the chunks into ``results.parquet`` (streamed chunk by chunk, so memory stays at
        one chunk) and write ``index.json``."""
        _, pq = _pa()
        files = self.chunk_files()
        tmp = self.root / f".{RESULTS_FILE}.{os.getpid()}.tmp"
        rows = 0
        ids: set[int] = set()
        try:
            with pq.ParquetWriter(tmp, schema(), compression="zstd") as w:
                for f in files:
                    t = pq.read_table(f, schema=schema())
                    t = t.sort_by([("image_id", "ascending"), ("method", "ascending"), ("rank", "ascending")])
                    ids.update(t.column("image_id").to_pylist())
                    rows += t.num_rows
                    w.write_table(t)
            check_target(self.root / RESULTS_FILE, overwrite=True)  # a folder in the way is refused
            os.replace(tmp, self.root / RESULTS_FILE)  # replaces a link at the name, never follows it
        finally:
            tmp.unlink(missing_ok=True)
        index = {
            "complete": complete,
            "n_images": n_images,
            "n_done": len(ids),
            "n_rows": rows,
            "failed": failed,
            "chunks": [f.name for f in files],
            "last_run": timing or {},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(self.root / INDEX_FILE, index)
        return index


class Results:
    """A store opened for reading: ``table`` (a pandas DataFrame, one row per image x target x
    method), ``run`` (the run record), ``failed`` (files that could not be read) and lazy maps."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        run = self.root / RUN_FILE
        if not run.exists():
            raise InputError(
                f"{self.root} is not a camlens result store (no {RUN_FILE}); run `camlens explain DATA --out DIR`"
            )
        self.run = json.loads(run.read_text())
        ip = self.root / INDEX_FILE
        self.index: dict[str, Any] = json.loads(ip.read_text()) if ip.exists() else {"complete": False, "failed": []}
        self._table = None

    @property
    def complete(self) -> bool:
        return bool(self.index.get("complete"))

    @property
    def failed(self) -> list[dict[str, Any]]:
        return list(self.index.get("failed", []))

    @property
    def table(self):
        """The rows sorted by ``image_id, method, rank`` (read on first use; an interrupted run's
        committed chunks when the merged file is missing or older than the chunks)."""
        if self._table is None:
            _, pq = _pa()
            res = self.root / RESULTS_FILE
            chunks = sorted((self.root / CHUNKS_DIR).glob("part-*.parquet"))
            fresh = res.exists() and self.index.get("chunks") == [c.name for c in chunks]
            if fresh:
                t = pq.read_table(res, schema=schema())
            elif chunks:
                _pa_mod, _ = _pa()
                t = _pa_mod.concat_tables([pq.read_table(c, schema=schema()) for c in chunks])
            else:
                t = schema().empty_table()
            df = t.to_pandas()
            self._table = df.sort_values(["image_id", "method", "rank"], kind="stable").reset_index(drop=True)
        return self._table

    def maps(self, method: str):
        """The Zarr array ``(N, K, H, W)`` of ``method`` (lazy: slicing reads only those chunks)."""
        p = self.root / MAPS_DIR / method
        if not p.exists():
            have = sorted(d.name for d in (self.root / MAPS_DIR).iterdir()) if (self.root / MAPS_DIR).exists() else []
            raise InputError(f"no maps for method {method!r} in {self.root}; stored: {', '.join(have) or 'none'}")
        return _zarr().open_array(str(p), mode="r")

    def map(self, row: Any) -> np.ndarray:
        """The ``(H, W)`` map of one table row (a row position, or a row of :attr:`table`)."""
        r = self.table.iloc[row] if isinstance(row, (int, np.integer)) else row
        return np.asarray(self.maps(str(r["method"]))[int(r["image_id"]), int(r["rank"]) - 1])

    def explanations(self, image: int) -> dict[str, Any]:
        """``{method: Explanation}`` of one image (its ``image_id``) rebuilt from the store, for figures
        and :meth:`~camlens.Explanation.save` (:func:`camlens.pipeline.figures.stored_explanations`)."""
        from .figures import stored_explanations  # lazy: torch and matplotlib only when a figure is asked for

        return stored_explanations(self, image)

    def figure(self, image: int, method: str | None = None, **kwargs: Any):
        """The overlays of one image (its ``image_id``) as ``camlens.explain`` draws them: one method's
        figure, or the montage of methods x classes when several are stored and none is named."""
        from .figures import stored_figure  # lazy: torch and matplotlib only when a figure is asked for

        return stored_figure(self, image, method, **kwargs)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        sig = self.run.get("signature", {})
        return (
            f"Results({str(self.root)!r}, rows={len(self)}, methods={sig.get('methods')}, "
            f"complete={self.complete}, failed={len(self.failed)})"
        )


def open_results(directory: str | os.PathLike) -> Results:
    """Open a result store written by :func:`camlens.explain_dataset` or ``camlens explain DATA``.

    ``res.table`` is a pandas DataFrame (one row per image x target x method); ``res.map(i)`` reads
    the map of row ``i`` and ``res.maps("gradcam")[a:b]`` a slice of maps, lazily from Zarr.
    """
    try:
        return Results(directory)
    except (OSError, json.JSONDecodeError) as exc:
        raise CamlensError(f"{directory}: cannot open the result store ({exc})") from None


__all__ = [
    "COLUMNS",
    "ResultStore",
    "Results",
    "StoreMismatchError",
    "atomic_write_bytes",
    "open_results",
]
