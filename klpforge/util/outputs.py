"""Output and input paths of every command, checked before any work, and written atomically.

A command names its outputs and inputs once (``{"-o": path, "--json": path}``); :func:`check_paths`
refuses, with one line and before anything is read or computed: an output that is an input (same
resolved path, or the same inode through another name or a hard link), two outputs that are one file,
an output that is a directory or whose directory is missing or not writable, and a missing input.
:func:`atomic_write` then writes each output whole or not at all.

>>> check_paths(outputs={"-o": Path("out.o"), "--json": Path("r.json")},
...             inputs={"ORIG": Path("a.o"), "PATCHED": Path("b.o")})
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import InputError
from .fsutil import GiB, MiB, atomic_write, check_regular_file

__all__ = ["check_paths", "check_output", "check_input", "atomic_write"]

PathArg = str | os.PathLike[str] | None


def _same(a: Path, b: Path) -> bool:
    """One file by name (resolved, symlinks followed) or by inode (hard links, bind mounts)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist yet: then only the name can make them one


def check_output(label: str, path: str | os.PathLike[str]) -> None:
    """Refuse an output path that cannot be written: a directory, a missing or read-only directory.

    Writes and removes one empty temporary file in the directory (the only test that also holds for
    root, read-only mounts and ACLs). Raises :class:`InputError` naming the option and the path."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{label} {p}: is a directory, expected a file name")
    parent = p.parent
    if not parent.exists():
        raise InputError(f"{label} {p}: directory {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{label} {p}: {parent} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".check", dir=parent)
    except OSError as e:
        raise InputError(f"{label} {p}: cannot write in {parent}: {e.strerror}") from None
    os.close(fd)
    os.unlink(tmp)
    if p.exists() and not os.access(p, os.W_OK) and os.geteuid() != 0:
        # atomic_write replaces the file, which would work, but the user made it read-only on purpose
        raise InputError(f"{label} {p}: the file is read-only")


#: Largest sane size of an input, by option (the first word of its label): a patch or a Module.symvers of
#: gigabytes is a mistake (``/dev/zero`` copied, the wrong file) that would only be read until memory runs
#: out. Objects, symbol tables and dumps have no limit: they are mapped, not read, or read line by line.
SIZE_LIMITS: dict[str, int] = {
    "patch": 256 * MiB, "--patch": 256 * MiB,  # the largest kernel patch series are a few MiB
    "--symvers": 256 * MiB,  # Debian 6.1's Module.symvers: 2 MiB
    "-c": 64 * MiB, "--config": 64 * MiB, "--xen-config": 64 * MiB,  # a kernel .config: 300 KiB
    "MOD.ko": 1 * GiB, "--kernel": 1 * GiB, "--preload": 1 * GiB, "--file": 1 * GiB,  # copied into an initramfs
}


def check_input(label: str, path: str | os.PathLike[str], kind: str = "file") -> None:
    """Refuse a missing input, one that is not a regular file (``kind="file"``) or a directory
    (``kind="dir"``; ``"any"``: either) -- a FIFO blocks a read for ever, ``/dev/zero`` never ends -- and a
    file larger than :data:`SIZE_LIMITS` for its option. Raises :class:`InputError` (one line)."""
    p = Path(path)
    check_regular_file(label, p, SIZE_LIMITS.get(label.split()[0]), kind)
    if not os.access(p, os.R_OK):
        raise InputError(f"{label} {p}: permission denied")


def check_paths(outputs: Mapping[str, PathArg], inputs: Mapping[str, PathArg] | None = None,
                kinds: Mapping[str, str] | None = None, reads: tuple[str, ...] = ()) -> None:
    """Check every output and input of a command before it starts (None entries are skipped).

    ``outputs``/``inputs`` map the option that names a path (``-o``, ``--json``, ``ORIG``) to the path;
    ``kinds`` gives an input's kind for :func:`check_input` (default ``"file"``). Raises
    :class:`InputError` with one line on the first problem: an input that is missing, an output that
    is also an input or another output, or an output that cannot be written. ``reads``: suffixes of the
    files the command reads from input directories (``.o``, ``.ipa-clones``); an existing such file under
    an input directory counts as an input too."""
    ins = {k: Path(v) for k, v in (inputs or {}).items() if v is not None}
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    for label, p in ins.items():
        check_input(label, p, (kinds or {}).get(label, "file"))
    seen: dict[str, Path] = {}
    for label, p in outs.items():
        for ilabel, ip in ins.items():
            if _same(p, ip):
                raise InputError(f"{label} {p} would overwrite the input {ilabel} {ip}")
            if reads and p.name.endswith(reads) and p.is_file() and ip.is_dir() and \
                    p.resolve().is_relative_to(ip.resolve()):
                raise InputError(f"{label} {p} would overwrite a file read from the input {ilabel} {ip}")
        for olabel, op in seen.items():
            if _same(p, op):
                raise InputError(f"{label} {p} and {olabel} {op} are the same file")
        check_output(label, p)
        seen[label] = p
