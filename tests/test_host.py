"""The host side (issue 20): install, load, unload, list, info, package --format deb, man pages, completion.

Quick tests need no kernel: the man pages and the bash completion against the parser they come from, the
shell loader's syntax under dash and busybox. Kernel tests build real live patches on the cached 6.1 test
kernel (``klpforge build``), inspect them against the build's own report, install them into a directory,
package them with dpkg-deb (fields, contents, scripts with ``sh -n``, the unit with ``systemd-analyze
verify``), and then boot the test kernel under QEMU with the package's files and the installed store in a
busybox initramfs: the package's own ``postinst``/``prerm`` and the units' ``ExecStart`` commands run there
against the real kernel (load, refusals, cumulative replacement, unload, boot loading), and the guest's
``/sys/kernel/livepatch`` and ``/proc/modules``, copied back, are read by ``klpforge list``.

The guest has no Python and no dpkg: the CLI's Python part (checks, ``list``) is tested on the host (against
the host's running kernel, and against the guest's sysfs copy), the shell part (what runs on a fleet host)
in the guest.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from klpforge.cli import _parser
from klpforge.host.manpage import man_pages, options_of, subcommands
from klpforge.host.unit import loader_path
from klpforge.kbuild.prepare import KernelLayout

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "tests" / "kernel_patches"


def klpforge(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=timeout)


# ---------------------------------------------------------------- quick: man pages, completion, loader syntax

def test_man_pages_document_every_command_and_option(tmp_path: Path) -> None:
    r = klpforge("man", "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    parser = _parser()
    cmds = subcommands(parser)
    for name in ("install", "load", "unload", "list", "info", "package", "build", "verify", "diff"):
        assert name in cmds
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["klpforge.1", *(f"klpforge-{c}.1" for c in cmds)])
    for c, p in cmds.items():
        page = (tmp_path / f"klpforge-{c}.1").read_text()
        # no hyphenation, long lines: the text can be searched for each help string
        rendered = subprocess.run(["groff", "-man", "-ww", "-rHY=0", "-rLL=400n", "-Tutf8", "-P-cbou",
                                   str(tmp_path / f"klpforge-{c}.1")],
                                  capture_output=True, text=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
        assert rendered.returncode == 0 and not rendered.stderr, (c, rendered.stderr)
        text = re.sub(r"\s+", " ", rendered.stdout.replace("\u2010", "-").replace("\u2212", "-"))
        for opt in options_of(p):  # every option the parser accepts is documented, with its help
            assert opt in text, f"klpforge-{c}.1 lacks {opt}"
        for a in p._actions:
            if a.help and a.option_strings and a.help != "==SUPPRESS==":
                assert re.sub(r"\s+", " ", a.help.split("(")[0])[:40].strip() in text, (c, a.help)
        assert p.description is None or re.sub(r"\s+", " ", p.description)[:50] in text
        assert page.startswith(f".TH KLPFORGE\\-{c.upper().replace('-', chr(92) + '-')} 1 ")
    # the page printed for one command is the same generator's output
    one = klpforge("man", "--page", "package")
    assert one.stdout == (tmp_path / "klpforge-package.1").read_text()
    assert man_pages(parser)["klpforge-package.1"] == one.stdout
    bad = klpforge("man", "--page", "nosuch")
    assert bad.returncode == 1 and "no man page 'nosuch'" in bad.stderr and bad.stdout == ""


def _complete(script: Path, words: list[str], cwd: Path) -> list[str]:
    arr = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    cmd = f"source {script}; COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; _klpforge; " \
          'printf "%s\\n" "${COMPREPLY[@]}"'
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_bash_completion_from_the_parser(tmp_path: Path) -> None:
    r = klpforge("completion", "bash")
    assert r.returncode == 0, r.stderr
    script = tmp_path / "klpforge.bash"
    script.write_text(r.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    (tmp_path / "livepatch-fix.ko").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    parser = _parser()
    cmds = subcommands(parser)
    assert set(_complete(script, ["klpforge", ""], tmp_path)) >= set(cmds)
    assert _complete(script, ["klpforge", "unl"], tmp_path) == ["unload"]
    assert set(_complete(script, ["klpforge", "package", "x.ko", "--"], tmp_path)) == \
        {o for o in options_of(cmds["package"]) if o.startswith("--")}
    assert _complete(script, ["klpforge", "package", "x.ko", "--format", ""], tmp_path) == ["deb"]
    assert _complete(script, ["klpforge", "load", "live"], tmp_path) == ["livepatch-fix.ko"]
    assert _complete(script, ["klpforge", "kernel", ""], tmp_path) == ["prepare"]


@pytest.mark.parametrize("shell", [["sh", "-n"], ["busybox", "sh", "-n"], ["bash", "--posix", "-n"]])
def test_loader_is_posix_sh(shell: list[str]) -> None:
    if shutil.which(shell[0]) is None:
        pytest.skip(f"{shell[0]} not installed")
    r = subprocess.run([*shell, str(loader_path())], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_loader_usage_errors(tmp_path: Path) -> None:
    sh = [shutil.which("sh") or "/bin/sh", str(loader_path())]
    r = subprocess.run([*sh, "load", "--timeout", "x", "a.ko"], capture_output=True, text=True)
    assert r.returncode == 1 and "--timeout: not a whole number of seconds: x" in r.stderr
    r = subprocess.run([*sh, "load", str(tmp_path / "none.ko")], capture_output=True, text=True)
    assert r.returncode == 1 and "none.ko: no such file" in r.stderr
    r = subprocess.run([*sh, "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 1 and "usage:" in r.stderr
    # boot with nothing installed for this release: says so, succeeds
    r = subprocess.run([*sh, "boot"], capture_output=True, text=True,
                       env={**os.environ, "KLPFORGE_STORE": str(tmp_path)})
    assert r.returncode == 0 and "no live patches installed for" in r.stdout


def test_commands_on_nothing(tmp_path: Path) -> None:
    """list on an empty root, info/unload of a patch that does not exist: one line, the documented code."""
    r = klpforge("list", "--root", str(tmp_path))
    assert r.returncode == 0 and r.stdout == "no live patches installed or loaded\n", r.stdout + r.stderr
    r = klpforge("list", "--root", str(tmp_path), "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = klpforge("info", "livepatch_none", "--root", str(tmp_path))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"klpforge info: livepatch_none: no such live patch (not installed under {tmp_path}, " \
                       "not loaded)\n"
    # the real loader against this machine's kernel: nothing of that name is loaded, nothing is touched
    r = klpforge("unload", "livepatch-none-xyz")
    assert r.returncode == 1 and "klpforge-load: livepatch_none_xyz: not loaded" in r.stderr
    r = klpforge("load", str(tmp_path / "missing.ko"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.ko: cannot read" in r.stderr
    (tmp_path / "junk.ko").write_bytes(b"\x7fELF" + b"\0" * 60)
    r = klpforge("package", str(tmp_path / "junk.ko"), "--format", "deb", cwd=tmp_path)
    assert r.returncode == 1 and "junk.ko: not a readable kernel module" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.ko"]


# ---------------------------------------------------------------- kernel: real live patches

@pytest.fixture(scope="module")
def built(kernel: KernelLayout, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Live patches built by klpforge on the test kernel: for vmlinux, for a module, and for ``do_wait``
    (where a waiting shell sleeps: its transition blocks)."""
    d = tmp_path_factory.mktemp("host-built")
    out: dict[str, Path] = {}
    for key, patch in (("cmdline", "01-cmdline-text.patch"), ("kobj", "05-kobject-module-function.patch"),
                       ("dowait", "12-do-wait-sleeping.patch")):
        ko = d / f"livepatch-{key}.ko"
        r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(PATCHES / patch), "-o", str(ko),
                     "--json", str(ko.with_suffix(".json")), "-j2")
        assert r.returncode == 0, r.stderr[-3000:]
        out[key] = ko
    return out


