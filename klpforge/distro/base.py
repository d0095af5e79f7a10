"""What every distribution backend hands to the build: a prepared source tree and the shipped binaries.

>>> parse_distro_spec("debian:6.1.0-56-amd64")
('debian', '6.1.0-56-amd64')
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..util.errors import InputError
from ..util.proc import run

__all__ = ["DistroTree", "parse_distro_spec", "run_logged", "Say"]

Say = Callable[[str], None]


def parse_distro_spec(spec: str) -> tuple[str, str]:
    """Split ``NAME:RELEASE``; the release is a kernel release string (``uname -r``).

    >>> parse_distro_spec("debian:6.1.0-56-amd64")[1]
    '6.1.0-56-amd64'
    """
    name, sep, release = spec.partition(":")
    if not sep or not name or not re.fullmatch(r"[0-9][0-9A-Za-z.+_~-]*", release):
        raise InputError(f"--distro {spec!r}: expected NAME:RELEASE such as debian:6.1.0-56-amd64")
    return name.lower(), release


@dataclass
class DistroTree:
    """A distribution kernel prepared for single-object builds (no full build).

    ``src``: pristine source (never written to); ``build``: ``O=`` directory configured with the shipped
    config and ``make prepare modules_prepare`` done; ``config``: the shipped ``/boot/config-*``;
    ``release``: ``uname -r`` of the shipped kernel; ``image``: root of the unpacked kernel image package
    (``boot/``, ``lib/modules/<release>/``); ``headers``: directory to build external modules against
    (``make -C headers M=...``: the shipped vermagic and ``Module.symvers`` CRCs); ``modules``: a
    ``lib/modules/<release>`` directory overriding the image's (plain form); ``kcflags``: the
    ``KCFLAGS`` every ``make`` of ``build`` must use (changing them would rebuild ``prepare``).
    """

    src: Path
    build: Path
    config: Path
    release: str
    image: Path | None = None
    headers: Path | None = None
    vmlinuz: Path | None = None
    kcflags: str = ""
    lock: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    modules: Path | None = None

    @property
    def modules_dir(self) -> Path | None:
        """The shipped modules: ``modules`` if set, else ``lib/modules/<release>`` of the image package
        (``usr/lib/modules/<release>`` for Debian 13)."""
        if self.modules is not None:
            return self.modules
        if self.image is None:
            return None
        merged = self.image / "usr/lib/modules" / self.release  # Debian 13 ships them under /usr (usrmerge)
        return merged if merged.is_dir() else self.image / "lib/modules" / self.release

    @property
    def symvers(self) -> Path | None:
        """The shipped ``Module.symvers`` (exports and CRCs), from the headers package."""
        p = self.headers / "Module.symvers" if self.headers else None
        return p if p and p.is_file() else None


def run_logged(cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` appending its output to ``log``; raise :class:`InputError` with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        # klpforge.util.proc: make and every job it starts end with klpforge (a signal, SIGKILL included)
        r = run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        tail = [t.strip() for t in log.read_text(errors="replace").splitlines()[-12:] if t.strip()]
        raise InputError(f"`{' '.join(cmd[:4])} ...` failed (exit {r.returncode}); see {log}: "
                         + " | ".join(tail)[-500:])
