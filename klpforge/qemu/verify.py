"""Prove a live-patch module inside a booted kernel: QEMU (software emulation) + a busybox initramfs.

The guest's ``/init`` loads the module, waits for the transition to finish, runs the check,
disables the patch, waits for its sysfs directory to go, unloads it and reports every step on the
serial console as ``<nonce>:<step>:OK|FAIL`` lines; the nonce is random per run so no kernel
message or check output can fake one.

>>> res = verify_module(VerifySpec(
...     ko=Path("livepatch-sample.ko"), bzimage=Path("bzImage"),
...     check="cat /proc/cmdline", expect="this has been live patched"))  # doctest: +SKIP
>>> res.ok  # doctest: +SKIP
True
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write
from ..util.proc import release, start
from .initramfs import build_initramfs
from .modinfo import modinfo, module_name

__all__ = ["VerifySpec", "Step", "VerifyResult", "verify_module", "guest_init", "parse_console", "STEPS",
           "check_bzimage", "qemu_error", "kernel_says"]

#: Steps in the order the guest reports them.
STEPS = ("boot", "preload", "insmod", "enabled", "transition", "check", "patched", "disable", "unpatched",
         "rmmod")


@dataclass
class VerifySpec:
    """What to boot and check.

    ``preload``: modules loaded before the patch (e.g. the module it patches); ``files``: extra guest files
    (guest path -> host path); ``after_check``: a command run after the patch is disabled (with
    ``after_expect``), to show the old behaviour is back.
    """

    ko: Path
    bzimage: Path
    check: str
    expect: str | None = None
    timeout: float = 120.0
    gen_init_cpio: Path | None = None
    preload: list[Path] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    after_check: str | None = None
    #: a command run in the guest before the module is loaded (start background tasks with ``&``)
    setup: str | None = None
    #: seconds a transition may linger before verify sends the fake signal (where ``<patch>/signal``
    #: exists: Linux 5.0 up to its removal; 6.1 signals by itself every 15 s)
    signal_after: float = 2.0
    #: seconds a transition may take at most (default: a third of ``timeout``, at least 20)
    transition_timeout: float | None = None
    after_expect: str | None = None
    append: str = ""
    memory: str = "256M"
    accel: str = "tcg"
    #: how to load a target module that was not loaded (module name -> advice), for the failure line
    load_hints: dict[str, str] = field(default_factory=dict)
    #: QEMU CPU model; "max" has SMAP/SMEP, so the alternatives of patched code (stac/clac around user
    #: accesses) are applied at module load as on real hardware, not left as no-ops
    cpu: str = "max"


@dataclass
class Step:
    """One reported step."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class VerifyResult:
    """Outcome of one boot."""

    ok: bool
    steps: list[Step]
    check_output: str
    check_rc: int | None
    after_output: str
    dmesg: str
    console: str
    seconds: float
    reason: str = ""