def _release(ko: Path) -> str:
    from klpforge.host.inspect import inspect_module

    return inspect_module(ko).release


@pytest.mark.kernel
def test_inspect_matches_the_build_report(built: dict[str, Path], kernel: KernelLayout) -> None:
    from klpforge.host.inspect import inspect_module

    release = (kernel.build / "include/config/kernel.release").read_text().strip()
    for ko in built.values():
        pm = inspect_module(ko)
        report = json.loads(ko.with_suffix(".json").read_text())
        want: dict[str, set[tuple[str, int]]] = {}
        for o in report["objects"]:
            want.setdefault(o["target"], set()).update((f["old_name"], f["sympos"]) for f in o["functions"])
        got = {o.name: {(f.name, f.sympos) for f in o.funcs} for o in pm.objects}
        assert {k: v for k, v in got.items() if v} == want
        assert pm.livepatch and pm.replace is True and not pm.signed
        assert pm.release == release
        assert pm.name == report["module"].replace("-", "_")
    r = klpforge("info", str(built["kobj"]), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["state"] == "not loaded" and d["module"]["objects"][0]["name"] == "kobject_example"


@pytest.mark.kernel
@pytest.mark.parametrize("enforce", ["sig_enforce", "lockdown"])
def test_load_checks_against_a_kernel_state(built: dict[str, Path], tmp_path: Path, enforce: str) -> None:
    """The checks ``load`` makes, against kernel files laid out as sysfs/procfs do (the layout of the test
    kernel's own, see the lifecycle test): signatures enforced by the module parameter or by lockdown, a
    target module missing, a replaced module still loaded."""
    from klpforge.host.checks import load_reasons
    from klpforge.host.inspect import inspect_module
    from klpforge.host.sysfs import read_state

    rel = _release(built["kobj"])
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text(rel + "\n")
    (tmp_path / "sys/kernel/livepatch").mkdir(parents=True)
    if enforce == "sig_enforce":
        (tmp_path / "sys/module/module/parameters").mkdir(parents=True)
        (tmp_path / "sys/module/module/parameters/sig_enforce").write_text("Y\n")
    else:
        (tmp_path / "sys/kernel/security").mkdir(parents=True)
        (tmp_path / "sys/kernel/security/lockdown").write_text("none [integrity] confidentiality\n")
    (tmp_path / "sys/module/livepatch_kobj").mkdir(parents=True)
    (tmp_path / "sys/module/livepatch_kobj/taint").write_text("K\n")
    (tmp_path / "proc/modules").write_text("livepatch_kobj 16384 0 - Live 0xffffffffa0010000 (K)\n")
    pm = inspect_module(built["kobj"])
    st = read_state(tmp_path)
    assert st.sig_enforced and st.livepatch_modules == ["livepatch_kobj"]
    assert load_reasons(pm, st) == [
        "livepatch_kobj: module loaded but not an active live patch (replaced or disabled): unload it first",
        "livepatch_kobj: target module(s) not loaded: kobject_example (the kernel would patch them when they "
        "load; use --defer to allow that)",
        f"livepatch_kobj: the kernel enforces module signatures and {built['kobj']} is not signed"]
    (tmp_path / "proc/modules").write_text("kobject_example 16384 0 - Live 0xffffffffa000b000\n")
    signed = tmp_path / "signed.ko"
    signed.write_bytes(built["kobj"].read_bytes() + b"\0" * 12 + b"~Module signature appended~\n")
    assert load_reasons(inspect_module(signed), read_state(tmp_path)) == []


@pytest.mark.kernel
def test_install_into_a_root_and_refusals(built: dict[str, Path], kernel: KernelLayout, tmp_path: Path) -> None:
    rel = _release(built["cmdline"])
    root = tmp_path / "root"
    for key in ("cmdline", "kobj"):
        r = klpforge("install", str(built[key]), "--kernel-release", rel, "--root", str(root),
                     "--before", "nginx.service")
        assert r.returncode == 0, r.stderr
    store = root / "var/lib/klpforge" / rel
    assert (store / "load-order").read_text().split() == ["livepatch_cmdline", "livepatch_kobj"]
    assert (store / "livepatch_kobj.ko").read_bytes() == built["kobj"].read_bytes()
    assert oct((store / "livepatch_kobj.ko").stat().st_mode & 0o777) == "0o644"
    assert "objects=kobject_example\n" in (store / "livepatch_kobj.klp").read_text()
    unit = (root / "etc/systemd/system/klpforge.service").read_text()
    assert "ExecStart=/usr/local/lib/klpforge/klpforge-load boot" in unit
    assert re.search(r"^Before=.*\bnginx\.service\b", unit, re.M)
    assert (root / "etc/systemd/system/sysinit.target.wants/klpforge.service").is_symlink()
    assert os.access(root / "usr/local/lib/klpforge/klpforge-load", os.X_OK)
    # reinstalling moves it to the end of the load order (the last cumulative patch wins)
    assert klpforge("install", str(built["cmdline"]), "--kernel-release", rel, "--root", str(root)).returncode == 0
    assert (store / "load-order").read_text().split() == ["livepatch_kobj", "livepatch_cmdline"]
    lst = klpforge("list", "--root", str(root), "--all", "--json")
    assert lst.returncode == 0, lst.stderr
    rows = {r["name"]: r for r in json.loads(lst.stdout)}
    assert rows["livepatch_cmdline"]["replaces"] == ["livepatch_kobj"]
    assert rows["livepatch_kobj"]["installed"] == "store"

    # refusals: another release, not a live patch, a bad unit name; nothing installed by them
    other = klpforge("install", str(built["cmdline"]), "--kernel-release", "6.1.0-99-amd64", "--root",
                     str(tmp_path / "r2"))
    assert other.returncode == 2
    assert f"livepatch_cmdline: built for kernel {rel}, not 6.1.0-99-amd64" in other.stderr
    assert not (tmp_path / "r2").exists()
    plain = kernel.build / "samples/kobject/kobject-example.ko"
    notlp = klpforge("install", str(plain), "--kernel-release", rel, "--root", str(tmp_path / "r3"))
    assert notlp.returncode == 2 and "not a livepatch module (no livepatch=Y in .modinfo)" in notlp.stderr
    badunit = klpforge("install", str(built["cmdline"]), "--kernel-release", rel, "--root", str(tmp_path / "r4"),
                       "--before", "x; rm -rf /")
    assert badunit.returncode == 1 and "not a systemd unit name" in badunit.stderr


@pytest.mark.kernel
def test_load_refuses_a_patch_for_another_kernel(built: dict[str, Path]) -> None:
    """Python's checks against this machine's running kernel (not the test kernel): refused before insmod."""
    rel = _release(built["cmdline"])
    running = os.uname().release
    if running == rel:
        pytest.skip("the host runs the test kernel")
    r = klpforge("load", str(built["cmdline"]))
    assert r.returncode == 2, r.stderr
    assert f"refused: livepatch_cmdline: built for kernel {rel}, not {running}" in r.stderr
    assert r.stderr.count("\n") == 1


def _deb(built: dict[str, Path], key: str, out: Path, *extra: str) -> Path:
    r = klpforge("package", str(built[key]), "--format", "deb", *extra, cwd=out)
    assert r.returncode == 0, r.stderr
    deb = out / r.stdout.strip()
    assert deb.is_file() and deb.parent == out
    return deb


@pytest.mark.kernel
def test_package_deb(built: dict[str, Path], tmp_path: Path) -> None:
    rel = _release(built["cmdline"])
    fix = tmp_path / "0001-proc-cmdline.patch"
    fix.write_text("From 3f1c2a9d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39 Mon Sep 17 00:00:00 2001\n"
                   "Subject: [PATCH] proc: mark the command line (CVE-2099-0001)\n\n"
                   "Fixes: 0123456789ab (\"proc: add cmdline\")\n"
                   + (PATCHES / "01-cmdline-text.patch").read_text())
    out = tmp_path / "out"
    out.mkdir()
    deb = _deb(built, "cmdline", out, "--version", "1.2~test", "--patch", str(fix), "--cve", "CVE-2099-0002",
               "--report", str(built["cmdline"].with_suffix(".json")))
    pkg = f"klp-livepatch-cmdline-{rel}"
    assert deb.name == f"{pkg}_1.2~test_amd64.deb"

    def field(name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert field("Package") == pkg and field("Version") == "1.2~test" and field("Architecture") == "amd64"
    assert field("Depends").split(" | ")[0] == f"linux-image-{rel}"
    assert field("Klpforge-CVEs") == "CVE-2099-0001 CVE-2099-0002"
    assert "cmdline_proc_show" in field("Description")
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = {ln.split()[-1].lstrip(".") for ln in listing.splitlines()}
    for p in (f"/usr/lib/klpforge/{rel}/livepatch_cmdline.ko", f"/usr/lib/{pkg}/klpforge-load",
              f"/usr/lib/systemd/system/{pkg}.service", f"/usr/share/doc/{pkg}/klpforge-patch.json",
              f"/usr/share/doc/{pkg}/patches/00-0001-proc-cmdline.patch", f"/usr/share/doc/{pkg}/copyright"):
        assert p in paths, p
    x = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
    ctl = tmp_path / "ctl"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True)
    assert (x / f"usr/lib/klpforge/{rel}/livepatch_cmdline.ko").read_bytes() == built["cmdline"].read_bytes()
    for script in ("postinst", "prerm", "postrm"):
        s = ctl / script
        assert os.access(s, os.X_OK)
        for sh in (["sh", "-n"], ["busybox", "sh", "-n"]):
            r = subprocess.run([*sh, str(s)], capture_output=True, text=True)
            assert r.returncode == 0, (script, r.stderr)
    assert f"/usr/lib/{pkg}/klpforge-load load --defer /usr/lib/klpforge/{rel}/livepatch_cmdline.ko" in \
        (ctl / "postinst").read_text()
    assert f"/usr/lib/{pkg}/klpforge-load unload livepatch_cmdline" in (ctl / "prerm").read_text()
    meta = json.loads((x / f"usr/share/doc/{pkg}/klpforge-patch.json").read_text())
    assert meta["objects"] == [{"object": "vmlinux", "functions": [{"name": "cmdline_proc_show", "sympos": 0}]}]
    assert meta["fixes"][0]["upstream_commits"] == ["3f1c2a9d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39"]
    assert meta["fixes"][0]["fixes_commits"] == ["0123456789ab"]
    assert meta["fixes"][0]["sha256"] == __import__("hashlib").sha256(fix.read_bytes()).hexdigest()
    assert meta["cves"] == ["CVE-2099-0001", "CVE-2099-0002"] and meta["kernel_release"] == rel
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={x}",
                            f"/usr/lib/systemd/system/{pkg}.service"], capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # refusals: bad version, bad CVE id, an existing directory as -o; no file left behind
    for args, msg in ((["--version", "v1"], "--version 'v1': not a Debian version"),
                      (["--cve", "CVE-12"], "--cve 'CVE-12': not a CVE id"),
                      (["-o", str(out)], "is a directory")):
        r = klpforge("package", str(built["cmdline"]), "--format", "deb", *args, cwd=out)
        assert r.returncode == 1 and msg in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [deb.name]


