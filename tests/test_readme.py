"""Every example in README.md runs exactly as written (issue 12 item 1).

The README's fenced code blocks are found automatically, so a new section's examples are tested
without touching this file:

* ``bash`` blocks: every line that starts with ``camlens`` is one example (``;`` separates
  several commands on a line); it runs through the CLI in process and must exit 0. Other lines
  (``make demo``, ``make test``) are not run here (CI runs them).
* ``python`` blocks: each block is one example, executed in a fresh namespace.

Each example runs in its own copy of a sandbox folder holding the files the README names:
``cat.jpg``, ``dog.jpg``, ``photos/`` (one photo), ``data/**/*.jpg``, ``val/`` (synthetic shapes with
``val/boxes.csv``), ``shapes/`` (a synthetic ImageFolder), ``new_image.png`` and ``runs/shapes``
(a small fine-tuned checkpoint). An example that needs more files adds them to :func:`sandbox`.

**Opting out.** An example that cannot run offline (it needs the user's own weights, a GPU…)
carries the marker ``[not run by the tests: REASON]`` in a comment on its line (bash) or on its
block's first line (python), so the reason is visible to the reader right next to the example.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"\[not run by the tests: ([^\]]+)\]")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def readme_examples(text: str) -> list[tuple[str, str, str | None, int]]:
    """``(kind, code, skip reason or None, line number)`` for each example in the README text."""
    out = []
    for m in FENCE.finditer(text):
        lang, body = m.group(1).lower(), m.group(2)
        first_line = text.count("\n", 0, m.start(2)) + 1
        if lang in ("bash", "sh", "shell", "console"):
            for i, line in enumerate(body.splitlines()):
                cmd = line.strip().removeprefix("$ ")
                if cmd.startswith("camlens"):
                    reason = SKIP.search(cmd)
                    out.append(("bash", cmd, reason.group(1) if reason else None, first_line + i))
        elif lang in ("python", "py"):
            head = body.lstrip().splitlines()[0] if body.strip() else ""
            reason = SKIP.search(head)
            out.append(("python", body, reason.group(1) if reason else None, first_line))
    return out


EXAMPLES = readme_examples(README.read_text(encoding="utf-8"))


def _param(ex):
    kind, _code, reason, line = ex
    marks = [pytest.mark.slow]  # each loads a model and writes figures: seconds, not milliseconds
    if reason:
        marks.append(pytest.mark.skip(reason=f"README line {line}: {reason}"))
    return pytest.param(kind, _code, id=f"L{line}-{kind}", marks=marks)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> Path:
    """The folder every README example starts from (copied per example)."""
    from PIL import Image

    from camlens.data import synthetic
    from camlens.io import sample_image

    root = tmp_path_factory.mktemp("readme")
    cat = sample_image("chelsea")
    Image.fromarray(cat).save(root / "cat.jpg")
    Image.fromarray(sample_image("astronaut")[::2, ::2].copy()).save(root / "dog.jpg")  # any photo will do
    (root / "photos").mkdir()
    Image.fromarray(sample_image("coffee")[::2, ::2].copy()).save(root / "photos" / "coffee.jpg")
    (root / "data" / "pets").mkdir(parents=True)
    Image.fromarray(cat[::2, ::2].copy()).save(root / "data" / "pets" / "kitten.jpg")
    ds = synthetic(root / "val", 2, image_size=64, seed=3)
    for p in ds.paths[:2]:
        shutil.copy(p, root / "val" / p.name)
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


@pytest.mark.parametrize(("kind", "code"), [_param(ex) for ex in EXAMPLES])
def test_readme_example(kind, code, sandbox, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    work = tmp_path / "work"
    shutil.copytree(sandbox, work)
    monkeypatch.chdir(work)
    if kind == "python":
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
        return
    from click.testing import CliRunner

    from camlens.cli import main

    for command in _split_commands(code):
        args = shlex.split(command, comments=True)
        assert args[0] == "camlens"
        res = CliRunner().invoke(main, args[1:], catch_exceptions=False)
        assert res.exit_code == 0, f"`{command}` exited {res.exit_code}:\n{res.output}"


def _split_commands(line: str) -> list[str]:
    """``a; b # comment`` -> ``["a", "b"]`` (``;`` outside quotes)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";")
    lex.whitespace_split = True
    lex.commenters = "#"
    out, cur = [], []
    for tok in lex:
        if tok == ";":
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    out.append(cur)
    return [shlex.join(c) for c in out if c]


_ = np  # numpy is used by README examples through camlens
