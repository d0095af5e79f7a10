"""A Debian package of one live patch, built with ``dpkg-deb`` (Debian Policy 3, 6 and 10; deb(5)).

Contents of ``<pkg>_<version>_<arch>.deb``:

* ``/usr/lib/klpforge/<release>/<name>.ko`` (+ ``<name>.klp`` for the loader, ``<name>.json``),
* ``/usr/lib/<pkg>/klpforge-load`` (the POSIX sh loader, :mod:`klpforge.host.unit`) and
  ``/usr/lib/systemd/system/<pkg>.service`` (``ConditionKernelVersion=<release>``), named after the package so
  that several patch packages install side by side without file conflicts,
* ``/usr/share/doc/<pkg>/``: ``klpforge-patch.json`` (the metadata below), ``patches/`` (the fix's patch files),
  ``copyright``.

Control: ``Depends: linux-image-<release> | linux-image-<release>-unsigned`` (Debian's signed and unsigned
image packages of that exact release), ``Section: kernel``, ``Klpforge-*`` fields (klpforge version,
release, module SHA-256, CVE ids). Maintainer scripts: ``postinst configure`` enables the unit and loads the
patch when the running kernel is the patch's (not in a chroot or with ``DPKG_ROOT``); ``prerm remove``
disables and unloads it (a failed unload fails the removal, so the package never disappears while its patch
stays applied; not with ``DPKG_ROOT``, which removes it from another tree); ``postrm`` disables/purges the unit.

Metadata: the fixes (patch files with their SHA-256, subject, upstream commits from ``From <sha>`` /
``commit <sha>`` / ``(cherry picked from commit <sha>)``, the commits a ``Fixes:`` tag names, CVE ids given
with ``--cve`` or written in the patch), the replaced functions per object (read from the module), klpforge's
version, and the build inputs' hashes where the build report or the module's ``.modinfo`` carries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..util.errors import InputError
from .inspect import PatchModule
from .store import PACKAGED, sidecar_text
from .unit import loader_script, unit_text

__all__ = ["DebSpec", "build_deb", "package_name", "deb_arch", "patch_metadata", "maintainer_scripts"]

_ARCH = {"x86_64": "amd64", "x64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64el",
         "s390x": "s390x", "loongarch64": "loong64"}
_CVE = re.compile(r"\bCVE-\d{4}-\d{4,}\b")
_SHA = r"([0-9a-f]{12,40})"
_UPSTREAM = [re.compile(r"^From " + _SHA + r" ", re.M), re.compile(r"^commit " + _SHA + r"\b", re.M),
             re.compile(r"cherry picked from commit " + _SHA), re.compile(r"^\s*[Uu]pstream commit:? " + _SHA, re.M)]
_FIXES = re.compile(r"^Fixes: " + _SHA + r"\b", re.M)
_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")
_PKG = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


@dataclass
class DebSpec:
    """What goes into the package beyond the module itself."""

    version: str = "1"
    package: str | None = None
    patches: list[Path] = field(default_factory=list)
    cves: list[str] = field(default_factory=list)
    report: Path | None = None
    maintainer: str | None = None
    before: list[str] = field(default_factory=list)


def package_name(pm: PatchModule) -> str:
    """``klp-<name>-<release>`` in Debian's package-name alphabet.

    >>> from klpforge.host.inspect import PatchModule
    >>> package_name(PatchModule(Path("x.ko"), "livepatch_fix", "6.1.0-56-amd64 SMP", True, [], True, False, "", {}))
    'klp-livepatch-fix-6.1.0-56-amd64'
    """
    raw = f"klp-{pm.name}-{pm.release}".lower().replace("_", "-")
    return re.sub(r"[^a-z0-9+.-]", "-", raw)


def deb_arch(ko: Path) -> str:
    """Debian architecture of the module's ELF machine (``amd64``, ``arm64``, ``ppc64el``, ``s390x``)."""
    from elftools.elf.elffile import ELFFile

    with ko.open("rb") as f:
        machine = ELFFile(f).get_machine_arch()
    key = {"x64": "x86_64", "AArch64": "aarch64", "PowerPC64": "ppc64le", "IBM S/390": "s390x",
           "LoongArch": "loongarch64"}.get(machine, machine)
    if key not in _ARCH:
        raise InputError(f"{ko}: no Debian architecture for ELF machine {machine!r}")
    return _ARCH[key]


def _patch_info(p: Path) -> dict[str, Any]:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"{p}: cannot read the patch ({e.strerror})") from None
    text = raw.decode(errors="replace")
    subject = next((ln[len("Subject:"):].strip() for ln in text.splitlines() if ln.startswith("Subject:")), "")
    commits: list[str] = []
    for rx in _UPSTREAM:
        commits += [m for m in rx.findall(text) if m not in commits and not set(m) <= {"0"}]
    return {"file": p.name, "sha256": hashlib.sha256(raw).hexdigest(), "subject": subject,
            "upstream_commits": commits, "fixes_commits": sorted(set(_FIXES.findall(text))),
            "cves": sorted(set(_CVE.findall(text)))}


