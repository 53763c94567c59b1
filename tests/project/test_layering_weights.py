"""Issue 11 (weights part): models/ never imports train/ (at module level or inside functions), and
weights/checkpoint I/O has one implementation. Oracle: the import statements themselves (AST)."""

from __future__ import annotations

import ast
from pathlib import Path

import camlens

PKG = Path(camlens.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved)."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg = mod.rsplit(".", 1)[0] if path.name != "__init__.py" else mod
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


def test_models_never_import_train():
    for path in sorted((PKG / "models").glob("*.py")):
        bad = sorted(m for m in _imports(path) if m == "camlens.train" or m.startswith("camlens.train."))
        assert not bad, f"{path.name} imports {bad}"


def test_one_reader_and_one_head_replacement():
    from camlens.models import heads, weights, zoo
    from camlens.train import checkpoint

    assert zoo.load_weights_file is weights.load_weights_file
    assert checkpoint.read_state_dict is weights.read_state_dict
    assert camlens.train.replace_classifier is heads.replace_classifier
    assert not hasattr(camlens.train.loop, "replace_head")
    assert camlens.train.load_checkpoint is zoo.load_checkpoint
    for path in sorted(PKG.rglob("*.py")):
        src = path.read_text()
        if path.name != "weights.py":
            assert "weights_only=True" not in src, f"{path} reads weights itself"
