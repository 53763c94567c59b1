"""The shape rule of the code base: no function body over 80 lines, no function with more than 12
parameters (``self``/``cls`` not counted; click commands exempt from the parameter count, since each
option is a parameter — they parse, then call named steps).

Functions that broke the rule before it was set are listed in ``KNOWN`` with their size then: they
may only shrink (a ratchet), and an entry that now complies must be removed, so the list only gets
shorter. A new function over the limits fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "camlens"
MAX_LINES = 80
MAX_PARAMS = 12

# "module path:function": (body lines, parameters) when the rule was set (camlens 0.3 work).
KNOWN: dict[str, tuple[int, int]] = {}


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    docstring = (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    )
    start = body[1].lineno if docstring and len(body) > 1 else first.lineno
    return (node.end_lineno or start) - start + 1


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return n - 1 if names and names[0] in ("self", "cls") else n


def _is_click_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(".command" in ast.unparse(d) or ".option" in ast.unparse(d) for d in node.decorator_list)


def measure() -> dict[str, tuple[int, int]]:
    """Every function over a limit: ``{"path:name": (body lines, parameters)}``."""
    over: dict[str, tuple[int, int]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines, params = _body_lines(node), _params(node)
                click_command = _is_click_command(node)
                if lines > MAX_LINES or (params > MAX_PARAMS and not click_command):
                    # a click command's parameters are its options: only its length is ratcheted
                    over[f"{rel}:{node.name}"] = (lines, 0 if click_command else params)
    return over


def test_no_new_function_over_the_limits():
    new = {k: v for k, v in measure().items() if k not in KNOWN}
    assert not new, (
        f"functions over {MAX_LINES} body lines or {MAX_PARAMS} parameters (split them into named steps): {new}"
    )


def test_known_long_functions_only_shrink():
    over = measure()
    grown = {
        k: (over[k], KNOWN[k]) for k in KNOWN if k in over and (over[k][0] > KNOWN[k][0] or over[k][1] > KNOWN[k][1])
    }
    assert not grown, f"(now, before): {grown}"
    fixed = sorted(set(KNOWN) - set(over))
    assert not fixed, f"these now keep the rule: remove them from KNOWN: {fixed}"


def test_the_measure_sees_a_long_function(tmp_path):
    """The rule's own oracle: a synthetic 81-line body and a 13-parameter function are caught."""
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    src = f"def long():\n    '''doc'''\n{body}\n\ndef wide({', '.join(f'a{i}' for i in range(13))}):\n    pass\n"
    tree = ast.parse(src)
    fns = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert _body_lines(fns["long"]) == 81 and _params(fns["wide"]) == 13
