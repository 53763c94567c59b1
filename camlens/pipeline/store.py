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
                         (images done, failed files with their messages, chunk list, and the
                         ``[size, sha256]`` of every file: table chunks, map chunks, zarr.json)
    .lock                the writing run's PID and host (one writer per store; ranks share it)

A batch's maps are written before its table chunk, and the table chunk is the commit: it carries
the ``[size, sha256]`` of the map chunks it covers in its Parquet metadata. A run killed at any
point leaves only whole chunks, and images without a table row are simply done again on the next
run (rewriting their map chunks with the same values). A rerun verifies every file it reuses
(:meth:`ResultStore.check`) and recomputes the images of whatever is missing, truncated or corrupt;
:func:`open_results` raises :class:`~camlens.base.errors.StoreError` on a damaged file instead of
returning NaN maps. No symbolic link inside the store is ever followed.

Table columns: ``image_id, source, name, label, height, width, method, layer, model, rank,
class_id, class_name, score, prob, x0, y0, x1, y1`` (box in image pixels at the run's threshold,
``x1``/``y1`` exclusive, ``-1`` = no box). A detector's store (its run signature has
``"detections"``) has one row per image x detection x method and five more columns
(:data:`DETECTION_COLUMNS`): ``detection`` (the detection's index in the model's own output,
``-1`` for a given box), ``det_x0, det_y0, det_x1, det_y1`` (the detection's box in the image's
pixels, float) and ``skipped`` (why an image has no map: no detection above the threshold; one
row per method with ``rank`` 0 and NaN box, never a zero map). Its maps are ``(N, K, H, W)``
with ``K`` the most detections explained per image and ``(H, W)`` the largest image's size: image
``i``'s map of rank ``r`` is ``maps[method][i, r - 1, :height, :width]`` (NaN elsewhere).

Why Parquet + Zarr: both are read by pandas, polars,
DuckDB, xarray and dask without camlens; a column store keeps the table small and fast to filter,
and chunked maps give random access to any one map without loading the rest.