def guest_init(nonce: str, patch: str, ko_guest: str, preload: list[str],
               transition_timeout: int = 60, signal_after: float = 2.0) -> str:
    """The ``/init`` shell script (busybox ``sh``) run in the guest.

    Linux 6.1 behaviour it relies on: ``/sys/kernel/livepatch/<patch>/{enabled,transition}``; once a patch is
    disabled and unpatched its directory disappears (the patch is freed), so we wait for that, not for
    ``transition`` to read 0. ``reboot -f`` with QEMU's ``-no-reboot`` ends the run (``poweroff`` only halts).

    A transition lasts until every task has left the functions being replaced. A task sleeping in one (a
    shell waiting for its children sleeps in ``do_wait``) switches only when it returns to user space, which
    the kernel's fake signal makes it do (``klp_send_signals``, ``kernel/livepatch/transition.c``). 6.1
    sends it by itself every 15 s (``SIGNALS_TIMEOUT``; the ``<patch>/signal`` file of 5.0 is gone), so the
    wait keeps re-reading ``transition`` and, where ``<patch>/signal`` exists, writes 1 to it after
    ``signal_after`` seconds and every two seconds after that. On a real timeout the failure names every
    task whose ``/proc/<pid>/patch_state`` is not the target state, with the top of its
    ``/proc/<pid>/stack``. The shell reads sysfs with ``read`` (a builtin, no child to wait for) so that the
    waiting itself blocks as little as possible.

    >>> "insmod /lib/klp/p.ko" in guest_init("N", "p", "/lib/klp/p.ko", [])
    True
    """
    lp = f"/sys/kernel/livepatch/{patch}"
    tries = transition_timeout * 10
    first_signal = max(1, int(signal_after * 10))
    pre = "\n".join(
        f"insmod {shlex.quote(p)} 2>/tmp/err || fail preload \"$(cat /tmp/err)\"" for p in preload)
    return f"""#!/bin/sh
export PATH=/bin
M={nonce}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/printk
step() {{ echo "$M:$1:$2:$3"; }}
finish() {{
    echo "$M:DMESG-BEGIN"; dmesg; echo "$M:DMESG-END"
    echo "$M:RESULT:$1"
    reboot -f
}}
fail() {{ step "$1" FAIL "$2"; finish FAIL; }}
waitfor() {{ # waitfor STEP CONDITION...
    s=$1; shift; i=0
    until "$@"; do i=$((i+1)); [ $i -gt {tries} ] && fail "$s" "timed out"; sleep 0.1; done
}}
blockers() {{ # tasks whose patch_state is not $1, with the top of their kernel stacks
    for d in /proc/[0-9]*; do
        read -r ps < $d/patch_state 2>/dev/null || continue
        [ "$ps" = "$1" ] && continue
        read -r comm < $d/comm 2>/dev/null
        st=""; n=0
        while read -r _addr fn && [ $n -lt 4 ]; do
            st="$st${{st:+<}}${{fn%%+*}}"; n=$((n+1))
        done 2>/dev/null < $d/stack
        printf '%s ' "pid ${{d#/proc/}} ($comm) in $st;"
    done
}}
objects() {{ # "<obj> <patched> <loaded> <nfuncs>;" per klp_object; fails if one with functions is unpatched
    r=0
    for o in {lp}/*/; do
        [ -e "$o"patched ] || continue
        o=${{o%/}}; n=${{o##*/}}; nf=0
        for f in "$o"/*,*; do [ -e "$f" ] && nf=$((nf+1)); done
        read -r p < "$o"/patched
        l=0; {{ [ "$n" = vmlinux ] || [ -e /sys/module/"$n" ]; }} && l=1
        # 2: a module the check itself loaded, seen patched while the check ran, and unloaded by it since;
        # a target that was loaded before the check and is gone after it counts as unpatched
        [ "$p" = 1 ] || [ $l = 1 ] || [ ! -e /tmp/seen."$n" ] || [ -e /tmp/pre."$n" ] || p=2
        printf '%s ' "$n $p $l $nf;"
        [ "$p" != 0 ] || [ $nf = 0 ] || r=1
    done
    return $r
}}
settled() {{ # settled STEP: the transition is over (patching: transition reads 0; disable: patch freed)
    if [ "$1" = disable ]; then [ ! -e {lp} ]; return; fi
    read -r t < {lp}/transition 2>/dev/null && [ "$t" = 0 ]
}}
klpwait() {{ # klpwait STEP TARGET_STATE: wait for the transition, sending fake signals when it lingers
    s=$1; i=0; sent=0
    until settled "$s"; do
        i=$((i+1))
        if [ $i -ge {first_signal} ] && [ $(( (i - {first_signal}) % 20 )) = 0 ]; then
            [ -e {lp}/signal ] && echo 1 > {lp}/signal && sent=$((sent+1))
        fi
        if [ $i -gt {tries} ]; then
            b=$(blockers $2)
            fail "$s" "transition not over after {transition_timeout} s; blocked by: $b"
        fi
        sleep 0.1
    done
    [ $sent = 0 ] || echo "$M:NOTE:$s:$sent fake-signal round(s)"
}}
step boot OK "$(uname -r)"
dmesg -c >/dev/null
{pre}
step preload OK ""
[ -s /setup.sh ] && sh /setup.sh
insmod {shlex.quote(ko_guest)} 2>/tmp/err || fail insmod "$(cat /tmp/err)"
step insmod OK ""
waitfor enabled test -e {lp}/enabled
[ "$(cat {lp}/enabled)" = 1 ] || fail enabled "enabled=$(cat {lp}/enabled)"
step enabled OK ""
klpwait transition 1
step transition OK ""
# a check may load a target module (klp_module_coming) and unload it again: remember what it saw patched
for o in {lp}/*/; do o=${{o%/}}; [ "$(cat "$o"/patched 2>/dev/null)" = 1 ] && : > /tmp/pre."${{o##*/}}"; done
( while :; do for o in {lp}/*/; do o=${{o%/}}
    [ "$(cat "$o"/patched 2>/dev/null)" = 1 ] && : > /tmp/seen."${{o##*/}}"; done; sleep 0.1; done ) &
W=$!
echo "$M:CHECK-BEGIN"
sh /check.sh 2>&1
rc=$?
echo "$M:CHECK-END:$rc"
kill $W 2>/dev/null; wait $W 2>/dev/null
step check OK "$rc"
objs=$(objects) || fail patched "$objs"
step patched OK "$objs"
echo 0 > {lp}/enabled || fail disable "write to enabled failed"
klpwait disable 0
step disable OK ""
if [ -s /after.sh ]; then
    echo "$M:AFTER-BEGIN"; sh /after.sh 2>&1; echo "$M:AFTER-END:$?"
fi
step unpatched OK ""
rmmod {shlex.quote(patch)} 2>/tmp/err || fail rmmod "$(cat /tmp/err)"
step rmmod OK ""
finish DONE
"""