@pytest.mark.kernel
def test_deb_installs_and_removes_with_dpkg_root(built: dict[str, Path], tmp_path: Path) -> None:
    """dpkg itself installs, configures, removes and purges the package in a separate root (maintainer
    scripts run with DPKG_ROOT: the unit is enabled inside the root, the running system is not touched)."""
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg not installed")
    rel = _release(built["cmdline"])
    deb = _deb(built, "cmdline", tmp_path)
    pkg = deb.name.split("_")[0]
    root = tmp_path / "root"
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "var/lib/dpkg/updates").mkdir()
    (root / "var/lib/dpkg/status").write_text("")
    dpkg = ["dpkg", f"--root={root}", "--force-not-root", "--force-script-chrootless"]
    r = subprocess.run([*dpkg, "--force-depends", "-i", str(deb)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{pkg}: not loading in a chroot; the patch loads at boot" in r.stdout
    assert f"depends on linux-image-{rel} | linux-image-{rel}-unsigned" in r.stderr  # the exact kernel
    assert (root / f"usr/lib/klpforge/{rel}/livepatch_cmdline.ko").read_bytes() == built["cmdline"].read_bytes()
    wants = root / f"etc/systemd/system/sysinit.target.wants/{pkg}.service"
    if shutil.which("deb-systemd-helper"):
        assert wants.is_symlink() and os.readlink(wants) == f"/usr/lib/systemd/system/{pkg}.service"
    st = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Status}", pkg],
                        capture_output=True, text=True)
    assert st.stdout == "install ok installed", st.stdout + st.stderr
    # without --force-depends dpkg refuses it where the kernel image is not installed
    root2 = tmp_path / "root2"
    shutil.copytree(root, root2, symlinks=True, ignore=shutil.ignore_patterns("usr", "etc"))
    (root2 / "var/lib/dpkg/status").write_text("")
    for f in (root2 / "var/lib/dpkg/info").iterdir():
        f.unlink()
    r2 = subprocess.run(["dpkg", f"--root={root2}", "--force-not-root", "--force-script-chrootless", "-i",
                         str(deb)], capture_output=True, text=True)
    assert r2.returncode != 0 and f"linux-image-{rel}" in r2.stderr
    r = subprocess.run([*dpkg, "-P", pkg], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (root / "usr/lib/klpforge").exists() or not any((root / "usr/lib/klpforge").rglob("*.ko"))
    assert not wants.exists()


# ---------------------------------------------------------------- kernel: the lifecycle in a booted guest

def _guest_script(nonce: str, pkg: str, rel: str, deb_exec: str, store_exec: str) -> str:
    """Phases, each reported as ``<nonce>:RUN:<name>:<rc>`` with its output between BEGIN/END markers, and
    state dumps (``<nonce>:DIR:``/``<nonce>:FILE:`` lines) of /sys/kernel/livepatch, /proc/modules, taints."""
    info = "/var/lib/dpkg/info"
    return f"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
M={nonce}
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/printk
chmod 755 /usr/lib/{pkg}/klpforge-load /usr/local/lib/klpforge/klpforge-load {info}/*
run() {{ n=$1; shift; echo "$M:BEGIN:$n"; "$@" 2>&1; rc=$?; echo "$M:RUN:$n:$rc"; }}
dump() {{
    echo "$M:DUMP:$1"
    for d in $(find /sys/kernel/livepatch -type d); do echo "$M:DIR:$d"; done
    for f in $(find /sys/kernel/livepatch -type f) /proc/modules /proc/sys/kernel/osrelease; do
        echo "$M:FILE:$f"; cat "$f" 2>/dev/null
    done
    for m in $(cut -d' ' -f1 /proc/modules); do echo "$M:FILE:/sys/module/$m/taint"; cat /sys/module/$m/taint; done
    echo "$M:DUMP-END"
}}
run postinst sh {info}/{pkg}.postinst configure
run cmdline-patched cat /proc/cmdline
dump A
run missing-target /usr/lib/{pkg}/klpforge-load load /lib/klp/livepatch-kobj.ko
run other-release /usr/lib/{pkg}/klpforge-load load /lib/klp/livepatch-other.ko
insmod /lib/klp/kobject-example.ko
run replace /usr/lib/{pkg}/klpforge-load load /lib/klp/livepatch-kobj.ko
run kobj-patched cat /sys/kernel/kobject_example/foo
dump C
run prerm sh {info}/{pkg}.prerm remove
run unload /usr/lib/{pkg}/klpforge-load unload livepatch_kobj
run cmdline-unpatched cat /proc/cmdline
dump D
run boot-unit {store_exec}
run deb-unit {deb_exec}
run cmdline-boot cat /proc/cmdline
run unload-again /usr/local/lib/klpforge/klpforge-load unload livepatch_cmdline
run not-loaded /usr/local/lib/klpforge/klpforge-load unload livepatch_cmdline
sh -c 'sleep 600; true' &
sleep 0.5
/usr/local/lib/klpforge/klpforge-load load --timeout 3 /lib/klp/livepatch-dowait.ko > /tmp/blocked 2>&1 &
sleep 1.5
dump B
wait $!
rc=$?
echo "$M:BEGIN:blocked"; cat /tmp/blocked; echo "$M:RUN:blocked:$rc"
killall sleep
run after-blocked cat /proc/modules
echo "$M:DMESG-BEGIN"; dmesg; echo "$M:DMESG-END"
echo "$M:DONE"
reboot -f
"""


def _parse_guest(console: str, nonce: str) -> tuple[dict[str, tuple[int, str]], dict[str, list[str]]]:
    runs: dict[str, tuple[int, str]] = {}
    dumps: dict[str, list[str]] = {}
    cur: list[str] | None = None
    dump: list[str] | None = None
    for line in console.replace("\r", "").splitlines():
        at = line.find(f"{nonce}:")
        if at > 0:  # a marker after other output on the line ("vm login: " of a getty)
            line = line[at:]
        if line.startswith(f"{nonce}:BEGIN:"):
            cur = []
        elif line.startswith(f"{nonce}:RUN:"):
            _, _, name, rc = line.split(":", 3)
            runs[name] = (int(rc), "\n".join(cur or []))
            cur = None
        elif line.startswith(f"{nonce}:DUMP:"):
            dump = dumps.setdefault(line.split(":", 2)[2], [])
        elif line == f"{nonce}:DUMP-END":
            dump = None
        elif dump is not None:
            dump.append(line)
        elif cur is not None:
            cur.append(line)
    return runs, dumps


def _rebuild(dump: list[str], nonce: str, into: Path) -> Path:
    """The guest's files as a directory tree under ``into`` (``klpforge list --root`` reads it)."""
    f: Path | None = None
    for line in dump:
        if line.startswith(f"{nonce}:DIR:"):
            (into / line.split(":", 2)[2].lstrip("/")).mkdir(parents=True, exist_ok=True)
            f = None
        elif line.startswith(f"{nonce}:FILE:"):
            f = into / line.split(":", 2)[2].lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("")
        elif f is not None:
            with f.open("a") as fh:
                fh.write(line + "\n")
    return into


def _exec_start(unit: Path) -> str:
    return next(ln.split("=", 1)[1] for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))


@pytest.mark.kernel
def test_lifecycle_in_the_test_kernel(built: dict[str, Path], kernel: KernelLayout, tmp_path: Path) -> None:
    from klpforge.qemu.initramfs import build_initramfs
    from klpforge.util.proc import release, start

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    rel = _release(built["cmdline"])
    deb = _deb(built, "cmdline", tmp_path)
    pkg = deb.name.split("_")[0]
    x, ctl, store_root = tmp_path / "x", tmp_path / "ctl", tmp_path / "store"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True)
    r = klpforge("install", str(built["cmdline"]), "--kernel-release", rel, "--root", str(store_root))
    assert r.returncode == 0, r.stderr
    # a copy whose vermagic names another release (same length, so the module stays well-formed)
    data = built["kobj"].read_bytes()
    vm = f"vermagic={rel} ".encode()
    assert vm in data
    other_rel = ("9" * len(rel)).encode()
    (tmp_path / "livepatch-other.ko").write_bytes(data.replace(vm, b"vermagic=" + other_rel + b" "))

    files: dict[str, Path] = {}
    for tree in (x, store_root):
        for p in tree.rglob("*"):
            if p.is_file():
                files["/" + str(p.relative_to(tree))] = p
    for script in ("postinst", "prerm", "postrm"):
        files[f"/var/lib/dpkg/info/{pkg}.{script}"] = ctl / script
    files["/lib/klp/livepatch-kobj.ko"] = built["kobj"]
    files["/lib/klp/livepatch-dowait.ko"] = built["dowait"]
    files["/lib/klp/livepatch-other.ko"] = tmp_path / "livepatch-other.ko"
    files["/lib/klp/kobject-example.ko"] = kernel.build / "samples/kobject/kobject-example.ko"
    nonce = "KLPH" + secrets.token_hex(6)
    deb_exec = _exec_start(x / f"usr/lib/systemd/system/{pkg}.service")
    store_exec = _exec_start(store_root / "etc/systemd/system/klpforge.service")
    initrd = build_initramfs(kernel.build / "usr/gen_init_cpio", tmp_path / "initrd.cpio",
                             _guest_script(nonce, pkg, rel, deb_exec, store_exec), files)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1", "-nodefaults",
           "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel.bzimage), "-initrd",
           str(initrd), "-append", "console=ttyS0 panic=-1 oops=panic no_timer_check"]
    log = tmp_path / "console.log"
    with log.open("wb") as fh:
        q = start(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            q.wait(timeout=240)
        finally:
            release(q)
    console = log.read_text(errors="replace")
    assert f"{nonce}:DONE" in console, console[-3000:]
    runs, dumps = _parse_guest(console, nonce)

    def ok(name: str, *texts: str, rc: int = 0) -> str:
        got_rc, out = runs[name]
        assert got_rc == rc, (name, got_rc, out)
        assert "can't open" not in out and "No such file" not in out, (name, out)  # no shell noise
        for t in texts:
            assert t in out, (name, t, out)
        return out

    # the package's postinst loaded the patch and reported the steps, as verify does
    ok("postinst", "livepatch_cmdline: insmod OK", "livepatch_cmdline: enabled OK", "livepatch_cmdline: transition OK")
    ok("cmdline-patched", "klpforge=cmdline")
    ok("missing-target", "livepatch_kobj: refused: target module(s) not loaded: kobject_example", rc=2)
    ok("other-release", f"refused: built for kernel {other_rel.decode()}, running {rel}", rc=2)
    ok("replace", "livepatch_kobj: transition OK")
    ok("kobj-patched", "0 klpforge")
    ok("prerm", "livepatch_cmdline: rmmod OK")  # replaced by the cumulative kobj patch: only removed
    ok("unload", "livepatch_kobj: disable OK", "livepatch_kobj: transition OK", "livepatch_kobj: rmmod OK")
    assert "klpforge=cmdline" not in ok("cmdline-unpatched")
    ok("boot-unit", "livepatch_cmdline: transition OK", f"1 live patch(es) for {rel} processed")
    ok("deb-unit", "livepatch_cmdline: already loaded")
    ok("cmdline-boot", "klpforge=cmdline")
    ok("unload-again", "livepatch_cmdline: rmmod OK")
    ok("not-loaded", "livepatch_cmdline: not loaded", rc=1)
    # a shell sleeping in do_wait blocks the transition: named with its stack, then reversed and unloaded
    blocked = ok("blocked", "livepatch_dowait: transition FAIL: not over after 3 s; blocked by: ",
                 "livepatch_dowait: reversed and unloaded", rc=1)
    assert re.search(r"pid \d+ \(sh\) in do_wait<", blocked), blocked
    assert "livepatch_dowait" not in ok("after-blocked")

    # klpforge list reads the guest's state (plus the package's files, as dpkg would have installed them)
    def listed(phase: str) -> dict[str, dict]:
        root = _rebuild(dumps[phase], nonce, tmp_path / f"guest-{phase}")
        shutil.copytree(x, root, dirs_exist_ok=True)
        r = klpforge("list", "--root", str(root), "--json")
        assert r.returncode == 0, r.stderr
        table = klpforge("list", "--root", str(root))
        assert table.returncode == 0 and table.stdout.startswith("NAME"), table.stdout
        return {row["name"]: row for row in json.loads(r.stdout)}

    a = listed("A")
    assert a["livepatch_cmdline"]["state"] == "enabled" and a["livepatch_cmdline"]["installed"] == "package"
    assert a["livepatch_cmdline"]["objects"] == "vmlinux:patched"
    c = listed("C")
    assert c["livepatch_cmdline"]["state"] == "replaced"
    assert c["livepatch_kobj"]["state"] == "enabled" and c["livepatch_kobj"]["objects"] == "kobject_example:patched"
    assert c["livepatch_kobj"]["replaces"] == ["livepatch_cmdline"] and c["livepatch_kobj"]["replace"] is True
    b = listed("B")  # while the do_wait patch is blocked
    assert b["livepatch_dowait"]["state"] == "transition" and b["livepatch_dowait"]["installed"] == ""
    assert b["livepatch_dowait"]["objects"] == "vmlinux:patched"
    d = listed("D")
    assert set(d) == {"livepatch_cmdline"} and d["livepatch_cmdline"]["state"] == "not loaded"
    dmesg = console.split(f"{nonce}:DMESG-BEGIN", 1)[1]
    assert not re.search(r"Oops|BUG:|WARNING:|Call Trace:", dmesg), dmesg
