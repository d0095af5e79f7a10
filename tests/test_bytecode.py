"""klpforge runs from byte-code however it is installed (issue 21), and a diff imports only what it needs.

A copy of the package without any ``.pyc`` stands for a checkout where Python may not write byte-code
(``PYTHONDONTWRITEBYTECODE=1``, as on this project's machines): the first ``klpforge diff`` writes the
byte-code under the klpforge cache, the second runs from it (``python -v`` names the ``.pyc`` it loads),
and the source tree gets no ``__pycache__``. A cache directory another user could write is never used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PEER

pytestmark = pytest.mark.skipif(not (PEER / "manifest.json").is_file(), reason="../shared/peer-objs not present")

ROOT = Path(__file__).resolve().parent.parent
PAIR = PEER / "x86_64" / "cold-add2.ORIG.o", PEER / "x86_64" / "cold-add2.PATCHED.o"


def _copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "klpforge", src / "klpforge", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copytree(ROOT / "klpforge" / "data", src / "klpforge" / "data")
    return src


def _diff(src: Path, cache: Path, out: Path, *pyflags: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "KLPFORGE_NO_PYCACHE")}
    e.update(PYTHONPATH=str(src), KLPFORGE_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1", **env)
    a, b = PAIR
    return subprocess.run([sys.executable, *pyflags, "-m", "klpforge", "diff", str(a), str(b), "-o", str(out),
                           "--symtab", str(a), "-q"], capture_output=True, text=True, env=e, cwd=out.parent,
                          check=False, timeout=300)


def test_diff_runs_from_bytecode_in_the_cache(tmp_path: Path) -> None:
    src, cache = _copy(tmp_path), tmp_path / "cache"
    r = _diff(src, cache, tmp_path / "x.o")
    assert r.returncode == 0, r.stderr
    assert not cache.exists(), "the byte-code cache alone created the klpforge cache"
    cache.mkdir(mode=0o700)
    r = _diff(src, cache, tmp_path / "a.o")
    assert r.returncode == 0, r.stderr
    mirror = cache / "pycache" / str(src / "klpforge").lstrip("/")
    tag = sys.implementation.cache_tag
    run_pyc = mirror / "diff" / f"run.{tag}.pyc"
    assert run_pyc.is_file()
    assert not list(src.rglob("__pycache__")), "byte-code written into the source tree"
    r = _diff(src, cache, tmp_path / "b.o", "-v")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"code object from '{run_pyc}'" in r.stderr  # loaded, not compiled again
    assert f"code object from '{mirror / 'diff' / f'compare.{tag}.pyc'}'" in r.stderr
    assert (tmp_path / "a.o").read_bytes() == (tmp_path / "b.o").read_bytes()


def test_shared_or_disabled_cache_is_not_used(tmp_path: Path) -> None:
    src, cache = _copy(tmp_path), tmp_path / "cache"
    (cache / "pycache").mkdir(parents=True)
    (cache / "pycache").chmod(0o777)  # another user could plant byte-code: compile from source instead
    r = _diff(src, cache, tmp_path / "a.o")
    assert r.returncode == 0, r.stderr
    assert not list((cache / "pycache").iterdir())
    (cache / "pycache").chmod(0o700)
    cache.chmod(0o777)  # the cache itself writable by others: pycache could be swapped for another directory
    r = _diff(src, cache, tmp_path / "b.o")
    assert r.returncode == 0, r.stderr
    assert not list((cache / "pycache").iterdir())
    (cache / "pycache").chmod(0o700)
    r = _diff(src, cache, tmp_path / "b.o", KLPFORGE_NO_PYCACHE="1")
    assert r.returncode == 0, r.stderr
    assert not list((cache / "pycache").iterdir())
    assert not list(src.rglob("__pycache__"))


def test_installed_bytecode_is_used_where_it_is(tmp_path: Path) -> None:
    """After ``compileall`` (scripts/setup.sh, or pip) the prefix stays unset: the byte-code beside the
    sources is current, and nothing goes to the cache."""
    src, cache = _copy(tmp_path), tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src / "klpforge")], check=True)
    r = _diff(src, cache, tmp_path / "a.o", "-v")
    assert r.returncode == 0, r.stderr[-2000:]
    tag = sys.implementation.cache_tag
    assert f"code object from '{src / 'klpforge' / 'diff' / '__pycache__' / f'run.{tag}.pyc'}'" in r.stderr
    assert not (cache / "pycache").exists()


def test_a_batch_of_diffs_imports_only_what_it_needs(tmp_path: Path) -> None:
    """Every x86_64 peer pair without DWARF in one ``diff-batch`` process: no ``numpy.ma`` (numpy's ``unique``/``isin``
    import it; klpforge's own set helpers do not), no rich, pyelftools, build or verify packages."""
    import json

    # not the one pair built with -g: a pair with DWARF needs pyelftools (the struct layout check)
    cases = [c for c in json.loads((PEER / "manifest.json").read_text())["cases"]
             if c["arch"] == "x86_64" and b".debug_info" not in (PEER / c["orig"]).read_bytes()]
    lines = []
    for i, c in enumerate(cases):
        ent = " ".join(f"--entsize {k}={v}" for k, v in c["env"].items())
        lines.append(f"{PEER / c['orig']} {PEER / c['patched']} -o {tmp_path / f'{i}.o'} "
                     f"--symtab {PEER / c['orig']} {ent}")
    (tmp_path / "pairs").write_text("\n".join(lines) + "\n")
    code = ("import sys\nfrom klpforge.cli import main\n"
            f"rc = main(['diff-batch', {str(tmp_path / 'pairs')!r}])\nprint(rc, ' '.join(sorted(sys.modules)))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False,
                       timeout=600)
    rc, mods = r.stdout.splitlines()[-1].split(" ", 1)
    assert rc == "2", r.stdout[-3000:] + r.stderr  # the peer set holds three refusals (changed __init code)
    assert r.stdout.count(": ok: ") == 36
    loaded = set(mods.split())
    for heavy in ("numpy.ma", "rich", "elftools", "klpforge.kbuild", "klpforge.qemu", "klpforge.ipa",
                  "klpforge.diff.report", "klpforge.commands.build"):
        assert heavy not in loaded, heavy
