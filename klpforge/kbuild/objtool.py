"""The kernel's own objtool: found in a built tree, run the way Kbuild runs it, or built from a newer source.

Kbuild's flags (``scripts/Makefile.lib`` ``objtool-args``, Linux 6.1 and 6.12) follow the config:
``--hacks=jump_label`` (HAVE_JUMP_LABEL_HACK), ``--hacks=noinstr``, ``--hacks=skylake``
(CALL_DEPTH_TRACKING), ``--ibt`` (X86_KERNEL_IBT), ``--orc`` (UNWINDER_ORC), ``--retpoline``, ``--rethunk``,
``--sls``, ``--static-call`` (HAVE_STATIC_CALL_INLINE), ``--uaccess``, ``--prefix=N`` (PREFIX_SYMBOLS,
``FUNCTION_PADDING_BYTES``), ``--mcount``/``--mnop`` (FTRACE_MCOUNT_USE_OBJTOOL), then ``--link`` where objtool
runs on linked objects (``delay-objtool``: LTO_CLANG or X86_KERNEL_IBT) and ``--module`` for modules. The
6.1 and 6.12 spellings differ (``CONFIG_RETPOLINE`` became ``CONFIG_MITIGATION_RETPOLINE``): both are read.

:func:`fetch_objtool` builds objtool from Debian's ``linux-source-<ver>`` (6.12 by default: the ``--prefix``
of call padding exists from 6.2 on) into ``<cache>/objtool-<ver>``, downloading through klpforge's own apt root
(:mod:`klpforge.distro.apt`: the system's sources are never read or changed, the package is checked against the
signed index's SHA-256).

>>> objtool_args({"CONFIG_X86_KERNEL_IBT": "y", "CONFIG_UNWINDER_ORC": "y"}, module=True)
['--ibt', '--orc', '--link', '--module']
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import cache_dir
from ..util.proc import run

__all__ = ["read_config", "objtool_args", "delayed", "tree_objtool", "fetch_objtool", "run_objtool",
           "generated_tables", "link_ready", "ALREADY_HAS"]

# (config symbols, any of which enables it) -> objtool flag; order as scripts/Makefile.lib (6.12)
_FLAGS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("CONFIG_HAVE_JUMP_LABEL_HACK",), "--hacks=jump_label"),
    (("CONFIG_HAVE_NOINSTR_HACK",), "--hacks=noinstr"),
    (("CONFIG_MITIGATION_CALL_DEPTH_TRACKING", "CONFIG_CALL_DEPTH_TRACKING"), "--hacks=skylake"),
    (("CONFIG_X86_KERNEL_IBT",), "--ibt"),
    (("CONFIG_FINEIBT",), "--cfi"),
    (("CONFIG_FTRACE_MCOUNT_USE_OBJTOOL",), "--mcount"),
    (("CONFIG_HAVE_OBJTOOL_NOP_MCOUNT",), "--mnop"),
    (("CONFIG_UNWINDER_ORC",), "--orc"),
    (("CONFIG_MITIGATION_RETPOLINE", "CONFIG_RETPOLINE"), "--retpoline"),
    (("CONFIG_MITIGATION_RETHUNK", "CONFIG_RETHUNK"), "--rethunk"),
    (("CONFIG_MITIGATION_SLS", "CONFIG_SLS"), "--sls"),
    (("CONFIG_STACK_VALIDATION",), "--stackval"),
    (("CONFIG_HAVE_STATIC_CALL_INLINE",), "--static-call"),
    (("CONFIG_HAVE_UACCESS_VALIDATION",), "--uaccess"),
)


def read_config(path: Path) -> dict[str, str]:
    """``CONFIG_X`` -> value of a ``.config`` file (``y``, ``m``, numbers, quoted strings as written)."""
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def delayed(config: Mapping[str, str]) -> bool:
    """True when Kbuild runs objtool on linked objects only (the module, vmlinux.o), not per object:
    ``delay-objtool := $(or $(CONFIG_LTO_CLANG),$(CONFIG_X86_KERNEL_IBT))`` (6.1, 6.12)."""
    return config.get("CONFIG_LTO_CLANG") == "y" or config.get("CONFIG_X86_KERNEL_IBT") == "y"


def objtool_args(config: Mapping[str, str], module: bool, linked: bool | None = None) -> list[str]:
    """objtool's flags for an object of a kernel with ``config``, as Kbuild passes them (module docstring).
    ``linked``: the object is a linked one (default: whenever Kbuild delays objtool to the link)."""
    args = [flag for syms, flag in _FLAGS if any(config.get(s) == "y" for s in syms)]
    if config.get("CONFIG_PREFIX_SYMBOLS") == "y":
        args.append(f"--prefix={config.get('CONFIG_FUNCTION_PADDING_BYTES', '16')}")
    if config.get("CONFIG_GCOV_KERNEL") == "y" or config.get("CONFIG_KCOV") == "y":
        args.append("--no-unreachable")
    if delayed(config) if linked is None else linked:
        args.append("--link")
    if module:
        args.append("--module")
    return args


#: objtool flag -> the tables it writes (``create_*_sections``/``orc_create`` of tools/objtool/check.c and
#: orc_gen.c, 6.12 and 7.3: the same names). Each is made only when the file has none yet ("file already has
#: X, skipping"), so objtool over a linked object only writes a table no member brought along.
_TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("--static-call", (".static_call_sites",)),
    ("--retpoline", (".retpoline_sites",)),
    ("--cfi", (".cfi_sites",)),
    ("--rethunk", (".return_sites",)),
    ("--hacks=skylake", (".call_sites",)),
    ("--mcount", ("__mcount_loc",)),
    ("--ibt", (".ibt_endbr_seal",)),
    ("--orc", (".orc_unwind", ".orc_unwind_ip")),
)

#: What objtool prints when it skips a table because the file has one (tools/objtool/check.c, orc_gen.c).
ALREADY_HAS = "file already has"


def generated_tables(config: Mapping[str, str]) -> tuple[str, ...]:
    """The sections objtool writes for a module of a kernel with ``config`` (:data:`_TABLES`, flags as
    :func:`objtool_args`: ``--rethunk`` writes ``.return_sites`` and, with ``--hacks=skylake`` (call-depth
    tracking), ``.call_sites``).

    >>> generated_tables({"CONFIG_MITIGATION_RETHUNK": "y", "CONFIG_UNWINDER_ORC": "y"})
    ('.return_sites', '.orc_unwind', '.orc_unwind_ip')
    """
    flags = set(objtool_args(config, module=True))
    if "--rethunk" not in flags:
        flags.discard("--hacks=skylake")  # create_direct_call_sections runs inside the rethunk branch
    return tuple(t for flag, tables in _TABLES if flag in flags for t in tables)


def link_ready(obj: Path, out: Path, config: Mapping[str, str]) -> list[str]:
    """Write ``out``: ``obj`` as a member of a module whose objtool runs at the link
    (:func:`delayed`), i.e. as Kbuild hands objtool every member of an ordinary multi-object module -- without
    the tables objtool writes (:func:`generated_tables`) and, with ``--prefix``, without ``__pfx_`` symbols.

    A diff object of a single-object module (6.12 ``scripts/Makefile.lib``: ``objtool-enabled`` is
    ``is-single-obj-m`` when objtool is delayed, so ``pppoe.o`` went through objtool at compile time) carries
    these tables, cut to its functions. objtool at the link would then skip every table the object has
    ("file already has .return_sites, skipping"; ``.orc_unwind`` ends the run) and write none for the rest
    of the module: the live patch's own init/exit would keep unpatched ``jmp __x86_return_thunk`` ("Unpatched
    return thunk in use" at rmmod on 6.12) and have no ORC. Without them objtool writes every table for the
    whole linked module, exactly as for an ordinary module; it adds ``__pfx_`` for every function preceded by
    padding (``add_prefix_symbols``), so the ones the object has would be doubled. The padding bytes stay.
    Returns the names of the sections dropped (empty: ``out`` is a plain copy)."""
    from ..elf import ElfFile
    from ..elf import constants as C
    from ..elf.rewrite import Rewriter
    from ..util.fsutil import atomic_write

    tables = set(generated_tables(config))
    prefix = config.get("CONFIG_PREFIX_SYMBOLS") == "y"
    elf = ElfFile.open(obj, require_rel=True)
    drop = {i for i, n in enumerate(elf.section_names) if n in tables}
    drop |= {i for i in range(1, elf.shnum) if int(elf.shdrs["type"][i]) in (C.SHT_RELA, C.SHT_REL)
             and int(elf.shdrs["info"][i]) in drop}
    # a prefix symbol no relocation names (objtool's own never are): objtool makes it again
    named: set[int] = set()
    for i in range(1, elf.shnum):
        if int(elf.shdrs["type"][i]) in (C.SHT_RELA, C.SHT_REL) and i not in drop:
            named.update(int(s) for s in elf.relocs(i)["sym"].tolist())
    pfx = {i for i, n in enumerate(elf.sym_names) if prefix and n.startswith("__pfx_") and i not in named
           and int(elf.syms["info"][i]) & 0xF == C.STT_FUNC}
    if not drop and not pfx:
        shutil.copyfile(obj, out)
        return []
    rw = Rewriter(elf, drop_section=lambda i, n: i in drop, drop_symbol=lambda i, n: i in pfx)
    atomic_write(out, rw.build())
    return sorted({elf.section_names[i] for i in drop})


def tree_objtool(build: Path) -> Path | None:
    """The objtool a built kernel tree has (``tools/objtool/objtool`` of the build directory), else None."""
    p = Path(build) / "tools" / "objtool" / "objtool"
    return p if p.is_file() and os.access(p, os.X_OK) else None


def run_objtool(objtool: Path, args: list[str], obj: Path) -> subprocess.CompletedProcess[str]:
    """Run ``objtool <args> obj`` (it rewrites ``obj`` in place); output captured."""
    return run([str(objtool), *args, str(obj)], capture_output=True, text=True)


def _check(r: subprocess.CompletedProcess[str], what: str, log: Path | None = None) -> None:
    if r.returncode != 0:
        msg = [ln for ln in ((r.stderr or "") + (r.stdout or "")).splitlines() if ln.strip()]
        where = f" (see {log})" if log else ""
        raise InputError(f"{what} failed{where}: {msg[-1] if msg else f'exit {r.returncode}'}")


def fetch_objtool(version: str = "6.12",
                  cache: str | os.PathLike[str] | None = None) -> Path:
    """objtool built from Debian's ``linux-source-<version>`` of ``suite``, cached in
    ``<cache>/objtool-<version>/objtool`` (the newest ``linux-source-<version>`` any suite of
    :data:`klpforge.distro.apt.SUITES` has); built on first use (a 150 MB download, about a minute).

    Only ``tools/`` (and the x86 opcode map) is unpacked. Errors: :class:`InputError` naming the step
    (apt, unpacking, make) that failed."""
    root = cache_dir(f"objtool-{version}", cache=cache)
    out = root / "objtool"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    from ..distro.apt import apt_root  # klpforge's own apt root: verified against the signed index

    root.mkdir(parents=True, exist_ok=True)
    pkg = f"linux-source-{version}"
    apt = apt_root(cache)
    deb = apt.fetch(apt.record(pkg, apt.newest(pkg)), root / "debs")
    tmp = root / f".build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tarball = tmp / "src.tar.xz"
        _check(run(["bash", "-c", 'set -o pipefail; dpkg-deb --fsys-tarfile "$1" | tar -x -O "$2" > "$3"',
                    "bash", str(deb), f"./usr/src/{pkg}.tar.xz", str(tarball)], capture_output=True, text=True),
               f"unpacking {deb.name}")
        top = f"{pkg}"
        _check(run(["tar", "-xJf", str(tarball), "-C", str(tmp), "--wildcards", f"{top}/tools/*",
                    f"{top}/arch/x86/lib/*", f"{top}/arch/x86/tools/*", f"{top}/include/*",
                    f"{top}/arch/x86/include/*", f"{top}/scripts/*"],
                   capture_output=True, text=True), f"unpacking {pkg}.tar.xz")
        log = root / "build.log"
        with log.open("w") as f:
            r2 = run(["make", "-C", str(tmp / top / "tools" / "objtool"), "-j2"], stdout=f,
                     stderr=subprocess.STDOUT)
        if r2.returncode != 0:
            raise InputError(f"building objtool from {pkg} failed (see {log})")
        built = tmp / top / "tools" / "objtool" / "objtool"
        os.replace(built, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
