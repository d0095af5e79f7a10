"""Distributed ThinLTO (Linux 7.3 ``CONFIG_LTO_CLANG_THIN_DIST``): redo only the LTO steps Kbuild would redo
after a patch, never touching the tree, and hand the post-LTO native objects to the diff engine.

How 7.3 builds vmlinux with it (``scripts/Makefile.vmlinux_a``, ``scripts/Makefile.thinlto``):

1. every C file compiles to *bitcode* ``X.o`` (``-flto=thin -fsplit-lto-unit``);
2. ``builtin.order`` lists vmlinux's objects; one index-only link
   (``ld.lld -r --thinlto-index-only=vmlinux.thinlto-index @builtin.order``, recorded in
   ``.vmlinux.thinlto-index.cmd``) writes ``X.o.thinlto.bc`` beside every bitcode object: which functions
   it imports from which other objects, which of its locals are promoted (renamed ``name.llvm.<hash>``, the
   hash being its module's), and the module hashes of what it imports from;
3. a backend compile per object, ``clang -x ir -fno-lto -fthinlto-index=X.o.thinlto.bc -c -o
   X.thinlto-native.o X.o`` (``.X.thinlto-native.o.cmd``), makes the native code that is linked.

After a patch, :func:`relink_index` reruns step 2 in a private *view* of the build directory (every object a
symlink to the tree's, the changed ones to klpforge's patched bitcode) so that the index files land in the
view, never in the tree. An object's backend must be redone exactly when its index file differs from the
tree's (it imports from a changed object: cross-file inlining, or the changed object's promoted names moved)
or its bitcode changed; :func:`backend` then compiles the original (the tree's own bitcode and index: the
code the running kernel has) and the patched native object, both with ``-ffunction-sections
-fdata-sections`` added to the backend command.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import InputError
from ..util.proc import run

__all__ = ["LtoPlan", "relink_index", "backend_command", "backend", "index_objects", "native_name",
           "stable_llvm_names"]


def native_name(obj: str) -> str:
    """``fs/proc/cmdline.o`` -> ``fs/proc/cmdline.thinlto-native.o`` (``scripts/Makefile.thinlto``)."""
    return obj[:-2] + ".thinlto-native.o"


def _saved_command(build: Path, target: str) -> str:
    p = Path(target)
    cmdf = build / p.parent / f".{p.name}.cmd"
    try:
        text = cmdf.read_text()
    except OSError:
        raise InputError(f"{cmdf} not found: the tree was not built with CONFIG_LTO_CLANG_THIN_DIST "
                         f"(no recorded command for {target})") from None
    for line in text.splitlines():
        if line.startswith((f"savedcmd_{target} := ", f"cmd_{target} := ")):
            return line.split(" := ", 1)[1].replace("$(pound)", "#").replace("$$", "$")
    raise InputError(f"{cmdf}: no command line for {target}")


def index_objects(build: Path) -> list[str]:
    """The bitcode objects of vmlinux (``vmlinux.thinlto-index``: one build-relative path a line)."""
    p = build / "vmlinux.thinlto-index"
    try:
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    except OSError:
        raise InputError(f"{p} not found: not a CONFIG_LTO_CLANG_THIN_DIST build") from None


@dataclass
class LtoPlan:
    """The result of the index link in the view: ``view`` (the private build view), ``redo`` (objects whose
    backend must run again, build-relative, the changed ones first) and ``why`` (object -> reason)."""

    view: Path
    redo: list[str]
    why: dict[str, str]


def _make_view(build: Path, view: Path, objects: Iterable[str], replaced: dict[str, Path]) -> None:
    for rel in objects:
        dst = view / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_symlink() and not dst.exists():
            dst.symlink_to(replaced.get(rel, build / rel))


def relink_index(build: Path, view: Path, patched: dict[str, Path], runner: object = None) -> LtoPlan:
    """Rerun 7.3's index-only link with ``patched`` (build-relative object -> patched bitcode) in ``view``
    and compare every object's new ``.thinlto.bc`` with the tree's.

    ``runner(cmd, cwd)`` runs a shell command (in the Clang build root) and returns a CompletedProcess.
    Raises :class:`InputError` when the link fails or an object is not vmlinux bitcode.
    """
    order = (build / "builtin.order").read_text().split()
    known = set(index_objects(build))
    for obj in patched:
        if obj not in known:
            raise InputError(f"{obj} is not a ThinLTO bitcode object of vmlinux (vmlinux.thinlto-index): "
                             "only vmlinux objects of a CONFIG_LTO_CLANG_THIN_DIST kernel are handled")
    view.mkdir(parents=True, exist_ok=True)
    _make_view(build, view, order, patched)
    (view / "builtin.order").write_text((build / "builtin.order").read_text())
    cmd = _saved_command(build, "vmlinux.thinlto-index")
    r = runner(cmd, view)  # type: ignore[operator]
    if r.returncode != 0:
        raise InputError(f"the ThinLTO index link failed: {(r.stderr or r.stdout).strip()[-500:]}")
    redo: list[str] = list(patched)
    why = {o: "changed by the patch" for o in patched}
    for obj in index_objects(build):
        if obj in patched:
            continue
        new = view / f"{obj}.thinlto.bc"
        old = build / f"{obj}.thinlto.bc"
        try:
            same = new.read_bytes() == old.read_bytes()
        except OSError:
            same = False
        if not same:
            redo.append(obj)
            # the index names imports by GUID only; with one changed object that is exactly where they come from
            src = ", ".join(patched)
            why[obj] = (f"its ThinLTO index changed: it imports from {src}" if len(patched) == 1 else
                        f"its ThinLTO index changed: it imports from one of {src}")
    return LtoPlan(view, redo, why)


_MMD = re.compile(r"-Wp,-MMD,\S+")


def backend_command(build: Path, obj: str, out: Path, extra_flags: str) -> str:
    """The recorded backend command of ``obj`` (``.X.thinlto-native.o.cmd``) writing ``out``, with
    ``extra_flags`` added; run from the build directory (original) or the view (patched)."""
    nat = native_name(obj)
    cmd = _saved_command(build, nat)
    if f"-o {nat} " not in cmd + " ":
        raise InputError(f"unexpected ThinLTO backend command for {obj}: no '-o {nat}'")
    cmd = (cmd + " ").replace(f"-o {nat} ", f"{extra_flags} -o {shlex.quote(str(out))} ", 1).strip()
    return _MMD.sub("", cmd)


def backend(build: Path, plan: LtoPlan, outdir: Path, extra_flags: str, jobs: int,
            runner: object) -> tuple[dict[str, Path], dict[str, Path]]:
    """Native ``(orig, patched)`` objects of every object in ``plan.redo``: the original from the tree's own
    bitcode and index (cwd = build), the patched from the view. Raises :class:`InputError` on a failure."""
    jobs_list: list[tuple[str, str, Path, Path]] = []
    orig: dict[str, Path] = {}
    new: dict[str, Path] = {}
    for obj in plan.redo:
        for kind, cwd, table in (("orig", build, orig), ("patched", plan.view, new)):
            out = outdir / kind / native_name(obj)
            out.parent.mkdir(parents=True, exist_ok=True)
            table[obj] = out
            jobs_list.append((obj, backend_command(build, obj, out, extra_flags), cwd, out))

    def one(job: tuple[str, str, Path, Path]) -> None:
        obj, cmd, cwd, out = job
        r = runner(cmd, cwd)  # type: ignore[operator]
        if r.returncode != 0 or not out.is_file():
            raise InputError(f"the ThinLTO backend of {obj} failed: {(r.stderr or r.stdout).strip()[-500:]}")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        for f in [ex.submit(one, j) for j in jobs_list]:
            f.result()
    return orig, new


_LLVM = re.compile(r"^(.*)\.llvm\.\d+$")


def _llvm_names(obj: Path) -> tuple[dict[str, list[str]], set[str]]:
    """``(base -> [name.llvm.<hash>, ...], all symbol names)`` of ``obj``."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    by_base: dict[str, list[str]] = {}
    names: set[str] = set()
    with obj.open("rb") as f:
        st = ELFFile(f).get_section_by_name(".symtab")
        if isinstance(st, SymbolTableSection):
            for s in st.iter_symbols():
                names.add(s.name)
                m = _LLVM.match(s.name)
                if m:
                    by_base.setdefault(m.group(1), []).append(s.name)
    return by_base, names