def _between(lines: list[str], begin: str, end_prefix: str) -> tuple[str, str | None]:
    out: list[str] = []
    inside = False
    for line in lines:
        if line == begin:
            inside = True
            out = []
            continue
        if inside and line.startswith(end_prefix):
            return "\n".join(out) + ("\n" if out else ""), line[len(end_prefix):]
        if inside:
            out.append(line)
    return "\n".join(out), None


def parse_console(console: str, nonce: str) -> tuple[list[Step], str, int | None, str, str, str | None]:
    """Split a console log into (steps, check output, check rc, after output, dmesg, result).

    >>> parse_console("N:boot:OK:6.1\\nN:RESULT:DONE\\n", "N")[0][0].name
    'boot'
    """
    lines = [ln.rstrip("\r") for ln in console.splitlines()]
    steps: list[Step] = []
    result = None
    for line in lines:
        if not line.startswith(nonce + ":"):
            continue
        parts = line.split(":", 3)
        if parts[1] == "RESULT" and len(parts) >= 3:
            result = parts[2]
        elif len(parts) >= 3 and parts[2] in ("OK", "FAIL") and parts[1] in STEPS:
            steps.append(Step(parts[1], parts[2] == "OK", parts[3] if len(parts) > 3 else ""))
    check_out, rc_s = _between(lines, f"{nonce}:CHECK-BEGIN", f"{nonce}:CHECK-END:")
    after_out, _ = _between(lines, f"{nonce}:AFTER-BEGIN", f"{nonce}:AFTER-END:")
    dmesg, _ = _between(lines, f"{nonce}:DMESG-BEGIN", f"{nonce}:DMESG-END")
    rc = int(rc_s) if rc_s and rc_s.strip().lstrip("-").isdigit() else None
    return steps, check_out, rc, after_out, dmesg, result


_BAD_DMESG = ("Oops", "BUG:", "WARNING:", "Call Trace:", "general protection fault", "Kernel panic")


