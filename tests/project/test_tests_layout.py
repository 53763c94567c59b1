"""The tests mirror the package (issue 23): one folder per layer folder of ``camlens/`` (plus ``bench``
for the benchmarks' smoke runs and ``project`` for the rules of the code base), no test module
directly under ``tests/``, none named after an issue number."""

from __future__ import annotations

from pathlib import Path

import camlens

REPO = Path(camlens.__file__).resolve().parents[1]
TESTS = REPO / "tests"
EXTRA = {"bench", "project"}


def test_every_test_folder_is_a_package_folder_or_a_declared_extra():
    pkg = {p.name for p in (REPO / "camlens").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders, "no test folders"
    assert folders - pkg <= EXTRA, f"test folders that mirror no camlens folder: {sorted(folders - pkg - EXTRA)}"
    for f in folders:
        assert (TESTS / f / "__init__.py").exists(), f"tests/{f} needs an __init__.py (unique module names)"


def test_no_test_module_at_the_top_or_named_after_an_issue():
    top = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert top == [], f"move these into tests/<area>/: {top}"
    by_issue = sorted(str(p.relative_to(TESTS)) for p in TESTS.rglob("test_issue*.py"))
    assert by_issue == [], f"name these by feature: {by_issue}"
