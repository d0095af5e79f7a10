"""Distribution kernels: fetch what a distribution ships for one kernel release, prepare its source
without a full build, and build/verify live patches against the shipped binaries.

``--distro NAME:RELEASE`` (e.g. ``debian:6.1.0-56-amd64``) picks a backend with :func:`backend_for`.
"""

from __future__ import annotations

from types import ModuleType

from .base import DistroTree, parse_distro_spec

__all__ = ["DistroTree", "parse_distro_spec", "backend_for"]


def backend_for(spec: str) -> tuple[ModuleType, str]:
    """The backend module for ``NAME:RELEASE`` and the release: ``(module, release)``.

    Raises :class:`~klpforge.util.errors.InputError` for an unknown distribution.
    """
    from ..util.errors import InputError

    name, release = parse_distro_spec(spec)
    if name == "debian":
        from . import debian

        return debian, release
    raise InputError(f"--distro {spec}: no backend for {name!r} (known: debian); "
                     "use the plain form -s SRC -c CONFIG --symbols FILE --symvers FILE")