def _qemu_cmd(spec: VerifySpec, initrd: Path) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise InputError("qemu-system-x86_64 not found: install Debian's qemu-system-x86 package")
    # no_timer_check: under a loaded host TCG can miss the IO-APIC timer probe and 6.1 panics
    # ("IO-APIC + timer doesn't work", arch/x86/kernel/apic/io_apic.c check_timer()).
    append = f"console=ttyS0 panic=-1 oops=panic loglevel=7 no_timer_check {spec.append}".strip()
    return [qemu, "-accel", spec.accel, "-cpu", spec.cpu, "-m", spec.memory, "-smp", "1", "-nodefaults",
            "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", str(spec.bzimage), "-initrd", str(initrd),
            "-append", append]


def image_release(path: Path) -> str | None:
    """The kernel release a bzImage says it is: the first word of its ``kernel_version`` string (setup header
    field at 0x20e, boot protocol >= 2.00: the string's offset less 0x200; Linux ``Documentation/x86/boot.rst``),
    the same ``UTS_RELEASE`` a module's vermagic starts with. None when the image has no such string."""
    with path.open("rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    ptr = int.from_bytes(head[0x20E:0x210], "little")
    if not ptr:
        return None
    text = head[0x200 + ptr:0x200 + ptr + 256].split(b"\0", 1)[0].decode(errors="replace")
    return text.split(" ", 1)[0] or None


def check_bzimage(path: Path) -> None:
    """Refuse a file that is not an x86 boot image: the setup header's magic ``HdrS`` sits at offset 0x202
    (Linux ``Documentation/x86/boot.rst``, boot protocol >= 2.00), which QEMU's ``-kernel`` needs.

    >>> check_bzimage(Path("/dev/null"))
    Traceback (most recent call last):
    ...
    klpforge.util.errors.InputError: /dev/null: not a bzImage (no "HdrS" boot header at 0x202: file too short)
    """
    try:
        with path.open("rb") as f:
            head = f.read(0x206)
    except OSError as e:
        raise InputError(f"{path}: cannot read the kernel ({e.strerror})") from None
    if head[0x202:0x206] == b"HdrS":
        return
    what = ("file too short" if len(head) < 0x206 else
            "an ELF file: pass arch/x86/boot/bzImage, not vmlinux" if head.startswith(b"\x7fELF") else
            "unknown format")
    raise InputError(f'{path}: not a bzImage (no "HdrS" boot header at 0x202: {what})')


def qemu_error(console: str, qemu: str) -> str | None:
    """QEMU's own complaint in the captured output (``qemu-system-x86_64: -accel kvm: ...``), if any.

    >>> qemu_error("qemu-system-x86_64: invalid accelerator foo\\n", "/usr/bin/qemu-system-x86_64")
    'qemu-system-x86_64: invalid accelerator foo'
    """
    names = (Path(qemu).name + ":", "qemu:")
    said = [ln.strip() for ln in console.splitlines() if ln.startswith(names)]
    errors = [ln for ln in said if ": warning:" not in ln]
    return (errors or said)[0] if said else None


def _gen_init_cpio(spec: VerifySpec) -> Path:
    if spec.gen_init_cpio:
        return spec.gen_init_cpio
    # bzImage lives at <build>/arch/x86/boot/bzImage; gen_init_cpio at <build>/usr/gen_init_cpio.
    cand = spec.bzimage.resolve().parents[3] / "usr/gen_init_cpio"
    if cand.is_file():
        return cand
    from ..kbuild.prepare import KernelLayout

    cand = KernelLayout.default().build / "usr/gen_init_cpio"
    if cand.is_file():
        return cand
    raise InputError("usr/gen_init_cpio not found next to the kernel; "
                     "run `klpforge kernel prepare` or pass --gen-init-cpio")


def verify_module(spec: VerifySpec, console_log: Path | None = None) -> VerifyResult:
    """Boot ``spec.bzimage`` with ``spec.ko`` and run the steps; a guest failure does not raise
    (see ``.ok`` and ``.reason``).

    Raises :class:`InputError` for missing inputs (module, kernel, QEMU) and for a module not
    marked as a livepatch.
    """
    for p in (spec.ko, spec.bzimage, *spec.preload):
        if not p.is_file():
            raise InputError(f"{p}: no such file")
    check_bzimage(spec.bzimage)
    if modinfo(spec.ko).get("livepatch") != "Y":
        raise InputError(f"{spec.ko}: not a livepatch module (no livepatch=Y in .modinfo)")
    patch = module_name(spec.ko)
    nonce = "KLPV" + secrets.token_hex(6)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="klpforge-verify-") as td:
        tdp = Path(td)
        check = tdp / "check.sh"
        check.write_text(spec.check + "\n")
        after = tdp / "after.sh"
        after.write_text((spec.after_check or "") + ("\n" if spec.after_check else ""))
        setup = tdp / "setup.sh"
        setup.write_text((spec.setup or "") + ("\n" if spec.setup else ""))
        files: dict[str, Path] = {"/check.sh": check, "/after.sh": after, "/setup.sh": setup,
                                  f"/lib/klp/{spec.ko.name}": spec.ko}
        pre_guest = []
        for p in spec.preload:
            files[f"/lib/klp/pre/{p.name}"] = p
            pre_guest.append(f"/lib/klp/pre/{p.name}")
        files.update(spec.files)
        # at least one round of the kernel's own fake signals (every 15 s in 6.1) must fit
        transition_timeout = int(spec.transition_timeout or max(20, int(spec.timeout / 3)))
        init = guest_init(nonce, patch, f"/lib/klp/{spec.ko.name}", pre_guest, transition_timeout,
                          spec.signal_after)
        initrd = build_initramfs(_gen_init_cpio(spec), tdp / "initramfs.cpio", init, files)
        cmd = _qemu_cmd(spec, initrd)
        raw = tdp / "console.raw"
        timed_out = False
        with raw.open("wb") as out:
            proc = start(cmd, stdout=out, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=spec.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                release(proc)  # kills QEMU if still running (timeout, Ctrl-C, SIGTERM)
        console = raw.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    seconds = time.monotonic() - t0
    if console_log is not None:
        atomic_write(console_log, console)
    steps, check_out, rc, after_out, dmesg, result = parse_console(console, nonce)
    res = VerifyResult(False, steps, check_out, rc, after_out, dmesg, console, seconds)
    for st in steps:
        if st.name == "patched":
            st.detail = _objects_detail(st.detail, spec.load_hints, st.ok)
        elif st.name == "preload" and not st.ok:
            st.detail += _softdep_hint(st.detail, spec.preload)
    res.reason = _judge(spec, res, result, timed_out, qemu_error(console, cmd[0]))
    res.ok = not res.reason
    return res


def _softdep_hint(detail: str, preload: list[Path]) -> str:
    """For a module that failed to load: the soft dependencies its ``.modinfo`` declares (``softdep=pre: crc32c``),
    which ``insmod`` does not follow; libcrc32c's init fails with -ENOENT without crc32c, which busybox reports as
    "unknown symbol in module", and the kernel logs nothing."""
    for p in preload:
        if f"/{p.name}'" in detail or detail.endswith(f"/{p.name}"):
            try:
                soft = modinfo(p).get("softdep")
            except InputError:
                return ""
            if soft:
                return (f"; {p.name} declares the soft dependency '{soft}', which insmod does not follow: preload "
                        "those modules first, or use --distro with --load-modules, which loads as modprobe does")
    return ""


def _objects_detail(raw: str, hints: dict[str, str], ok: bool) -> str:
    """The guest's ``"<obj> <patched> <loaded> <nfuncs>; ..."`` (see :func:`guest_init`) in words: on success
    the objects patched; on failure each object with functions that is not patched, why, and how to fix it.

    >>> _objects_detail("vmlinux 1 1 2; nfsd 0 0 3; ", {"nfsd": "add --load-modules nfsd"}, False)
    'nfsd: module not loaded in the guest, its 3 function(s) were not patched (add --load-modules nfsd)'
    >>> _objects_detail("vmlinux 1 1 2; nfsd 1 1 3; ", {}, True)
    'vmlinux (2 functions), nfsd (3 functions)'
    >>> _objects_detail("vmlinux 1 1 1; m 2 0 1; ", {}, True)
    'vmlinux (1 function), m (1 function, patched while the check ran, unloaded since)'
    """
    objs = []
    for item in raw.split(";"):
        f = item.split()
        if len(f) == 4 and f[3].isdigit():
            objs.append((f[0], f[1] in ("1", "2"), f[2] == "1", int(f[3])))
    if not objs:
        return raw.strip() if not ok else "no klp_object directory under /sys/kernel/livepatch/<patch>"
    if ok:
        return ", ".join((f"{n} ({k} function{'s' if k != 1 else ''}"
                          + (", patched while the check ran, unloaded since)" if not loaded else ")"))
                         if k else f"{n} (klp relocations only)" for n, p, loaded, k in objs if p or k)
    bad = []
    for n, p, loaded, k in objs:
        if p or not k:
            continue
        why = "module not loaded in the guest" if not loaded else "loaded but not patched"
        hint = hints.get(n) or (f"load it before the check: --preload {n}.ko, or insmod it in --setup"
                                if not loaded else "see the kernel log")
        bad.append(f"{n}: {why}, its {k} function(s) were not patched ({hint})")
    return "; ".join(bad)


#: Words of a kernel log line that explain a failed step (module loader, livepatch core, warnings).
_SAYS = ("Unknown symbol", "unknown symbol", "disagrees about version", "error", "Error", "failed", "Failed",
         "invalid", "Invalid", "livepatch:", "BUG", "WARNING", "Oops", "not found", "taint", "-EINVAL",
         "version magic")  # 6.1 kernel/module/version.c: "version magic '...' should be '...'"


def kernel_says(dmesg: str, limit: int = 3) -> list[str]:
    r"""The last ``limit`` lines of the guest's kernel log that explain a failure (without the timestamps).

    >>> kernel_says("[    1.2] random: crng init done\n[    3.4] libcrc32c: Unknown symbol crypto_alloc_shash (err -2)")
    ['libcrc32c: Unknown symbol crypto_alloc_shash (err -2)']
    """
    out = []
    for ln in dmesg.splitlines():
        text = ln.split("] ", 1)[1] if ln.startswith("[") and "] " in ln else ln
        text = text.strip()
        if text and any(w in text for w in _SAYS) and "patching complete" not in text:
            out.append(text)
    return out[-limit:]


def _judge(spec: VerifySpec, res: VerifyResult, result: str | None, timed_out: bool,
           qemu_err: str | None = None) -> str:
    if not res.steps and qemu_err:
        return qemu_err  # QEMU itself refused (a bad -accel, an unreadable image): its words, not ours
    failed = [s for s in res.steps if not s.ok]
    if failed:
        said = kernel_says(res.dmesg)
        return (f"step {failed[0].name} failed: {failed[0].detail or 'no detail'}"
                + (f" (guest kernel: {' | '.join(said)})" if said else
                   " (the guest kernel logged nothing about it)" if not res.dmesg.strip() else ""))
    seen = [s.name for s in res.steps]
    if result != "DONE":
        last = seen[-1] if seen else "none (kernel did not reach /init)"
        why = "timed out" if timed_out else "guest stopped"
        if "Kernel panic" in res.console:
            why = "kernel panic"
        return f"{why} after step {last}"
    missing = [s for s in STEPS if s not in seen]
    if missing:
        return f"steps not reported: {', '.join(missing)}"
    if res.check_rc != 0:
        return f"check `{spec.check}` exited {res.check_rc}"
    if spec.expect is not None and spec.expect not in res.check_output:
        return f"check output does not contain {spec.expect!r}"
    if spec.after_expect is not None and spec.after_expect not in res.after_output:
        return f"output after disabling does not contain {spec.after_expect!r}"
    bad = [ln for ln in res.dmesg.splitlines() if any(b in ln for b in _BAD_DMESG)]
    if bad:
        return f"kernel complained: {bad[0].strip()}"
    return ""
