"""Every example in README.md runs exactly as written, in the order printed (issues 12 and 24).

The README's fenced code blocks are found automatically, so a new section's examples are tested
without touching this file:

* ``bash`` blocks: every line that starts with ``camlens`` is one example (``;`` separates
  several commands on a line); it runs through the CLI in process and must exit 0. A ``torchrun …
  -m camlens ARGS`` line (``\\`` continues it) runs ``camlens ARGS`` in one process: the same outputs,
  so an ``--out`` that an earlier example already used is caught. Unquoted globs are expanded as
  the shell does (a pattern that matches nothing is passed on as it is). Other lines (``make demo``,
  ``make test``) are not run here (CI runs them).
* ``python`` blocks: each block is one example, executed in a fresh namespace. A line that shows
  its result, ``EXPR  # → SHOWN`` (or ``print(ARGS)  # → SHOWN``), is checked: ``repr(EXPR)`` (or
  what ``print`` writes) must match ``SHOWN``, where ``...`` stands for any text (doctest's
  ELLIPSIS) and a comment after ``  — `` is free text. So the values the README shows are the
  values the code gives.

All examples run one after the other in ONE folder, as a reader who pastes them in order would:
an example sees what the earlier ones wrote, so two that claim the same output clash here as they
would for the reader. The folder starts with the files the README names: ``cat.jpg``, ``dog.jpg``,
``photos/`` (one photo), ``data/**/*.jpg``, ``val/`` (synthetic shapes, ``val/<class>/*.png`` and
``val/boxes.csv``), ``shapes/`` (a synthetic ImageFolder), ``new_image.png`` and ``runs/shapes`` (a
small fine-tuned checkpoint). An example that needs more files adds them to :func:`sandbox`.

**Opting out.** An example that cannot run offline (it needs the user's own weights, a GPU…)
carries the marker ``[not run by the tests: REASON]`` in a comment on its line (bash) or on its
block's first line (python), so the reason is visible to the reader right next to the example.
"""

from __future__ import annotations

import glob
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SKIP = re.compile(r"\[not run by the tests: ([^\]]+)\]")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def readme_examples(text: str) -> list[tuple[str, str, str | None, int]]:
    """``(kind, code, skip reason or None, line number)`` for each example in the README text."""
    out = []
    for m in FENCE.finditer(text):
        lang, body = m.group(1).lower(), m.group(2)
        first_line = text.count("\n", 0, m.start(2)) + 1
        if lang in ("bash", "sh", "shell", "console"):
            lines = body.splitlines()
            i = 0
            while i < len(lines):
                start, cmd = i, lines[i].strip().removeprefix("$ ")
                while cmd.endswith("\\") and i + 1 < len(lines):  # a continued line
                    i += 1
                    cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
                i += 1
                if cmd.startswith("torchrun") and " -m camlens " in cmd:
                    cmd = "camlens " + cmd.split(" -m camlens ", 1)[1]
                if cmd.startswith("camlens"):
                    reason = SKIP.search(cmd)
                    out.append(("bash", cmd, reason.group(1) if reason else None, first_line + start))
        elif lang in ("python", "py"):
            head = body.lstrip().splitlines()[0] if body.strip() else ""
            reason = SKIP.search(head)
            out.append(("python", body, reason.group(1) if reason else None, first_line))
    return out