def stable_llvm_names(orig: Path, patched: Path) -> dict[str, str]:
    """Give the patched native object the original's ``.llvm.<hash>`` names, rewriting ``patched`` in place.

    ThinLTO promotes a local that another object imports to ``name.llvm.<hash>``, the hash being its module's
    (LLVM ``FunctionImportGlobalProcessing``): any edit of the defining file renames it, in that object and in
    every importer. The running kernel knows only the original name, so a patched ``name.llvm.<new>``
    (defined or referenced) becomes the original's ``name.llvm.<old>`` when the original has exactly one
    promoted symbol of that base name; the map ``{new: old}`` is returned (empty: nothing renamed).
    """
    old_by, _ = _llvm_names(orig)
    new_by, new_names = _llvm_names(patched)
    ren: dict[str, str] = {}
    for base, news in new_by.items():
        olds = old_by.get(base, [])
        if len(news) == 1 and len(olds) == 1 and news[0] != olds[0] and olds[0] not in new_names:
            ren[news[0]] = olds[0]
    if ren:
        args = [a for n, o in sorted(ren.items()) for a in ("--redefine-sym", f"{n}={o}")]
        r = run(["objcopy", *args, str(patched)], capture_output=True, text=True)
        if r.returncode != 0:
            raise InputError(f"objcopy could not rename the ThinLTO names of {patched.name}: {r.stderr.strip()}")
    return ren
