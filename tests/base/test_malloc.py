"""camlens' own processes set glibc's mmap/trim thresholds (camlens.base._malloc); ``import camlens`` never.

Oracle: the kernel's minor page-fault count of a process that allocates, touches and frees a
16 MiB block four times. With the thresholds set, only the first touch faults; with glibc's
dynamic default the second one faults too (the first block was mmapped, the second extends the
heap), so the test fails if the settings are not applied.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from camlens.base._malloc import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_malloc, tuned_env

ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = r"""
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
{setup}
out = []
for _ in range(4):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(16 << 20)
    ctypes.memset(p, 1, 16 << 20)
    libc.free(p)
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(out)
"""


def _faults(setup: str, env: dict[str, str]) -> list[int]:
    code = PROBE.format(setup=setup)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    return [int(v) for v in r.stdout.strip().strip("[]").split(",")]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CAMLENS_MALLOC"}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_tuned_thresholds_keep_freed_tensor_buffers():
    env = _clean_env()
    default = _faults("", env)
    tuned = _faults("from camlens.base._malloc import tune_malloc\nassert tune_malloc()", env)
    by_env = _faults("", tuned_env(env))
    pages = (16 << 20) // 4096
    assert default[1] > pages // 2  # glibc's default: the second block faults again
    assert tuned[0] > pages // 2 and max(tuned[1:]) < pages // 20
    assert max(by_env[1:]) < pages // 20  # the same settings as environment variables (children)


def test_the_users_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert tune_malloc() is False
    assert tuned_env()["MALLOC_MMAP_THRESHOLD_"] == "131072" and "MALLOC_TRIM_THRESHOLD_" not in tuned_env()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("CAMLENS_MALLOC", "default")
    assert tune_malloc() is False and "MALLOC_MMAP_THRESHOLD_" not in tuned_env()
    env = tuned_env({"PATH": "/bin"})
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(MMAP_THRESHOLD) and env["MALLOC_TRIM_THRESHOLD_"] == str(TRIM_THRESHOLD)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_the_cli_sets_them_and_import_camlens_does_not():
    env = _clean_env()
    run_cli = "from click.testing import CliRunner\nfrom camlens.cli import main\nCliRunner().invoke(main, ['methods'])"
    cli = _faults(run_cli, env)
    lib = _faults("import camlens, camlens.api.explainer", env)
    pages = (16 << 20) // 4096
    assert max(cli[1:]) < pages // 20  # the CLI's group callback tuned its process
    assert lib[1] > pages // 2  # a library import leaves the user's process as it was
