"""The systemd unit that loads live patches at boot, and the shell loader it runs.

The unit is a oneshot early in boot (``DefaultDependencies=no``, after local file systems and
``systemd-modules-load.service`` so the modules named in ``/etc/modules-load.d`` are in and their patches
apply at once, ``Before=sysinit.target`` and before any unit the user names), ``RemainAfterExit=yes`` so
``systemctl status`` keeps its log; the loader prints one line per patch and step on stdout, which the
journal records. ``ConditionKernelVersion=`` (systemd 236+) skips a packaged patch after the kernel changed.

The loader (``klpforge/data/host/klpforge-load``) is POSIX sh so that hosts need no Python.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..util.errors import InputError

__all__ = ["loader_script", "loader_path", "unit_text", "UNIT_NAME", "check_unit_names"]

UNIT_NAME = "klpforge.service"

_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.(service|target|socket|mount|path|timer|device|scope|slice)$")


def loader_path() -> Path:
    """The shipped loader script."""
    return Path(str(resources.files("klpforge") / "data" / "host" / "klpforge-load"))


def loader_script() -> str:
    """The loader's text."""
    return loader_path().read_text()


def check_unit_names(names: list[str]) -> list[str]:
    """``names`` if each is a unit name systemd accepts (``x.service``), else :class:`InputError`."""
    for n in names:
        if not _UNIT_RE.match(n):
            raise InputError(f"--before {n!r}: not a systemd unit name (e.g. nginx.service)")
    return names


def unit_text(exec_start: str, description: str, before: Sequence[str] = (), kernel_release: str | None = None,
              timeout_s: int = 300) -> str:
    """A unit running ``exec_start`` once at boot.

    >>> print(unit_text("/usr/lib/klpforge/klpforge-load boot", "Load live patches").splitlines()[0])
    [Unit]
    """
    before_line = " ".join(["sysinit.target", "shutdown.target", *before])
    cond = f"ConditionKernelVersion={kernel_release}\n" if kernel_release else ""
    return f"""[Unit]
Description={description}
Documentation=man:klpforge-load(1) man:klpforge-install(1)
DefaultDependencies=no
After=local-fs.target systemd-modules-load.service
Before={before_line}
Conflicts=shutdown.target
ConditionPathIsDirectory=/sys/kernel/livepatch
{cond}
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={exec_start}
TimeoutStartSec={int(timeout_s)}
StandardOutput=journal+console

[Install]
WantedBy=sysinit.target
"""
