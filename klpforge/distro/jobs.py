"""One fix for every supported codestream: a job list, one independent job per kernel release.

klpforge has no scheduler: on one machine the jobs run one after the other (each release has its own cached
tree, so they never share state); past one machine the list is handed to an existing engine -- a CI matrix or
Kubernetes Indexed Jobs (``docs/distro.md`` has both recipes).

>>> [j["release"] for j in job_list(["debian:6.1.0-56-amd64", "debian:6.1.0-57-amd64"], ["fix.patch"],
...                                  "livepatch-{release}.ko")]
['6.1.0-56-amd64', '6.1.0-57-amd64']
"""

from __future__ import annotations

import re
from typing import Any

from ..util.errors import InputError
from .base import parse_distro_spec

__all__ = ["job_list", "output_for"]


def output_for(template: str | None, stem: str, release: str, several: bool) -> str:
    """The output file of one release: ``{release}`` in ``template`` is replaced; with several releases and no
    placeholder the release is inserted before ``.ko``.

    >>> output_for("cves.ko", "fix", "6.1.0-56-amd64", True)
    'cves-6.1.0-56-amd64.ko'
    """
    out = template or f"livepatch-{stem}.ko"
    if "{release}" in out:
        return out.replace("{release}", release)
    if several:
        return re.sub(r"(\.ko)?$", f"-{release}.ko", out, count=1)
    return out


def job_list(distros: list[str], patches: list[str], output: str | None, extra: list[str] | None = None
             ) -> list[dict[str, Any]]:
    """One job per release: ``name`` (a DNS-1123 label, usable as a Kubernetes/CI job name), ``distro``,
    ``release``, ``output`` and ``argv`` (the ``klpforge build`` command the job runs)."""
    if not distros:
        raise InputError("no --distro given")
    seen: set[tuple[str, str]] = set()
    jobs = []
    stem = patches[0].rsplit("/", 1)[-1].removesuffix(".patch").removesuffix(".diff") if patches else "fix"
    for d in distros:
        name, release = parse_distro_spec(d)
        if (name, release) in seen:
            continue
        seen.add((name, release))
        out = output_for(output, stem, release, len(distros) > 1)
        jobs.append({"name": re.sub(r"[^a-z0-9-]", "-", f"klp-{name}-{release}".lower())[:63].strip("-"),
                     "distro": f"{name}:{release}", "release": release, "output": out,
                     "argv": ["klpforge", "build", "--distro", f"{name}:{release}", *patches, "-o", out,
                              *(a.replace("{release}", release) for a in extra or [])]})
    return jobs