**Volumes and clips** (a run over NIfTI scans, DICOM series, video files or ``(C, D, H, W)``
tensors; :mod:`camlens.pipeline.volumes`): ``maps.zarr/<method>`` is ``(N, K, D, H, W)``, one Zarr
chunk per volume, or per slab of whole ``D`` slices when a volume's ``K`` maps exceed
:data:`MAX_CHUNK_BYTES` (64 MiB: a chunk is read whole, and a slab keeps one read of a 512³ CT
bounded); scans of different shapes are stored padded with NaN to the largest (``Results.map``
crops them back). The table has :data:`VOLUME_COLUMNS`: ``depth`` besides ``height, width``, boxes
``x0, y0, z0, x1, y1, z1`` in voxels (a clip's ``x, y`` in the video's own pixels, ``z`` its kept
frames), the box in world millimetres ``world_x0 … world_z1`` (NaN without an affine), the scan's
``spacing`` (mm along the file's ``i, j, k``) and ``affine`` (16 numbers, row-major), and a clip's
``timestamps`` (seconds of its kept frames).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camlens.base.errors import CamlensError, InputError, OutputExistsError, StoreError
from camlens.base.fsio import atomic_write, check_target, os_error
from camlens.pipeline.integrity import check_file, file_digest, read_json_object, refuse_links

RUN_FILE = "run.json"
INDEX_FILE = "index.json"
RESULTS_FILE = "results.parquet"
CHUNKS_DIR = "chunks"
MAPS_DIR = "maps.zarr"
FIGURES_DIR = "figures"
STORE_ENTRIES = (RUN_FILE, INDEX_FILE, RESULTS_FILE, CHUNKS_DIR, MAPS_DIR, FIGURES_DIR)
STORE_FOLDERS = (CHUNKS_DIR, MAPS_DIR, FIGURES_DIR)
#: a table chunk's name: the first and last image id of its batch, and the writing rank
CHUNK_NAME = re.compile(r"part-(\d{9})-(\d{9})-r(\d{4})\.parquet")
#: Parquet metadata keys of a table chunk: its map files ``{path: [size, sha256]}``, the run signature
META_FILES, META_SIGNATURE = b"camlens.files", b"camlens.signature"
#: how the batch's figures were drawn: ``{method: {"signed": bool}}`` (figures redrawn from the store)
META_RENDER = b"camlens.render"
#: temporary files of killed writers (fsio's ``.NAME.XXXX.tmp``, the merge's, Zarr's ``.partial``)
_TEMP = re.compile(r"\.(part-.*|results\.parquet\..*|index\.json\..*|run\.json\..*|lock\..*)\.tmp")

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
#: the table of a volume or clip run (see the module docstring)
VOLUME_COLUMNS = (
    *COLUMNS[:4],
    "depth",
    *COLUMNS[4:14],
    "x0",
    "y0",
    "z0",
    "x1",
    "y1",
    "z1",
    "world_x0",
    "world_y0",
    "world_z0",
    "world_x1",
    "world_y1",
    "world_z1",
    "spacing",
    "affine",
    "timestamps",
)
#: the largest map chunk of one volume (uncompressed bytes); larger volumes are chunked in slabs along D
MAX_CHUNK_BYTES = 64 * 2**20


def map_chunks(shape: Sequence[int], itemsize: int, limit: int | None = None) -> tuple[int, ...]:
    """The Zarr chunk of an array of maps ``(N, K, *spatial)``: one image, or for a volume ``(N, K,
    D, H, W)`` larger than ``limit`` (default :data:`MAX_CHUNK_BYTES`) a slab of whole ``D`` slices."""
    limit = MAX_CHUNK_BYTES if limit is None else limit
    one = (1, *(int(s) for s in shape[1:]))
    if len(shape) != 5 or int(np.prod(one)) * itemsize <= limit:
        return one
    per_slice = int(np.prod(one[3:])) * one[1] * itemsize
    return (1, one[1], max(1, min(one[2], limit // per_slice)), *one[3:])


def image_chunk_keys(array: Any, i: int) -> list[str]:
    """The store-relative keys (below the array) of every chunk of image ``i``, in grid order."""
    grid = [-(-int(s) // int(c)) for s, c in zip(array.shape[1:], array.chunks[1:], strict=True)]
    return [array.metadata.encode_chunk_key((i, *rest)) for rest in np.ndindex(*grid)]


#: the columns a detector's store adds (see the module docstring)
DETECTION_COLUMNS = ("detection", "det_x0", "det_y0", "det_x1", "det_y1", "skipped")


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
    """Write ``data`` to ``path`` atomically with :func:`camlens.base.fsio.atomic_write` (a temporary file
    in the same folder, then a rename): a reader sees the old file or the new one, never half of one,
    and a symbolic link planted at ``path`` is replaced, never followed. Chunks skip ``fsync`` (bulk
    writes: atomic, not durable through a power loss); the run record and the index keep it."""
    atomic_write(path, data, overwrite=True, fsync=fsync)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), fsync=True)


def _table_bytes(table) -> bytes:
    pa, pq = _pa()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def _parquet_writer(path: Path, sch: Any) -> Any:
    _, pq = _pa()
    return pq.ParquetWriter(path, sch, compression="zstd", write_page_checksum=True)


def read_chunk(path: Path) -> tuple[Any, dict[str, Any], Any]:
    """A table chunk read whole, its pages' CRCs verified -> ``(table, map file records, signature)``;
    raises on anything that is not such a chunk (truncated, garbage, another schema)."""
    pa, pq = _pa()
    data = path.read_bytes()
    f = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    table = f.read()
    known_schema(table.schema)
    meta = f.schema_arrow.metadata or {}
    files = json.loads(meta[META_FILES]) if META_FILES in meta else {}
    sig = json.loads(meta[META_SIGNATURE]) if META_SIGNATURE in meta else None
    if not isinstance(files, dict):
        raise ValueError("its map records are not an object")
    return table.replace_schema_metadata(None), files, sig


def scan_chunks(
    chunks: list[Path], index: dict[str, Any], recorded: dict[str, Any]
) -> tuple[dict[str, str], list[tuple[Path, str, Any, dict[str, Any]]]]:
    """Every table chunk checked (its recorded size and SHA-256, then read whole with its pages'
    CRCs): ``(problems, readable)``. ``problems`` maps a store-relative chunk path to what is wrong
    with it (``"missing"``: listed in ``index`` but gone); ``readable`` holds
    ``(path, relative path, table, map file records)`` of the others. Used by the writer's check
    and the reader alike."""
    problems: dict[str, str] = {}
    names = {c.name for c in chunks}
    listed = index.get("chunks")
    for name in listed if isinstance(listed, list) else []:
        if isinstance(name, str) and name not in names:
            problems[f"{CHUNKS_DIR}/{name}"] = "missing"
    readable = []
    for c in chunks:
        rel = f"{CHUNKS_DIR}/{c.name}"
        why = check_file(c, recorded[rel]) if rel in recorded else None
        if why is None:
            try:
                table, files, _ = read_chunk(c)
                readable.append((c, rel, table, files))
                continue
            except Exception as exc:
                why = f"not a readable table chunk ({type(exc).__name__})"
        problems[rel] = why
    return problems, readable


def chunk_entries(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """``(table chunks, stray files, temporary files)`` in ``root/chunks``, by name only (nothing
    parsed; a link at a chunk's name is a stray, never read)."""
    d = root / CHUNKS_DIR
    chunks: list[Path] = []
    strays: list[Path] = []
    temps: list[Path] = []
    if not d.is_dir() or d.is_symlink():
        return chunks, strays, temps
    with os.scandir(d) as it:
        for e in it:
            p = Path(e.path)
            if _TEMP.fullmatch(e.name):
                temps.append(p)
            elif CHUNK_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                chunks.append(p)
            else:
                strays.append(p)
    return sorted(chunks), sorted(strays), temps


def _is_map_file(rel: str) -> bool:
    """A store-relative path recorded for a map file: below ``maps.zarr/<method>/``, no ``..``."""
    parts = rel.split("/")
    return len(parts) >= 3 and parts[0] == MAPS_DIR and ".." not in parts and "" not in parts


def rerun_hint(run: dict[str, Any] | None) -> str:
    """How to repair a store: the command that wrote it, again."""
    runs = ((run or {}).get("info") or {}).get("runs") or [{}]
    argv = runs[-1].get("argv") if isinstance(runs[-1], dict) else None
    if isinstance(argv, list) and argv:
        cmd = "camlens " + " ".join(map(str, argv))
        return f"run the same command again ({cmd}): it verifies the store and recomputes what is damaged"
    return "run the same command (or explain_dataset call) again: it verifies the store and recomputes what is damaged"


def columns(volume: bool = False, detector: bool = False) -> tuple[str, ...]:
    """The table's columns: an image run's :data:`COLUMNS`, a volume run's :data:`VOLUME_COLUMNS`, or
    a detector's (:data:`DETECTION_COLUMNS` added)."""
    base = VOLUME_COLUMNS if volume else COLUMNS
    return base + DETECTION_COLUMNS if detector else base


def is_detector_run(signature: dict[str, Any] | None) -> bool:
    """Whether a run signature is a detector's (its table has :data:`DETECTION_COLUMNS`)."""
    return isinstance(signature, dict) and "detections" in signature


def schema(volume: bool = False, detector: bool = False):
    """The table's Arrow schema: :data:`COLUMNS`, :data:`VOLUME_COLUMNS` for a volume or clip run,
    with :data:`DETECTION_COLUMNS` for a detector's."""
    pa, _ = _pa()
    types = {
        "image_id": pa.int64(),
        "class_id": pa.int64(),
        "score": pa.float32(),
        "prob": pa.float32(),
        **{c: pa.string() for c in ("source", "name", "label", "method", "layer", "model", "class_name", "skipped")},
        **{c: pa.float64() for c in VOLUME_COLUMNS if c.startswith("world_")},
        **{c: pa.list_(pa.float64()) for c in ("spacing", "affine", "timestamps")},
        **{c: pa.float32() for c in ("det_x0", "det_y0", "det_x1", "det_y1")},
    }
    return pa.schema([(c, types.get(c, pa.int32())) for c in columns(volume, detector)])


#: the table kinds a store may hold: (volume, detector)
_KINDS = ((False, False), (True, False), (False, True))


def known_schema(found: Any) -> Any:
    """The camlens table schema (an image run's, a volume run's or a detector's) that the Arrow schema
    ``found`` equals once its metadata is removed; ``ValueError`` when it is none of them."""
    bare = found.remove_metadata()
    for volume, detector in _KINDS:
        if bare.equals(schema(volume, detector)):
            return schema(volume, detector)
    raise ValueError(f"columns {bare.names} are not a camlens table chunk's")


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k)]


class StoreCheck:
    """What :meth:`ResultStore.check` found: the ``done`` image ids of every verified chunk, the
    damaged files with why, the images computed again, stray files named (never parsed)."""

    def __init__(self) -> None:
        self.done: set[int] = set()
        self.damaged: dict[str, str] = {}  # store-relative path -> why
        self.lost: set[int] = set()  # image ids whose results were dropped
        self.strays: list[str] = []
        self.files: dict[str, Any] = {}  # verified records, store-relative path -> [size, sha256]

    def messages(self) -> list[str]:
        out = []
        if self.damaged:
            shown = "; ".join(f"{p}: {why}" for p, why in list(self.damaged.items())[:6])
            more = f"; and {len(self.damaged) - 6} more" if len(self.damaged) > 6 else ""
            out.append(
                f"note: the store check found {len(self.damaged)} damaged file(s) and computes "
                f"{len(self.lost)} image(s) again: {shown}{more}"
            )
        if self.strays:
            out.append(f"note: stray file(s) in the store, ignored (not read): {', '.join(self.strays[:6])}")
        return out


class ResultStore:
    """One run's view of ``OUT``: create or check it, write chunks, merge the index.

    ``signature``: what decides the results (sources digest, methods, targets, layer, model
    checksum, threshold, map dtype…). A store with another signature is refused unless
    ``overwrite``; with the same one, the run resumes. ``note``: where warnings go (stderr).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        signature: dict[str, Any],
        info: dict[str, Any],
        *,
        map_dtype: str = "float32",
        note: Callable[[str], None] | None = None,
    ):
        if map_dtype not in ("float32", "float16"):
            raise InputError(f"map dtype must be 'float32' or 'float16', not {map_dtype!r}")
        self.root = Path(root)
        self.signature = signature
        self.info = info
        self.map_dtype = map_dtype
        self.note = note or (lambda msg: print(msg, file=__import__("sys").stderr))
        self._arrays: dict[str, Any] = {}
        self._meta: dict[str, list[Any]] = {}  # method -> zarr.json record
        self.overflow = 0  # float16 values stored as inf
        #: signatures of the same run written by an older camlens (accepted, then upgraded)
        self.equivalent: list[dict[str, Any]] = []
        #: the images' sources, to say in words how another run's images differ
        self.sources: Callable[[], list[str]] | None = None

    # --- set-up (rank 0, holding the lock), then every rank reads what is done ---------------
    def prepare(self, overwrite: bool) -> None:
        """Rank 0: refuse a foreign or mismatching store (or one with links inside), wipe it with
        ``overwrite``, remove killed writers' temporary files, record the run."""
        run = self.root / RUN_FILE
        if overwrite:
            self._wipe()
        else:
            refuse_links(self.root, STORE_FOLDERS)
            self._check_signature(run)
        self._make_dir(self.root / CHUNKS_DIR)
        self._remove_temporaries()
        try:
            prev = (read_json_object(run, "the run record") or {}).get("info", {})
        except StoreError:
            prev = {}
        runs = [*(prev.get("runs", []) if isinstance(prev, dict) else []), self.info]
        atomic_write_json(run, {"signature": self.signature, "info": {**self.info, "runs": runs}})

    def _wipe(self) -> None:
        for e in STORE_ENTRIES:
            p = self.root / e
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)  # removes links inside, never follows them

    def _make_dir(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, path, "create the folder") from None

    def _check_signature(self, run: Path) -> None:
        try:
            rec = read_json_object(run, "the run record")
            old = None if rec is None else rec.get("signature")
            if rec is not None and not isinstance(old, dict):
                raise StoreError(f"{run} (the run record) is damaged: no 'signature' object")
        except StoreError as exc:
            old = self._signature_from_chunks()
            if old is None:
                raise StoreMismatchError(
                    f"{exc}; it records the arguments of the run that wrote {self.root}, and no table chunk "
                    "holds a copy: pass --overwrite (overwrite=True) to start again, or use another --out"
                ) from None
            self.note(f"note: {run} was damaged; the run's arguments were read back from the table chunks")
        if old is None:
            old = self._signature_from_chunks()
            if old is None:
                clash = [e for e in STORE_ENTRIES if os.path.lexists(self.root / e)]  # a dangling link too
                if clash:
                    raise StoreMismatchError(
                        f"{self.root / clash[0]} exists but {run} does not; pass --overwrite to replace it"
                    )
                return
            self.note(f"note: {run} was missing; the run's arguments were read back from the table chunks")
        if old != self.signature and old not in self.equivalent:
            raise StoreMismatchError(
                f"{self.root} holds a run with other arguments ({'; '.join(self._diff_words(old))}); pass "
                "--overwrite (overwrite=True) to replace it, or choose another --out folder"
            )

    def _signature_from_chunks(self) -> dict[str, Any] | None:
        for f in chunk_entries(self.root)[0]:
            try:
                sig = read_chunk(f)[2]
            except Exception:  # a damaged chunk: the check recomputes it
                continue
            if isinstance(sig, dict):
                return sig
        return None

    def _diff_words(self, old: dict[str, Any]) -> list[str]:
        """What differs, in words; the image list by its first differing path, not by hashes."""
        out = []
        for k in sorted(set(old) | set(self.signature)):
            a, b = old.get(k), self.signature.get(k)
            if a == b:
                continue
            if k == "sources_sha256":
                out.append(self._sources_words())
            else:
                out.append(f"{k}: {a!r} then, {b!r} now")
        return out

    def _sources_words(self) -> str:
        sources = self.sources() if self.sources is not None else []
        for f in chunk_entries(self.root)[0]:
            try:
                t = read_chunk(f)[0]
            except Exception:
                continue
            for i, src in zip(t.column("image_id").to_pylist(), t.column("source").to_pylist(), strict=True):
                if i < len(sources) and sources[i] != src:
                    return f"the images differ: image {i} was {src!r} then, {sources[i]!r} now"
        return "the list of images differs (other files, or the same files in another order)"

    def _remove_temporaries(self) -> None:
        """Temporary files of killed writers: never read, removed (the lock says no writer is alive)."""
        for d in (self.root, self.root / CHUNKS_DIR):
            if d.is_dir():
                for e in os.scandir(d):
                    if _TEMP.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                        Path(e.path).unlink(missing_ok=True)
        maps = self.root / MAPS_DIR
        if maps.is_dir():
            for dirpath, _, names in os.walk(maps):
                for n in names:
                    if n.endswith(".partial"):  # Zarr's temporary chunk files
                        (Path(dirpath) / n).unlink(missing_ok=True)

    # --- the check: what can be reused ------------------------------------------------------------
    def check(self) -> StoreCheck:
        """Verify every table chunk (its checksum in ``index.json`` when recorded, its Parquet pages'
        CRCs, its columns) and every map file it covers (size and SHA-256); drop the chunks whose
        table or maps are damaged and every map array whose ``zarr.json`` is, so their images are
        computed again. A chunk listed in the index but gone counts as damaged too."""
        rep = StoreCheck()
        index = self._old_index(rep)
        files = index.get("files")
        recorded: dict[str, Any] = files if isinstance(files, dict) else {}
        chunks, strays, _ = chunk_entries(self.root)
        rep.strays = [str(p.relative_to(self.root)) for p in strays]
        problems, readable = scan_chunks(chunks, index, recorded)
        for rel, problem in problems.items():
            f = self.root / rel
            if problem != "missing":
                rep.damaged[rel] = problem
                self._drop(f, None, rep)
            elif CHUNK_NAME.fullmatch(f.name):  # a listed chunk gone: its images are computed again
                rep.damaged[rel] = problem
                rep.lost.update(self._range_ids(f.name))
        parsed = [(f, rel, sorted(set(t.column("image_id").to_pylist())), files) for f, rel, t, files in readable]
        bad_arrays = self._check_array_metadata(parsed, rep)
        for f, rel, ids, files in parsed:
            bad = {p: w for p in sorted(files) if (w := self._file_problem(p, files[p], bad_arrays))}
            why = next((f"{p}: {w}" for p, w in bad.items()), None)
            if why is None and rep.done.intersection(ids):
                why = "rows of images already in another chunk (two runs wrote this store at once)"
            if why is not None:
                rep.damaged.setdefault(rel, why)
                self._drop(f, ids, rep)
                for p in bad:  # rewritten whole by the recomputation (Zarr would decode a damaged one)
                    if _is_map_file(p) and not p.endswith("/zarr.json"):
                        (self.root / p).unlink(missing_ok=True)
                continue
            rep.done.update(ids)
            rep.files.update(files)
        for method in bad_arrays:
            shutil.rmtree(self.root / MAPS_DIR / method, ignore_errors=True)  # links refused before
        n = self.signature.get("n_images")
        rep.lost = {i for i in rep.lost - rep.done if not isinstance(n, int) or 0 <= i < n}
        if rep.damaged:  # the old index and merged table describe what was dropped: a store under repair
            for name in (INDEX_FILE, RESULTS_FILE):
                (self.root / name).unlink(missing_ok=True)
        for msg in rep.messages():
            self.note(msg)
        return rep

    def _old_index(self, rep: StoreCheck) -> dict[str, Any]:
        try:
            return read_json_object(self.root / INDEX_FILE, "the store's index") or {}
        except StoreError as exc:
            rep.damaged[INDEX_FILE] = str(exc).split(" is ", 1)[-1]
            return {}

    def _check_array_metadata(self, parsed: list, rep: StoreCheck) -> set[str]:
        """Methods whose ``zarr.json`` differs from what the chunks recorded (missing, edited shape…):
        their whole array is dropped."""
        bad: set[str] = set()
        seen: dict[str, Any] = {}
        for _, _, _, files in parsed:
            for p, want in files.items():
                if p.endswith("/zarr.json") and p not in seen:
                    seen[p] = want
                    why = check_file(self.root / p, want)
                    if why is not None:
                        rep.damaged[p] = why
                        bad.add(p.split("/")[1])
        return bad

    def _file_problem(self, rel: str, want: Any, bad_arrays: set[str]) -> str | None:
        if not _is_map_file(rel):
            return "not a map file of this store"
        if rel.split("/")[1] in bad_arrays:
            return "its array's zarr.json is damaged"
        return check_file(self.root / rel, want)

    def _drop(self, chunk: Path, ids: list[int] | None, rep: StoreCheck) -> None:
        """Remove a damaged chunk (its rows would otherwise stay next to their recomputed copies)."""
        rep.lost.update(self._range_ids(chunk.name) if ids is None else ids)
        chunk.unlink(missing_ok=True)

    def _range_ids(self, name: str) -> list[int]:
        """An unreadable or missing chunk's images, from its name (less the failed ones)."""
        m = CHUNK_NAME.fullmatch(name)
        assert m is not None
        failed = {f.get("image_id") for f in self._failed_before()}
        return [i for i in range(int(m.group(1)), int(m.group(2)) + 1) if i not in failed]

    def _failed_before(self) -> list[dict[str, Any]]:
        try:
            failed = (read_json_object(self.root / INDEX_FILE, "the store's index") or {}).get("failed")
        except StoreError:
            return []
        return [f for f in failed if isinstance(f, dict)] if isinstance(failed, list) else []

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
                    chunks=map_chunks(full, np.dtype(self.map_dtype).itemsize),
                    dtype=self.map_dtype,
                    fill_value=float("nan"),
                    overwrite=False,
                )
            except zarr.errors.ContainsArrayError:
                arr = zarr.open_array(str(path), mode="r+")
        # every chunk of an image is a file, also one all NaN (a padded slab): the records list them all
        arr = arr.with_config({"write_empty_chunks": True})
        if tuple(arr.shape) != full:
            raise StoreMismatchError(
                f"{path} holds maps of shape {tuple(arr.shape)}, this run makes {full}; pass --overwrite"
            )
        self._arrays[method] = arr
        self._meta[method] = file_digest(path / "zarr.json")
        return arr

    def _map_records(self, method: str, idx: np.ndarray) -> dict[str, list[Any]]:
        arr = self._arrays[method]
        base = f"{MAPS_DIR}/{method}"
        out = {f"{base}/zarr.json": self._meta[method]}
        for i in idx.tolist():
            for key in image_chunk_keys(arr, i):
                if not os.path.lexists(self.root / base / key):
                    continue  # all NaN (a detector's image with nothing to explain): Zarr writes no chunk
                out[f"{base}/{key}"] = file_digest(self.root / base / key)
        return out

    def _float16(self, m: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        big = int(np.count_nonzero(np.isfinite(m) & (np.abs(m) > np.finfo(np.float16).max)))
        if big:
            if not self.overflow:
                self.note(
                    f"warning: {big} map value(s) of images {min(ids)}..{max(ids)} exceed float16's range "
                    f"(|x| > {float(np.finfo(np.float16).max):.0f}) and are stored as inf; use --map-dtype "
                    "float32 (map_dtype='float32') to keep them"
                )
            self.overflow += big
        with np.errstate(over="ignore"):  # said above, in words
            return m.astype(np.float16)

    def write(
        self,
        n_images: int,
        ids: Sequence[int],
        rows: dict[str, list],
        maps: dict[str, np.ndarray],
        rank: int,
        render: dict[str, Any] | None = None,
    ) -> Path:
        """Maps first (one Zarr chunk per image), then the table chunk (atomic): the commit. Its
        Parquet metadata records the map files' ``[size, sha256]`` and the run's signature."""
        pa, _ = _pa()
        idx = np.asarray(ids, dtype=np.int64)
        files: dict[str, list[Any]] = {}
        path = self.root / CHUNKS_DIR / f"part-{int(idx.min()):09d}-{int(idx.max()):09d}-r{rank:04d}.parquet"
        try:
            for method, m in maps.items():
                arr = self._array(method, n_images, tuple(m.shape[1:]))
                v = self._float16(m, ids) if self.map_dtype == "float16" else m.astype(self.map_dtype, copy=False)
                arr.set_orthogonal_selection((idx,), v)
                files.update(self._map_records(method, idx))
        except OSError as exc:
            raise os_error(exc, getattr(exc, "filename", None) or self.root / MAPS_DIR) from None
        meta = {
            META_FILES: json.dumps(files),
            META_SIGNATURE: json.dumps(self.signature),
            META_RENDER: json.dumps(render or {}),
        }
        sch = schema(volume="depth" in rows, detector=is_detector_run(self.signature))
        table = pa.Table.from_pydict({c: rows[c] for c in sch.names}, schema=sch).replace_schema_metadata(meta)
        atomic_write_bytes(path, _table_bytes(table))
        return path

    # --- the merged index (rank 0) ---------------------------------------------------------------
    def finalize(
        self, n_images: int, failed: list[dict[str, Any]], complete: bool, timing: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Merge the chunks into ``results.parquet`` (streamed chunk by chunk, so memory stays at
        one chunk) and write ``index.json`` with every file's ``[size, sha256]``."""
        files = chunk_entries(self.root)[0]
        tmp = self.root / f".{RESULTS_FILE}.{os.getpid()}.tmp"
        rows = 0
        ids: set[int] = set()
        records: dict[str, Any] = {}
        try:
            with contextlib.ExitStack() as stack:
                writer = None
                for f in files:
                    records[f"{CHUNKS_DIR}/{f.name}"] = file_digest(f)
                    t, maps, _ = read_chunk(f)
                    records.update(maps)
                    t = t.sort_by([("image_id", "ascending"), ("method", "ascending"), ("rank", "ascending")])
                    ids.update(t.column("image_id").to_pylist())
                    rows += t.num_rows
                    if writer is None:  # the chunks' schema: an image or a volume run's
                        writer = stack.enter_context(_parquet_writer(tmp, t.schema))
                    writer.write_table(t)
                if writer is None:
                    stack.enter_context(_parquet_writer(tmp, schema(detector=is_detector_run(self.signature))))
            check_target(self.root / RESULTS_FILE, overwrite=True)  # a folder in the way is refused
            os.replace(tmp, self.root / RESULTS_FILE)  # replaces a link at the name, never follows it
        except OSError as exc:
            if isinstance(exc, CamlensError):
                raise
            raise os_error(exc, self.root / RESULTS_FILE) from None
        finally:
            tmp.unlink(missing_ok=True)
        records[RESULTS_FILE] = file_digest(self.root / RESULTS_FILE)
        index = {
            "complete": complete,
            "n_images": n_images,
            "n_done": len(ids),
            "n_rows": rows,
            "failed": failed,
            "chunks": [f.name for f in files],
            "files": records,
            "float16_overflow": self.overflow,
            "last_run": timing or {},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(self.root / INDEX_FILE, index)
        return index


class StoredMaps:
    """A method's maps ``(N, K, H, W)``, read lazily from Zarr: indexing reads only the chunks of the
    images asked for, after checking each against its recorded size and SHA-256 — a damaged or
    missing map raises :class:`~camlens.base.errors.StoreError`, never NaN or a codec error. (An image
    that was never done — a failed file — reads as NaN.) Other attributes are the Zarr array's."""

    def __init__(self, results: Results, method: str, array: Any):
        self._res, self.method, self.array = results, method, array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def _ids(self, sel: Any) -> list[int]:
        first = sel[0] if isinstance(sel, tuple) and sel else sel
        n = self.shape[0]
        if isinstance(first, slice):
            return list(range(n))[first]
        if first is Ellipsis or (isinstance(sel, tuple) and not sel):
            return list(range(n))
        arr = np.asarray(first)
        if arr.dtype == bool:
            return np.flatnonzero(arr).tolist()
        return [int(i) % n for i in np.atleast_1d(arr).tolist()]

    def __getitem__(self, sel: Any) -> np.ndarray:
        self._res._verify_maps(self.method, self.array, self._ids(sel))
        try:
            return np.asarray(self.array[sel])
        except (IndexError, TypeError):
            raise
        except Exception as exc:  # a codec error on a chunk changed since the check
            raise StoreError(
                f"{self._res.root / MAPS_DIR / self.method}: the maps cannot be read ({type(exc).__name__}: {exc}); "
                f"{rerun_hint(self._res.run)}"
            ) from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"<StoredMaps {self.method!r} shape={self.shape} dtype={self.dtype}>"


class Results:
    """A store opened for reading: ``table`` (a pandas DataFrame, one row per image x target x
    method), ``run`` (the run record), ``failed`` (files that could not be read) and lazy maps.
    Every file read is checked against its recorded checksum: a damaged store raises
    :class:`~camlens.base.errors.StoreError` naming the files and the fix (the same command again)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        run = self.root / RUN_FILE
        if not os.path.lexists(run) and any(os.path.lexists(self.root / e) for e in (INDEX_FILE, CHUNKS_DIR)):
            raise StoreError(
                f"{run} (the run record) is missing from the result store {self.root}; "
                f"{rerun_hint(None)} (the run record is rebuilt from the table chunks)"
            )
        if not os.path.lexists(run):
            raise InputError(
                f"{self.root} is not a camlens result store (no {RUN_FILE}); run `camlens explain DATA --out DIR`"
            )
        self.run: dict[str, Any] = self._json(run, "the run record") or {}
        index = self._json(self.root / INDEX_FILE, "the store's index")
        self.index: dict[str, Any] = index if index is not None else {"complete": False, "failed": []}
        self._table = None
        self._records: dict[str, Any] | None = None
        self._verified: set[str] = set()

    def _schema(self):
        return schema(is_detector_run(self.run.get("signature")))

    def _json(self, path: Path, what: str) -> dict[str, Any] | None:
        try:
            return read_json_object(path, what)
        except StoreError as exc:
            run = None if path.name == RUN_FILE else getattr(self, "run", None)
            raise StoreError(f"{exc}; {rerun_hint(run)}") from None

    def _damaged(self, problems: dict[str, str]) -> StoreError:
        shown = "; ".join(f"{self.root / p}: {why}" for p, why in list(problems.items())[:6])
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        return StoreError(f"the result store {self.root} is damaged ({shown}{more}); {rerun_hint(self.run)}")

    @property
    def complete(self) -> bool:
        return bool(self.index.get("complete"))

    @property
    def failed(self) -> list[dict[str, Any]]:
        failed = self.index.get("failed", [])
        return list(failed) if isinstance(failed, list) else []

    def _recorded(self) -> dict[str, Any]:
        files = self.index.get("files")
        return files if isinstance(files, dict) else {}

    @property
    def table(self):
        """The rows sorted by ``image_id, method, rank`` (read on first use; an interrupted run's
        committed chunks when the merged file is missing or older than the chunks)."""
        if self._table is None:
            pa, pq = _pa()
            res = self.root / RESULTS_FILE
            chunks = chunk_entries(self.root)[0]
            fresh = os.path.lexists(res) and self.index.get("chunks") == [c.name for c in chunks]
            recorded = self._recorded()
            problems: dict[str, str] = {}
            if fresh:
                why = check_file(res, recorded[RESULTS_FILE]) if RESULTS_FILE in recorded else None
                t = None
                if why is None:
                    try:
                        t = pq.read_table(res)
                        t = t.cast(known_schema(t.schema))
                    except Exception as exc:
                        why = f"not a readable Parquet table ({type(exc).__name__})"
                if why is not None:
                    raise self._damaged({RESULTS_FILE: why})
            else:
                found, readable = scan_chunks(chunks, self.index, recorded)
                problems.update(found)
                parts = [t for _, _, t, _ in readable]
                self._records = dict(recorded)
                for *_, files in readable:
                    self._records.update(files)
                if problems:
                    raise self._damaged(problems)
                t = pa.concat_tables(parts) if parts else self._schema().empty_table()
            df = t.to_pandas()
            dup = df.duplicated(["image_id", "method", "rank"])
            if dup.any():
                ids = sorted(set(df.image_id[dup].tolist()))
                raise self._damaged({CHUNKS_DIR: f"images {ids[:8]} have rows in two chunks (two runs at once)"})
            self._table = df.sort_values(["image_id", "method", "rank"], kind="stable").reset_index(drop=True)
        return self._table

    def _verify_maps(self, method: str, array: Any, ids: list[int]) -> None:
        if self._records is None:
            _ = self.table  # the records of an interrupted run come from its chunks
        records = self._records if self._records is not None else self._recorded()
        base = f"{MAPS_DIR}/{method}"
        problems = {}
        for rel in [f"{base}/zarr.json"] + [f"{base}/{key}" for i in ids for key in image_chunk_keys(array, i)]:
            if rel in self._verified or rel not in records:
                continue  # a map never written (a failed image) reads as NaN, as documented
            why = check_file(self.root / rel, records[rel])
            if why is not None:
                problems[rel] = why
            else:
                self._verified.add(rel)
        if problems:
            raise self._damaged(problems)

    def maps(self, method: str) -> StoredMaps:
        """The maps ``(N, K, H, W)`` of ``method`` (lazy: indexing reads and checks only those chunks)."""
        p = self.root / MAPS_DIR / method
        d = self.root / MAPS_DIR
        if os.path.islink(p) or os.path.islink(d):
            raise self._damaged({f"{MAPS_DIR}/{method}": "a symbolic link"})
        if not p.exists():
            have = sorted(x.name for x in d.iterdir()) if d.is_dir() else []
            known = sorted({k.split("/")[1] for k in self._recorded() if k.startswith(MAPS_DIR + "/")})
            if method in known:
                raise self._damaged({f"{MAPS_DIR}/{method}": "missing"})
            raise InputError(f"no maps for method {method!r} in {self.root}; stored: {', '.join(have) or 'none'}")
        zarr = _zarr()
        try:
            array = zarr.open_array(str(p), mode="r")
        except Exception as exc:
            why = f"not a readable Zarr array ({type(exc).__name__})"
            raise self._damaged({f"{MAPS_DIR}/{method}/zarr.json": why}) from None
        maps = StoredMaps(self, method, array)
        self._verify_maps(method, array, [])
        return maps

    def map(self, row: Any) -> np.ndarray:
        """The ``(H, W)`` map of one table row (a row position, or a row of :attr:`table`); of a
        volume run the ``(D, H, W)`` map, cropped to the row's ``depth, height, width`` (a clip's
        to its ``depth`` frames: its ``height, width`` are the video's, the map is at the model's size)."""
        r = self.table.iloc[row] if isinstance(row, (int, np.integer)) else row
        if r.get("skipped"):
            raise InputError(f"image {int(r['image_id'])} ({r['source']}) has no map: {r['skipped']}")
        m = np.asarray(self.maps(str(r["method"]))[int(r["image_id"]), int(r["rank"]) - 1])
        if "depth" in r.index:  # stored padded to the run's largest volume
            clip = r["timestamps"] is not None
            m = m[: int(r["depth"])] if clip else m[: int(r["depth"]), : int(r["height"]), : int(r["width"])]
        if "detection" in r.index:  # a detector's maps share the largest image's frame: this image's part
            m = m[: int(r["height"]), : int(r["width"])]
        if np.isnan(m).any() if "detection" in r.index else np.isnan(m).all():
            raise self._damaged({f"{MAPS_DIR}/{r['method']}": f"no map stored for image {int(r['image_id'])}"})
        return m

    def to_nifti(self, row: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the map of one table row (a row position, or a row of :attr:`table`) of a NIfTI or
        DICOM run as a NIfTI file in its scan's space (the stored ``affine``: the saved map opens on
        top of the scan in ITK-SNAP / 3D Slicer; :func:`camlens.base.nifti.save_nifti`)."""
        from camlens.base.nifti import Volume, save_nifti

        r = self.table.iloc[row] if isinstance(row, (int, np.integer)) else row
        aff = r.get("affine") if "affine" in r.index else None
        if aff is None or len(aff) != 16:
            what = "a clip" if "timestamps" in r.index and r["timestamps"] is not None else "an input without one"
            raise InputError(
                f"row {r.name} ({r['source']}) has no affine ({what}): NIfTI maps are written for runs over "
                "NIfTI scans or DICOM series; use res.map(i) for the array"
            )
        grid = (int(r["width"]), int(r["height"]), int(r["depth"]))  # the file's (i, j, k)
        vol = Volume(np.broadcast_to(np.float32(0), grid), np.asarray(aff, dtype=np.float64).reshape(4, 4))
        return save_nifti(self.map(r), vol, path, overwrite=overwrite)

    def explanations(self, image: int) -> dict[str, Any]:
        """``{method: Explanation}`` of one image (its ``image_id``) rebuilt from the store, for figures
        and :meth:`~camlens.Explanation.save` (:func:`camlens.pipeline.figures.stored_explanations`)."""
        from camlens.pipeline.figures import (
            stored_explanations,  # lazy: torch and matplotlib only when a figure is asked for
        )

        return stored_explanations(self, image)

    def figure(self, image: int, method: str | None = None, **kwargs: Any):
        """The overlays of one image (its ``image_id``) as ``camlens.explain`` draws them: one method's
        figure, or the montage of methods x classes when several are stored and none is named."""
        from camlens.pipeline.figures import stored_figure  # lazy: torch and matplotlib only when a figure is asked for

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
    the map of row ``i`` and ``res.maps("gradcam")[a:b]`` a slice of maps, lazily from Zarr. Every
    file is checked against its recorded size and SHA-256 when read: a damaged store raises
    :class:`~camlens.base.errors.StoreError` naming the files and the fix (the same command again).
    """
    try:
        return Results(directory)
    except OSError as exc:
        raise CamlensError(f"{directory}: cannot open the result store ({exc})") from None


__all__ = [
    "COLUMNS",
    "DETECTION_COLUMNS",
    "ResultStore",
    "Results",
    "StoreCheck",
    "StoreMismatchError",
    "StoredMaps",
    "atomic_write_bytes",
    "columns",
    "is_detector_run",
    "open_results",
]
