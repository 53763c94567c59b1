"""The package imports downwards only, has no import cycle, and stays light to import.

Each module's layer is the folder it is in (a module may import its own layer and the ones below,
never above)::

    0 base         camlens/base/, camlens/_version.py
    1 core         camlens/core/, camlens/models/, camlens/targets/
    2 methods      camlens/attribution/
    3 api          camlens/api/
    4 analysis     camlens/viz/, camlens/metrics/, camlens/data/
    5 jobs         camlens/train/, camlens/pipeline/, camlens/comparison/ (runs methods over data into the
                   pipeline's result store)
    6 apps         camlens/cli/, camlens/serve/, camlens/__main__.py, camlens/__init__.py (lazy attributes),
                   camlens/_moved.py (the 0.2 module paths)

Function-level imports of camlens modules are counted too (a cycle hidden in a function is still a
cycle); the only exceptions are listed in ``LAZY_EDGES`` with their reason.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "camlens"

#: folder (or root-level module) -> layer; nothing else decides a module's layer
FOLDER_LAYERS: dict[str, int] = {
    "base": 0,
    "_version": 0,
    "core": 1,
    "models": 1,
    "targets": 1,
    "attribution": 2,
    "api": 3,
    "viz": 4,
    "metrics": 4,
    "data": 4,
    "comparison": 5,
    "train": 5,
    "pipeline": 5,
    "cli": 6,
    "serve": 6,
    "__main__": 6,
    "_moved": 6,  # the 0.2 module aliases the package root installs
    "": 6,
}

#: function-level imports that close a cycle on purpose, with the reason (none left)
LAZY_EDGES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _rank(mod: str) -> int | None:
    """The layer of ``camlens.<folder>.…``: its top-level folder's (``None``: a folder not listed)."""
    rel = mod[len("camlens.") :] if mod.startswith("camlens.") else ""
    return FOLDER_LAYERS.get(rel.split(".")[0])


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(mod: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported camlens module, line, at module level)`` for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # typing only
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "camlens":
                    subs = [f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in MODULES]
                    for t in subs or [target]:
                        out.append((t, child.lineno, top))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "camlens":
                        out.append((a.name, child.lineno, top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return out


def _graph(include_lazy: bool) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, _, top in _imports(mod, path):
            if target == mod or target not in MODULES:
                continue
            if not top and (not include_lazy or (mod, target) in LAZY_EDGES):
                continue
            g[mod].add(target)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return found


def test_every_module_has_a_layer():
    unranked = [m for m in MODULES if _rank(m) is None]
    assert not unranked, f"add these modules to a layer in RANKS: {unranked}"


def test_no_import_cycle_even_through_function_level_imports():
    assert _cycles(_graph(include_lazy=True)) == []


def test_module_level_imports_go_downwards_only():
    bad = []
    for mod, path in MODULES.items():
        for target, line, top in _imports(mod, path):
            if top and target in MODULES and target != mod and _rank(target) > _rank(mod):  # type: ignore[operator]
                bad.append(
                    f"{path.relative_to(ROOT.parent)}:{line} {mod} (layer {_rank(mod)}) imports "
                    f"{target} (layer {_rank(target)})"
                )
    assert not bad, "\n".join(bad)


def test_no_upward_import_inside_functions_either():
    """A function-level import is for a heavy or optional dependency, never to reach a higher layer."""
    bad = []
    for mod, path in MODULES.items():
        for target, line, top in _imports(mod, path):
            if not top and target in MODULES and _rank(target) > _rank(mod):  # type: ignore[operator]
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} {mod} imports {target} in a function")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The oracle itself: a hand-made cycle and an upward import are found."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(g) == [["a", "b", "c"]]
    assert _rank("camlens.cli.explain") == 6 and _rank("camlens.core.engine") == 1
    assert _rank("camlens.models.zoo") == 1 and _rank("camlens.base.io") == 0 and _rank("camlens.newfolder.x") is None


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    """Import each module (sorted: no accidental order dependence) in one new process."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    mods = [m for m in MODULES if not m.endswith("__main__")]
    r = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["explain", "--help"]])
def test_cli_version_and_help_do_not_import_torch(args):
    code = (
        "import sys\nfrom camlens.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'torchvision', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_import_camlens_is_light_and_lazy_attributes_work():
    code = (
        "import sys, camlens\nassert 'torch' not in sys.modules\n"
        "assert callable(camlens.methods) and callable(camlens.localize)\n"
        "import camlens.attribution.gradcam, camlens.base.localization, camlens.api.explainer\n"
        "assert callable(camlens.methods) and callable(camlens.localize) and callable(camlens.explain)\n"
        "for name in ('metrics', 'data', 'train', 'viz', 'targets', 'models'):\n"
        "    assert getattr(camlens, name).__name__ == 'camlens.' + name\n"
        "assert camlens.Explanation.__name__ == 'Explanation'\n"
        "try:\n    camlens.nope\nexcept AttributeError as e:\n    assert 'nope' in str(e)\n"
        "else:\n    raise SystemExit(1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_one_version_source():
    import camlens
    from camlens._version import __version__

    assert camlens.__version__ == __version__
    text = (ROOT.parent / "pyproject.toml").read_text()
    assert (
        'attr = "camlens._version.__version__"' in text
        and "\nversion =" not in text.split("[project]")[1].split("[")[0]
    )


def test_0_2_module_paths_still_import_with_a_deprecation_warning_naming_the_new_path():
    """The old flat paths resolve to the very module at the new path (one module object, its own
    spec kept), ``camlens.methods`` stays the listing function after a 0.2 submodule import."""
    code = (
        "import warnings, importlib\n"
        "warnings.simplefilter('error')\n"
        "import camlens\n"
        "from camlens._moved import MOVED\n"
        "assert set(MOVED) >= {'camlens.engine', 'camlens.io', 'camlens.loceval', 'camlens.explanation'}\n"
        "for old, new in sorted(MOVED.items()):\n"
        "    try:\n"
        "        importlib.import_module(old)\n"
        "    except DeprecationWarning as w:\n"
        "        assert new in str(w) and old in str(w), w\n"
        "    else:\n"
        "        raise SystemExit('no warning for ' + old)\n"
        "warnings.simplefilter('ignore')\n"
        "import camlens.engine, camlens.core.engine as e\n"
        "assert camlens.engine is e and e.__spec__.name == 'camlens.core.engine'\n"
        "from camlens.methods.registry import register\n"
        "from camlens.attribution.registry import register as r2\n"
        "assert register is r2 and 'gradcam' in camlens.methods()\n"
        "assert camlens.loceval is importlib.import_module('camlens.metrics.loceval')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_nothing_is_left_flat_in_the_package_root():
    """Every module lives in a layer folder; only the package's own entry files stay at the root."""
    flat = sorted(p.name for p in ROOT.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "_moved.py", "_version.py"], flat