def _provenance(pm: PatchModule, report: dict[str, Any] | None) -> dict[str, Any]:
    """Build inputs' hashes where something recorded them: ``klpforge*`` keys of ``.modinfo`` and a
    ``provenance``/``inputs`` object of the build report (whatever the build wrote, kept as is)."""
    out: dict[str, Any] = {k: v for k, v in pm.modinfo.items() if k.startswith("klpforge")}
    for key in ("provenance", "inputs", "build_inputs"):
        if report and key in report:
            out[key] = report[key]
    return out


def patch_metadata(pm: PatchModule, spec: DebSpec) -> dict[str, Any]:
    """The package's ``klpforge-patch.json``: module, kernel, fixes, CVEs, functions, provenance."""
    report: dict[str, Any] | None = None
    if spec.report is not None:
        try:
            report = json.loads(spec.report.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{spec.report}: not a readable build report ({e})") from None
        if not isinstance(report, dict):
            raise InputError(f"{spec.report}: not a build report (no JSON object)")
    fixes = [_patch_info(p) for p in spec.patches]
    for c in spec.cves:
        if not _CVE.fullmatch(c):
            raise InputError(f"--cve {c!r}: not a CVE id (CVE-YYYY-NNNN)")
    cves = sorted(set(spec.cves) | {c for f in fixes for c in f["cves"]})
    return {
        "module": pm.name, "kernel_release": pm.release, "vermagic": pm.vermagic, "module_sha256": pm.sha256,
        "replace": pm.replace, "signed": pm.signed,
        "objects": [{"object": o.name, "functions": [{"name": f.name, "sympos": f.sympos} for f in o.funcs]}
                    for o in pm.objects],
        "fixes": fixes, "cves": cves, "klpforge_version": __version__,
        "build_inputs": _provenance(pm, report),
    }


def maintainer_scripts(pkg: str, pm: PatchModule) -> dict[str, str]:
    """``postinst``, ``prerm`` and ``postrm`` (POSIX sh, ``set -e``)."""
    ko = f"/{PACKAGED}/{pm.release}/{pm.name}.ko"
    loader = f"/usr/lib/{pkg}/klpforge-load"
    unit = f"{pkg}.service"
    # DPKG_ROOT: dpkg --root --force-script-chrootless installs into another tree (an image): never touch the
    # running system's systemd or kernel then (deb-systemd-helper honours DPKG_ROOT itself)
    reload = ('if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then '
              'systemctl --system daemon-reload >/dev/null || true; fi\n')
    return {
        "postinst": f"""#!/bin/sh
# {pkg}: enable the boot unit, load the live patch into the running kernel if it is the patch's
set -e
if [ "$1" = configure ]; then
    {reload.strip()}
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        deb-systemd-helper unmask {unit} >/dev/null || true
        deb-systemd-helper enable {unit} >/dev/null || true
    fi
    if [ -n "${{DPKG_ROOT:-}}" ] || {{ command -v ischroot >/dev/null 2>&1 && ischroot; }}; then
        echo "{pkg}: not loading in a chroot; the patch loads at boot"
    elif [ "$(uname -r)" != "{pm.release}" ]; then
        echo "{pkg}: running kernel $(uname -r), patch for {pm.release}: loads when {pm.release} boots"
    elif [ ! -d /sys/kernel/livepatch ]; then
        echo "{pkg}: the running kernel has no /sys/kernel/livepatch: not loaded" >&2
    else
        {loader} load --defer {ko}
    fi
fi
exit 0
""",
        "prerm": f"""#!/bin/sh
# {pkg}: disable and unload the live patch before its files go (a failed unload stops the removal)
set -e
if {{ [ "$1" = remove ] || [ "$1" = deconfigure ]; }} && [ -z "${{DPKG_ROOT:-}}" ]; then
    if [ -d /sys/kernel/livepatch/{pm.name} ] || grep -q '^{pm.name} ' /proc/modules 2>/dev/null; then
        {loader} unload {pm.name}
    fi
fi
exit 0
""",
        "postrm": f"""#!/bin/sh
# {pkg}: forget the boot unit
set -e
if [ "$1" = remove ] || [ "$1" = purge ]; then
    {reload.strip()}
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        if [ "$1" = purge ]; then
            deb-systemd-helper purge {unit} >/dev/null || true
        else
            deb-systemd-helper disable {unit} >/dev/null || true
        fi
    fi
fi
exit 0
""",
    }


def _control(pkg: str, pm: PatchModule, spec: DebSpec, arch: str, meta: dict[str, Any], size_kib: int) -> str:
    funcs = [f"{o['object']}:{f['name']}" for o in meta["objects"] for f in o["functions"]]
    desc = [f"Live patch {pm.name} for Linux {pm.release}",
            f" Built by klpforge {__version__}. Replaces {len(funcs)} function(s): "
            f"{', '.join(funcs) or 'none listed'}."]
    for f in meta["fixes"]:
        desc.append(f" Fix: {f['file']}" + (f" ({f['subject']})" if f["subject"] else "")
                    + (f" upstream {' '.join(c[:12] for c in f['upstream_commits'])}" if f["upstream_commits"]
                       else ""))
    if meta["cves"]:
        desc.append(f" CVEs: {' '.join(meta['cves'])}")
    maint = spec.maintainer or os.environ.get("DEBEMAIL") and \
        f"{os.environ.get('DEBFULLNAME', 'klpforge user')} <{os.environ['DEBEMAIL']}>" or "klpforge <root@localhost>"
    lines = [
        f"Package: {pkg}", f"Version: {spec.version}", f"Architecture: {arch}", f"Maintainer: {maint}",
        f"Installed-Size: {size_kib}",
        f"Depends: linux-image-{pm.release} | linux-image-{pm.release}-unsigned",
        "Section: kernel", "Priority: optional",
        f"Klpforge-Version: {__version__}", f"Klpforge-Kernel-Release: {pm.release}",
        f"Klpforge-Module: {pm.name}", f"Klpforge-Module-SHA256: {pm.sha256}",
    ]
    if meta["cves"]:
        lines.append(f"Klpforge-CVEs: {' '.join(meta['cves'])}")
    lines.append("Description: " + desc[0])
    lines.extend(d.replace("\n", " ") for d in desc[1:])
    return "\n".join(lines) + "\n"


def build_deb(pm: PatchModule, spec: DebSpec, output: Path) -> Path:
    """Write the package to ``output`` (atomically: a temporary file in the same directory, renamed).

    Raises :class:`InputError` for a bad version or package name, unreadable patches or report, or a
    ``dpkg-deb`` failure (its message)."""
    if not _VERSION.match(spec.version):
        raise InputError(f"--version {spec.version!r}: not a Debian version (digits first, then [A-Za-z0-9.+~:-])")
    pkg = spec.package or package_name(pm)
    if not _PKG.match(pkg):
        raise InputError(f"--package-name {pkg!r}: not a Debian package name ([a-z0-9][a-z0-9+.-]+)")
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise InputError("dpkg-deb not found: install Debian's dpkg package")
    arch = deb_arch(pm.path)
    meta = patch_metadata(pm, spec)
    copyright_text = (f"Live patch {pm.name} for Linux {pm.release}, generated by klpforge {__version__}.\n"
                      "It is derived from the Linux kernel: GPL-2.0-only, see /usr/share/common-licenses/GPL-2.\n")
    with tempfile.TemporaryDirectory(prefix="klpforge-deb-") as td:
        root = Path(td) / "root"
        files: dict[str, tuple[bytes, int]] = {
            f"{PACKAGED}/{pm.release}/{pm.name}.ko": (pm.path.read_bytes(), 0o644),
            f"{PACKAGED}/{pm.release}/{pm.name}.klp": (sidecar_text(pm).encode(), 0o644),
            f"{PACKAGED}/{pm.release}/{pm.name}.json": ((json.dumps(meta, indent=1) + "\n").encode(), 0o644),
            f"usr/lib/{pkg}/klpforge-load": (loader_script().encode(), 0o755),
            f"usr/lib/systemd/system/{pkg}.service": (unit_text(
                f"/usr/lib/{pkg}/klpforge-load load --defer /{PACKAGED}/{pm.release}/{pm.name}.ko",
                f"Live patch {pm.name} for Linux {pm.release} (klpforge)", spec.before, pm.release).encode(),
                0o644),
            f"usr/share/doc/{pkg}/klpforge-patch.json": ((json.dumps(meta, indent=1) + "\n").encode(), 0o644),
            f"usr/share/doc/{pkg}/copyright": (copyright_text.encode(), 0o644),
        }
        for i, p in enumerate(spec.patches):
            files[f"usr/share/doc/{pkg}/patches/{i:02d}-{p.name}"] = (p.read_bytes(), 0o644)
        for rel, (data, mode) in files.items():
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            dest.chmod(mode)
        size_kib = sum((len(d) + 1023) // 1024 for d, _ in files.values())
        debian = root / "DEBIAN"
        debian.mkdir()
        (debian / "control").write_text(_control(pkg, pm, spec, arch, meta, size_kib))
        for name, text in maintainer_scripts(pkg, pm).items():
            (debian / name).write_text(text)
            (debian / name).chmod(0o755)
        for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        tmp_out = Path(tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)[1])
        try:
            r = subprocess.run([dpkg_deb, "--root-owner-group", "-Zxz", "--build", str(root), str(tmp_out)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                msg = (r.stderr.strip().splitlines() or ["failed"])[-1]
                raise InputError(f"dpkg-deb: {msg}")
            tmp_out.chmod(0o644)
            os.replace(tmp_out, output)
        finally:
            tmp_out.unlink(missing_ok=True)
    return output