EXAMPLES = readme_examples(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> Path:
    """The folder every README example starts from (copied per example)."""
    from PIL import Image

    from camlens.base.io import sample_image
    from camlens.data import synthetic

    root = tmp_path_factory.mktemp("readme")
    cat = sample_image("chelsea")
    Image.fromarray(cat).save(root / "cat.jpg")
    Image.fromarray(sample_image("astronaut")[::2, ::2].copy()).save(root / "dog.jpg")  # any photo will do
    (root / "photos").mkdir()
    Image.fromarray(sample_image("coffee")[::2, ::2].copy()).save(root / "photos" / "coffee.jpg")
    (root / "data" / "pets").mkdir(parents=True)
    Image.fromarray(cat[::2, ::2].copy()).save(root / "data" / "pets" / "kitten.jpg")
    ds = synthetic(root / "val", 2, image_size=64, seed=3)  # val/<class>/*.png, as the README says
    synthetic(root / "shapes", 4, image_size=64, seed=1)
    shutil.copy(ds.paths[0], root / "new_image.png")
    from camlens.train import finetune

    finetune(
        root / "shapes",
        model="efficientnet_lite0",
        epochs=1,
        image_size=64,
        out=root / "runs" / "shapes",
        progress=False,
        grid=False,
        log=lambda s: None,
    )
    return root


def test_readme_has_examples():
    kinds = {k for k, *_ in EXAMPLES}
    assert {"bash", "python"} <= kinds and len(EXAMPLES) >= 10
    for _kind, _code, reason, line in EXAMPLES:
        if reason is not None:
            assert len(reason.strip()) > 10, f"README line {line}: say why the example is not run"


def test_parser_finds_commands_and_opt_outs():
    text = (
        "x\n```bash\nmake demo\ncamlens explain a.jpg   # fine\n"
        "camlens finetune d/ --weights w.pth   # [not run by the tests: needs your own w.pth]\n```\n"
        "```python\n# [not run by the tests: needs a GPU]\nimport torch\n```\n```python\nprint(1)\n```\n"
    )
    got = readme_examples(text)
    assert [(k, r) for k, _, r, _ in got] == [
        ("bash", None),
        ("bash", "needs your own w.pth"),
        ("python", "needs a GPU"),
        ("python", None),
    ]
    assert got[0][3] == 4


@pytest.mark.slow  # every example: models, figures, a fine-tuning run
def test_readme_examples_in_order(sandbox, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    work = tmp_path / "work"
    shutil.copytree(sandbox, work)
    monkeypatch.chdir(work)
    for kind, code, reason, line in EXAMPLES:
        if reason:
            continue
        run_example(kind, code, line)


SHOWN = re.compile(r"^(?P<indent>\s*)(?P<code>\S.*?)\s+# → (?P<want>.+?)(?:\s+— .*)?$")


def shown_matches(want: str, got: str) -> bool:
    """``got`` is what ``want`` shows, ``...`` matching any text."""
    pattern = ".*".join(re.escape(part) for part in want.split("..."))
    return re.fullmatch(pattern, got, re.S) is not None


def with_checks(code: str, first_line: int) -> str:
    """The block with every ``EXPR  # → SHOWN`` line turned into a check of that value."""
    out = []
    for i, text in enumerate(code.splitlines()):
        m = SHOWN.match(text)
        if not m:
            out.append(text)
            continue
        expr, want, where = m["code"], m["want"].strip(), first_line + i
        if expr.startswith("print(") and expr.endswith(")"):
            out.append(f"{m['indent']}__shown__({where}, {want!r}, ' '.join(map(str, [{expr[6:-1]}])))")
        else:
            out.append(f"{m['indent']}__shown__({where}, {want!r}, repr({expr}))")
    return "\n".join(out)


def _shown(line: int, want: str, got: str) -> None:
    assert shown_matches(want, got), f"README line {line} shows {want!r}, the code gives {got!r}"


def test_shown_values_are_checked():
    """The checker itself: a right value passes, a wrong one fails naming the line, ``...`` matches."""
    ns: dict = {"__shown__": _shown}
    exec(with_checks("x = [1, 2]\nx  # → [1, 2]  — a list\nprint(len(x), 'a')  # → 2 a", 10), ns)
    assert shown_matches("[(285, 'cat', 0.78...), ...]", "[(285, 'cat', 0.7812), (3, 'dog', 0.1)]")
    with pytest.raises(AssertionError, match="README line 11 shows '3'"):
        exec(with_checks("x = 2\nx  # → 3", 10), {"__shown__": _shown})
    assert SHOWN.match("exp.show()  # overlays") is None  # a plain comment is not a claim


def run_example(kind: str, code: str, line: int) -> None:
    """Run one README example in the current folder; fail naming its README line."""
    if kind == "python":
        ns = {"__name__": "__readme__", "__shown__": _shown}
        exec(compile(with_checks(code, line), f"README.md line {line}", "exec"), ns)
        return
    from click.testing import CliRunner

    from camlens.cli import main

    for command in _split_commands(code):
        args = shell_words(command)
        assert args[0] == "camlens"
        res = CliRunner().invoke(main, args[1:], catch_exceptions=False)
        assert res.exit_code == 0, f"README line {line}: `{command}` exited {res.exit_code}:\n{res.output}"


def shell_words(command: str) -> list[str]:
    """The words bash passes to the program: quotes removed, unquoted globs expanded (sorted; a
    pattern that matches nothing stays as it is; ``**`` is ``*``, bash's default)."""
    out: list[str] = []
    for raw in shlex.split(command, comments=True, posix=False):
        word = shlex.split(raw)[0] if raw.strip("'\"") else ""
        if raw[0] not in "'\"" and any(c in raw for c in "*?["):
            out += sorted(glob.glob(raw)) or [word]
        else:
            out.append(word)
    return out


def test_shell_words_expand_like_bash(tmp_path, monkeypatch):
    """`val/*.png` matches nothing in a synthetic() tree (`val/<class>/*.png`): the old test passed
    the pattern to camlens, which globbed it itself, so the README's mistake went unseen (issue 24)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "val" / "circle").mkdir(parents=True)
    for n in ("b.png", "a.png"):
        (tmp_path / "val" / "circle" / n).write_bytes(b"")
    assert shell_words("camlens x val/*.png") == ["camlens", "x", "val/*.png"]  # no match: as it is
    assert shell_words("camlens x val/*/*.png --class 'tabby cat'") == [
        "camlens",
        "x",
        "val/circle/a.png",
        "val/circle/b.png",
        "--class",
        "tabby cat",
    ]
    assert shell_words("camlens x 'val/*/*.png'") == ["camlens", "x", "val/*/*.png"]  # quoted: camlens globs


def test_torchrun_lines_are_examples_and_outputs_do_not_clash():
    """The README's torchrun line wrote `--out store`, which an earlier example had filled: the run
    was refused (issue 24). Two examples that write the same --out must be the same command."""
    text = "```bash\ntorchrun --nproc-per-node=4 -m camlens explain val/ --out s \\\n   --workers 4\n```\n"
    assert readme_examples(text) == [("bash", "camlens explain val/ --out s --workers 4", None, 2)]
    seen: dict[str, str] = {}
    for kind, code, _reason, line in EXAMPLES:
        if kind != "bash":
            continue
        for command in _split_commands(code):
            args = shlex.split(command, comments=True)
            if "--out" in args:
                out = args[args.index("--out") + 1]
                assert seen.setdefault(out, command) == command, f"README line {line}: --out {out} used twice"


def _split_commands(line: str) -> list[str]:
    """``a; b # comment`` -> ``["a", "b"]`` (``;`` and ``#`` outside quotes), each command as written
    (its quotes kept, so :func:`shell_words` knows which globs the shell would expand)."""
    out, cur, quote = [], "", ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            out.append(cur)
            cur = ""
            continue
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        cur += ch
    out.append(cur)
    return [c.strip() for c in out if c.strip()]


_ = np  # numpy is used by README examples through camlens
