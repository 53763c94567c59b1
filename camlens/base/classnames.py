"""Class names -> class ids: exact names, case-insensitive names and synonyms.

ImageNet labels are WordNet synsets with several names ("tabby, tabby cat", "Egyptian cat",
"tiger, Panthera tigris"); torchvision keeps only the first. For the 1000 ImageNet-1k classes the
synonyms are bundled in ``imagenet_synonyms.txt`` (one line per class in index order: the
torchvision name first, then the WordNet lemmas of its synset), so ``"tabby cat"`` finds
``"tabby"``. For other class lists, a name containing commas counts as its comma-separated
synonyms.

Lookup order (the first rule that gives exactly one class wins):

1. the exact name (case-sensitive; ImageNet has both ``"Cardigan"`` the corgi and ``"cardigan"``
   the sweater);
2. the name, case-insensitively;
3. a synonym, case-insensitively — a synonym of two classes (``"crane"``: the bird and the
   machine) is an error naming both.

Unknown names raise :class:`~camlens.base.errors.TargetError` with the closest names.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

from camlens.base.errors import TargetError


@lru_cache(maxsize=1)
def imagenet_synonyms() -> tuple[tuple[str, ...], ...]:
    """The 1000 ImageNet-1k classes' names, each ``(torchvision name, WordNet synonyms…)``."""
    text = resources.files("camlens.base").joinpath("imagenet_synonyms.txt").read_text(encoding="utf-8")
    rows = tuple(tuple(s.strip() for s in line.split(",") if s.strip()) for line in text.splitlines() if line)
    assert len(rows) == 1000, "imagenet_synonyms.txt must have 1000 lines"
    return rows


def synonyms_of(class_names: Sequence[str]) -> list[tuple[str, ...]]:
    """Per class, every name it answers to (its own name first)."""
    names = list(class_names)
    syn = imagenet_synonyms()
    if len(names) == len(syn) and all(n == s[0] for n, s in zip(names, syn)):
        return list(syn)
    return [(n, *(s.strip() for s in n.split(",") if s.strip() and s.strip() != n)) for n in names]


def class_id(name: str, class_names: Sequence[str] | None) -> int:
    """The id of the class called ``name`` (see the module docstring for the rules)."""
    if not class_names:
        raise TargetError(
            f"class name {name!r} given but the model has no class names; pass class indices, or "
            "class_names=[...] to explain()"
        )
    names = list(class_names)
    if name in names:
        return names.index(name)
    key = name.strip().lower()
    lowered = [c.lower() for c in names]
    hits = [i for i, c in enumerate(lowered) if c == key]
    if len(hits) == 1:
        return hits[0]
    syn = synonyms_of(names)
    hits = hits or [i for i, s in enumerate(syn) if key in (x.lower() for x in s)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        which = ", ".join(f"{i} ({', '.join(syn[i])})" for i in hits)
        raise TargetError(f"class name {name!r} is ambiguous: it names classes {which}; pass the class id")
    every = {x.lower(): i for i, s in enumerate(syn) for x in s}
    close = difflib.get_close_matches(key, list(every), n=5, cutoff=0.5)
    shown = list(dict.fromkeys(every[c] for c in close))
    hint = f" Closest: {', '.join(repr(names[i]) for i in shown)}." if shown else ""
    raise TargetError(f"unknown class name {name!r}.{hint}")


__all__ = ["class_id", "imagenet_synonyms", "synonyms_of"]
