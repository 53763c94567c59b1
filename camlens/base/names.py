"""Safe, unique file names from class names and image stems (no path separators, bounded bytes), and
THE stem rule every command and the dataset pipeline name their outputs (and images) by."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

_SAFE_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")


def _keep(ch: str) -> bool:
    if ch.isascii():
        return ch in _SAFE_ASCII
    return unicodedata.category(ch)[0] not in "CZ"  # letters, marks, digits, symbols (CJK, emoji) stay


def safe_name(s: str, max_bytes: int = 200) -> str:
    """A file-name-safe version of ``s``: Unicode letters, digits and symbols are kept (``chat_été``,
    ``猫``), ASCII other than ``A-Za-z0-9._+-``, spaces and control characters become ``_`` (so ``/``,
    ``\\``, ``:``, ``*``… never reach the file system); NFC-normalized, at most ``max_bytes`` UTF-8 bytes."""
    text = unicodedata.normalize("NFC", str(s))
    out = re.sub(r"_+", "_", "".join(ch if _keep(ch) else "_" for ch in text)).strip("._")
    while len(out.encode("utf-8")) > max_bytes:
        out = out[:-1]
    return out or "image"


def unique_names(names: Sequence[str]) -> list[str]:
    """Make names unique by appending ``-2``, ``-3``… to repeats (``cat``, ``cat-2``)."""
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    for n in names:
        if n not in seen:
            seen[n] = 1
            out.append(n)
            continue
        j = seen[n]
        while True:
            j += 1
            cand = f"{n}-{j}"
            if cand not in taken:
                break
        seen[n] = j
        taken.add(cand)
        out.append(cand)
    return out


def output_stems(paths: Sequence[str]) -> list[str]:
    """Unique file-name-safe stems for input paths — the one naming rule of camlens' outputs
    (``explain``, ``localize``, ``evaluate``, the dataset store): the file stem (``cat.jpg`` ->
    ``cat``; ``skimage:NAME`` -> ``NAME``) made safe by :func:`safe_name`; when two inputs share a
    stem, the parent folder is prefixed (``a_cat``, ``b_cat``), then ``-2``, ``-3``… if still
    ambiguous."""
    paths = [str(p) for p in paths]
    stems = [safe_name(p.split(":", 1)[1] if p.startswith("skimage:") else Path(p).stem) for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    named = [
        safe_name(f"{Path(p).parent.name}_{s}") if counts[s] > 1 and Path(p).parent.name else s
        for p, s in zip(paths, stems, strict=True)
    ]
    return unique_names(named)
