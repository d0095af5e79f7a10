"""``klpforge impact --distro debian:RELEASE --patch fix.patch``: the dumps and source of a prepared Debian
release found by klpforge itself, objects without a clone dump compiled first, paths shown relative to the tree.

Needs the prepared 6.1.0-56-amd64 tree (as ``tests/test_distro_debian.py``): skipped without it unless
``KLPFORGE_REQUIRE_KERNEL=1`` or ``KLPFORGE_DISTRO=1`` asks to prepare it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from klpforge.distro.base import DistroTree

pytestmark = [pytest.mark.distro, pytest.mark.kernel]

RELEASE = "6.1.0-56-amd64"
DISTRO = f"debian:{RELEASE}"
PATCHES = Path(__file__).parent / "distro_patches"
SVG = "{http://www.w3.org/2000/svg}"


def klpforge(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=cwd)


@pytest.fixture(scope="module")
def debian_tree() -> DistroTree:
    from klpforge.distro import debian

    root = debian.release_root(RELEASE)
    if not (root / "prepared.json").is_file() and not (os.environ.get("KLPFORGE_REQUIRE_KERNEL") == "1"
                                                       or os.environ.get("KLPFORGE_DISTRO") == "1"):
        pytest.skip(f"Debian {RELEASE} not prepared (KLPFORGE_DISTRO=1 downloads and prepares it, ~2 min)")
    return debian.prepare_tree(RELEASE)


def _svg_texts(svg: Path) -> list[str]:
    """Every text Graphviz drew, in document order."""
    return ["".join(t.itertext()).strip() for t in ET.parse(svg).getroot().iter(f"{SVG}text")]


def test_patch_of_inlined_function_names_callers(debian_tree: DistroTree, tmp_path: Path) -> None:
    """loop.c's ``loop_attr_dio_show`` is inlined (or IPA-SRA cloned) into its sysfs wrapper: the text names
    the wrapper ``loop_attr_do_show_dio``; the picture has the title (patch, release), the legend, and the
    locations relative to the tree (no cache path anywhere)."""
    patch = PATCHES / "50-driver-loop-dio.patch"
    src_before = (debian_tree.src / "drivers/block/loop.c").read_bytes()
    svg = tmp_path / "loop.svg"
    from klpforge.distro.compile import ipa_dump_of

    built = debian_tree.build / "drivers/block/loop.o"
    had_dump = built.is_file() and ipa_dump_of(built) is not None
    r = klpforge("impact", "--distro", DISTRO, "--patch", str(patch), "--svg", str(svg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    if not had_dump:  # a fresh tree: the original object is compiled for its dump, and said so
        assert ("compiling 1 original object(s) of 6.1.0-56-amd64 for their clone dumps: drivers/block/loop.o"
                in r.stderr), r.stderr
        assert "note: compiled drivers/block/loop.o to get GCC's clone dump" in out
    assert ipa_dump_of(built) is not None  # left in the tree's build directory for the next run
    assert out.startswith("impact of drivers/block/loop.c:loop_attr_dio_show"), out
    assert "loop_attr_do_show_dio" in out  # the caller the static function is inlined into
    assert "drivers/block/loop.o" in out and "drivers/block/loop.c:" in out
    replace = next(ln for ln in out.splitlines() if ln.startswith("replace: ")).split()[1:]
    assert "loop_attr_do_show_dio" in replace
    assert str(debian_tree.src) not in out and "klpforge-impact-" not in out
    assert (debian_tree.src / "drivers/block/loop.c").read_bytes() == src_before  # the tree is only read

    texts = _svg_texts(svg)
    assert f"impact of {patch.name} on {DISTRO} (paths relative to its source tree)" in texts
    assert "legend" in texts and "replace: the live patch replaces it" in texts
    assert any(t.startswith("drivers/block/loop.c:") for t in texts), texts
    assert "loop_attr_do_show_dio" in texts
    body = svg.read_text()
    assert str(debian_tree.src) not in body and "/.cache/" not in body

    # a second run finds the dump Kbuild left in the tree's build directory: nothing compiled
    again = klpforge("impact", "--distro", DISTRO, "--patch", str(patch), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr
    assert '"loop_attr_do_show_dio"' in again.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--distro", DISTRO, "--dumps", ".", "--patch", "x.patch"],
     "klpforge impact: give either --distro or --dumps, not both (--distro finds the release's dumps itself)"),
    (["--distro", DISTRO, "--source", ".", "--patch", "x.patch"],
     "klpforge impact: --distro uses the prepared tree's source and objects: drop --source"),
    (["--distro", "debian:bogus release", "--patch", "x.patch"],
     "klpforge impact: --distro 'debian:bogus release': expected NAME:RELEASE such as debian:6.1.0-56-amd64"),
    ([], "klpforge impact: give --dumps DIR_OR_LIST, or --distro NAME:RELEASE"),
])
def test_refusals_without_the_tree(tmp_path: Path, args: list[str], message: str) -> None:
    """Refused before anything is fetched or prepared: one line, exit 1."""
    r = klpforge("impact", *args, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [message], r.stderr


def test_unknown_release_is_one_line(debian_tree: DistroTree, tmp_path: Path) -> None:
    """A release the archive does not have: the releases of that line it has, one line (refreshes the index)."""
    r = klpforge("impact", "--distro", "debian:6.1.0-999-amd64", "--patch",
                 str(PATCHES / "50-driver-loop-dio.patch"), cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("klpforge impact: the Debian archive has no linux-image-6.1.0-999-amd64; "
                               "releases of 6.1 it has: "), lines[0]
    assert RELEASE in lines[0]
    assert not list(tmp_path.iterdir())


def test_bare_function_name_needs_its_file(debian_tree: DistroTree, tmp_path: Path) -> None:
    """With --distro a FUNC must name its file (the object to compile comes from it)."""
    r = klpforge("impact", "--distro", DISTRO, "loop_attr_dio_show", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "klpforge impact: loop_attr_dio_show: with --distro, name the file too "
        "(drivers/block/loop.c:loop_attr_dio_show)"], r.stderr


def test_included_c_file_copies_are_named(debian_tree: DistroTree, tmp_path: Path) -> None:
    """fs/compat_binfmt_elf.c #includes fs/binfmt_elf.c: the impact of a padzero change analyses binfmt_elf.o
    and says, in its notes, that the compat copy is not analysed (was: silent)."""
    patch = Path(__file__).parent / "distro_patches" / "82-fs-binfmt-elf-padzero.patch"
    r = klpforge("impact", "--distro", DISTRO, "--patch", str(patch), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("fs/binfmt_elf.c is also #included by fs/compat_binfmt_elf.c: the copies there are not analysed "
            "(`build --distro` rebuilds and replaces them)") in json.loads(r.stdout)["notes"]
