"""End to end on the prepared 6.1 kernel: ``klpforge build`` then ``klpforge verify`` in QEMU.

Every test also proves the kernel source and build trees unchanged afterwards (a manifest of every entry's
content, mode and mtime, directories included), including builds interrupted at several moments, killed,
and run concurrently.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from klpforge.kbuild.prepare import KernelLayout
from klpforge.kbuild.restore import tree_manifest

pytestmark = pytest.mark.kernel

PATCHES = Path(__file__).parent / "kernel_patches"


@pytest.fixture(scope="module")
def baseline(kernel: KernelLayout) -> tuple[dict, dict]:
    return tree_manifest(kernel.src), tree_manifest(kernel.build)


def _diff(before: dict, after: dict) -> list[str]:
    """Entries added, removed, or with another mode, mtime or content (the ctime only speeds up hashing:
    one test edits a file as a user would and puts it back)."""
    return sorted(k for k in before.keys() | after.keys()
                  if (before.get(k) or ())[:3] != (after.get(k) or ())[:3])[:10]


@pytest.fixture()
def unchanged_tree(kernel: KernelLayout, baseline: tuple[dict, dict]):  # type: ignore[no-untyped-def]
    """After the test, the source and build trees hold the same entries with the same content, mode and
    mtime (directories too): klpforge only reads them."""
    yield
    for before, root in zip(baseline, (kernel.src, kernel.build), strict=True):
        changed = _diff(before, tree_manifest(root, reuse=before))
        assert not changed, f"{root} was modified: {changed}"


def klpforge(*args: str, env: dict[str, str] | None = None, timeout: float = 600
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def build(kernel: KernelLayout, patch: str, out: Path, *extra: str,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(PATCHES / patch),
                    "-o", str(out), "--json", str(out.with_suffix(".json")), *extra, env=env)


@dataclass
class Case:
    patch: str
    check: str
    expect: str
    functions: set[str]
    target: str = "vmlinux"
    files: list[str] = field(default_factory=list)
    after_check: str | None = None
    after_expect: str | None = None
    dmesg: list[str] = field(default_factory=list)
    #: ordinary modules (directories under tests/kernel_patches/) built against the kernel and the live
    #: patch's exports, shipped to the guest as /lib/klp/<name>.ko
    modules: list[str] = field(default_factory=list)
    #: objects that must each come with klp relocations (several objects in one module)
    klp_objects: set[str] = field(default_factory=set)
    #: run in the guest before the live patch is loaded
    setup: str | None = None
    #: lines the console log must contain besides the kernel's (e.g. verify's notes)
    console: list[str] = field(default_factory=list)
    #: build time allowed (a header rebuilds every object that includes it)
    budget_s: float = 60


KOBJ = "samples/kobject/kobject-example.ko"
#: a shell that waits (in do_wait) for a child sleeping ten minutes
SLEEPER = "sh -c 'sleep 600; true' & sleep 0.5"

CASES = [
    Case("00-cmdline-noreloc.patch", "cat /proc/cmdline", "klpforge: no relocation", {"cmdline_proc_show"},
         after_check="cat /proc/cmdline", after_expect="console=ttyS0"),
    Case("01-cmdline-text.patch", "cat /proc/cmdline", "console=ttyS0 panic=-1", {"cmdline_proc_show"},
         after_check="cat /proc/cmdline", after_expect="oops=panic"),
    Case("02-version-new-function.patch", "cat /proc/version", "klpforge: new function in 6.1",
         {"version_proc_show"}),
    Case("03-meminfo-inlined-static.patch", "grep MemTotal /proc/meminfo", " KiB", {"meminfo_proc_show"},
         after_check="grep MemTotal /proc/meminfo", after_expect=" kB"),
    Case("04-oom-adj-isra-clone.patch", "echo 123 > /proc/self/oom_score_adj && dmesg | grep klpforge-oom",
         "klpforge-oom: 123", {"__set_oom_adj.isra.0"}),
    # The target module is loaded after the live patch: klp_module_coming() must apply it then.
    Case("05-kobject-module-function.patch",
         "insmod /lib/klp/kobject-example.ko && cat /sys/kernel/kobject_example/foo", "0 klpforge",
         {"foo_show"}, target="kobject_example", files=[KOBJ]),
    Case("06-uptime-callbacks-shadow.patch",
         "cat /proc/uptime >/dev/null; cat /proc/uptime; dmesg | grep -q 'klpforge-cb: post_patch'",
         "klpforge-calls=2", {"uptime_proc_show"},
         dmesg=["klpforge-cb: pre_patch", "klpforge-cb: post_patch", "klpforge-cb: pre_unpatch",
                "klpforge-cb: post_unpatch"]),
    # Issue 12 item 4: the live patch exports a new function; a module built against it loads after it
    # (and is unloaded again, or the live patch could not be).
    Case("07-export-new-function.patch",
         "grep klpforge-answer /proc/version && insmod /lib/klp/klpforge_consumer.ko && "
         "rmmod klpforge_consumer && dmesg | grep klpforge-consumer:",
         "klpforge-consumer: answer(7)=42", {"version_proc_show"}, modules=["consumer"]),
    # Item 10: klp relocations in two objects (a static callee in each file) ...
    Case("08-fork-exit-two-objects.patch", "sh -c true; dmesg | grep -c -E 'klpforge-(fork|wait4):'", "2",
         {"kernel_clone", "kernel_wait4"}, klp_objects={"kernel/fork.o", "kernel/exit.o"}),
    # ... and a static inline of a header inlined in two objects.
    Case("09-header-static-inline.patch", "cat /proc/version >/dev/null; dmesg | grep klpforge-pde",
         "klpforge-pde: empty-directory check", {"proc_get_inode", "__proc_create"},
         klp_objects={"fs/proc/inode.o", "fs/proc/generic.o"}, budget_s=120),
    # Item 11: a new global of cmdline.o called by meminfo.o binds inside the live patch.
    Case("10-new-global-across-objects.patch", "grep KlpforgeNote /proc/meminfo", "KlpforgeNote:   console=ttyS0",
         {"meminfo_proc_show"}, after_check="grep -c KlpforgeNote /proc/meminfo", after_expect="0"),
    # Item 12: a kpatch-build syscall patch: only the syscall entry is replaced.
    Case("11-kpatch-syscall.patch", "uname -m", "klpforge-syscall", {"__x64_sys_newuname"},
         after_check="uname -m", after_expect="x86_64"),
    # Item 13: a shell sleeps in do_wait() (waiting for a long sleep) when the patch is loaded: the
    # transition finishes only through the kernel's fake signal (6.1: after 15 s), which verify waits for.
    # The check ends the sleep, so that disabling does not wait 15 s more.
    Case("12-do-wait-sleeping.patch", "sh -c true; killall sleep; dmesg | grep klpforge-do_wait",
         "klpforge-do_wait:", {"do_wait"}, setup=SLEEPER,
         console=["livepatch: signaling remaining tasks"]),
    # Item 14: a jump label and a static call (the console tracepoint) in patched code.
    Case("13-static-key-and-call.patch",
         "a=$(cat /proc/cmdline); T=/sys/kernel/tracing; mount -t tracefs nodev $T && "
         "echo 1 > $T/events/printk/console/enable && b=$(cat /proc/cmdline) && cat /proc/version >/dev/null && "
         "echo 0 > $T/events/printk/console/enable && [ \"${a%klpforge-key=on}\" = \"$a\" ] && echo \"$b\" && "
         "grep -o 'console: klpforge-static-call' $T/trace",
         "klpforge-key=on\nconsole: klpforge-static-call", {"cmdline_proc_show", "version_proc_show"}),
    # Issue 16 item 1: tracepoints of the target module itself in replaced code (jump labels and static
    # calls keyed in the module) fire from the new code; the module loads after the live patch.
    Case("14-module-tracepoint.patch",
         "insmod /lib/klp/trace-events-sample.ko && T=/sys/kernel/tracing && mount -t tracefs nodev $T && "
         "echo 1 > $T/events/sample-trace/foo_bar/enable && sleep 4 && "
         "echo 0 > $T/events/sample-trace/foo_bar/enable && grep -o -m1 'foo_bar: foo klpforge-' $T/trace && "
         "for p in /proc/[0-9]*; do grep -qx event-sample $p/comm 2>/dev/null && cat $p/stack; done | grep -o -m1 "
         "'do_simple_thread_func.*livepatch_case.'; rmmod trace_events_sample",  # its kthread sleeps in the patch
         "foo_bar: foo klpforge-\ndo_simple_thread_func", {"do_simple_thread_func.constprop.0"},
         target="trace_events_sample",
         files=["samples/trace_events/trace-events-sample.ko"]),
]


def _build_modules(kernel: KernelLayout, names: list[str], symvers: Path, tmp_path: Path) -> list[Path]:
    """Build ordinary out-of-tree modules against the kernel and the live patch's ``Module.symvers``."""
    out = []
    for name in names:
        d = tmp_path / f"mod-{name}"
        shutil.copytree(PATCHES / name, d)
        r = subprocess.run(["make", "-C", str(kernel.build), f"M={d}", "-j2", f"KBUILD_EXTRA_SYMBOLS={symvers}",
                            "modules"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        out.extend(sorted(d.glob("*.ko")))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.patch.removesuffix(".patch") for c in CASES])
def test_build_then_verify(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path, case: Case) -> None:
    ko = tmp_path / "livepatch-case.ko"
    t0 = time.monotonic()
    r = build(kernel, case.patch, ko)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert ko.is_file()
    report = json.loads(ko.with_suffix(".json").read_text())
    got = {f["old_name"] for o in report["objects"] for f in o["functions"]}
    assert case.functions <= got, report
    assert {o["target"] for o in report["objects"]} == {case.target}
    with_klp = {o["object"] for o in report["objects"] if o["diff_report"].get("klp_relocations")}
    assert case.klp_objects <= with_klp, report
    assert took < case.budget_s, f"build took {took:.1f} s"
    args = [str(ko), "--kernel", str(kernel.bzimage), "--check", case.check, "--expect", case.expect,
            "--console-log", str(tmp_path / "console.log")]
    for f in case.files:
        args += ["--file", str(kernel.build / f)]
    if case.modules:
        symvers = tmp_path / "livepatch.symvers"
        symvers.write_text("".join(f"0x00000000\t{e['name']}\t{ko.with_suffix('')}\t"
                                   f"EXPORT_SYMBOL{'_GPL' if e['gpl'] else ''}\t{e['namespace']}\n"
                                   for e in report["exports"]))
        for m in _build_modules(kernel, case.modules, symvers, tmp_path):
            args += ["--file", str(m)]
    if case.setup:
        args += ["--setup", case.setup]
    if case.after_check:
        args += ["--after-check", case.after_check, "--after-expect", case.after_expect or ""]
    v = klpforge("verify", *args, timeout=300)
    assert v.returncode == 0, v.stderr + (tmp_path / "console.log").read_text()[-3000:]
    console = (tmp_path / "console.log").read_text()
    assert "livepatch: 'livepatch_case': patching complete" in console
    for line in case.dmesg + case.console:
        assert line in console


def test_blocked_transition_names_the_blocking_task(kernel: KernelLayout, unchanged_tree: None,
                                                    tmp_path: Path) -> None:
    """Without the fake signal the sleeping shell keeps the patch in transition: verify fails naming it,
    with where it sleeps."""
    from klpforge.qemu.verify import VerifySpec, verify_module

    ko = tmp_path / "livepatch-case.ko"
    r = build(kernel, "12-do-wait-sleeping.patch", ko)
    assert r.returncode == 0, r.stderr
    res = verify_module(VerifySpec(ko=ko, bzimage=kernel.bzimage, check="true", setup=SLEEPER, timeout=180,
                                   transition_timeout=6, signal_after=1000))
    assert not res.ok
    assert res.reason.startswith("step transition failed: transition not over after 6 s; blocked by: pid "), \
        res.reason
    assert "(sh) in do_wait<kernel_wait4<" in res.reason, res.reason


@pytest.mark.parametrize("patch,message", [
    ("90-refuse-global-data.patch", "data console_printk (.data.console_printk) changed"),
    ("91-refuse-init-code.patch", "changed function proc_cmdline_init is in .init.text"),
    ("92-refuse-export-existing.patch", "kernel/exit.o: the patch exports is_current_pgrp_orphaned, which the "
                                        "running kernel already has"),
])
def test_unsafe_patches_refused(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path,
                                patch: str, message: str) -> None:
    out = tmp_path / "lp.ko"
    r = build(kernel, patch, out)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not out.exists()


def _write_patch(tmp_path: Path, rel: str, old: str, new: str, kernel: KernelLayout) -> Path:
    text = (kernel.src / rel).read_text().splitlines()
    i = text.index(old)
    ctx = text[max(0, i - 1):i + 2]
    body = [f" {ctx[0]}", f"-{old}", f"+{new}", f" {ctx[2]}"] if i > 0 else []
    p = tmp_path / "t.patch"
    p.write_text(f"--- a/{rel}\n+++ b/{rel}\n@@ -{i},3 +{i},3 @@\n" + "\n".join(body) + "\n")
    return p


def test_refuses_assembly_and_lib(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path) -> None:
    asm = _write_patch(tmp_path, "arch/x86/kernel/head_64.S", "#include <linux/linkage.h>",
                       "#include <linux/linkage.h> /* x */", kernel)
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(asm), "-o", str(tmp_path / "a.ko"))
    assert r.returncode == 2
    assert "arch/x86/kernel/head_64.S: assembly sources (.S) are not live-patchable" in r.stderr
    lib = _write_patch(tmp_path, "lib/string.c", "#include <linux/types.h>", "#include <linux/types.h> ", kernel)
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(lib), "-o", str(tmp_path / "b.ko"))
    assert r.returncode == 2
    assert "lib/string.c: lib/ is linked into vmlinux as an archive" in r.stderr


def test_refuses_generator_input_no_object_records(kernel: KernelLayout, unchanged_tree: None,
                                                   tmp_path: Path) -> None:
    """The syscall table reaches code only through generated headers: no .cmd names it, so which objects it
    changes is unknown; refused (was: "ignored", and the rest of the patch built, exit 0)."""
    tbl = _write_patch(tmp_path, "arch/x86/entry/syscalls/syscall_64.tbl", "39\tcommon\tgetpid\t\t\tsys_getpid",
                       "39\tcommon\tgetpid\t\t\tsys_getppid", kernel)
    out = tmp_path / "t.ko"
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(tbl), "-o", str(out))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (
        "klpforge build: arch/x86/entry/syscalls/syscall_64.tbl: no compiled object records it as a dependency: "
        "it reaches code only through generated files (or not at all), which cannot be known without a full build")
    assert not out.exists()


def test_refuses_patch_that_does_not_apply(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path) -> None:
    p = tmp_path / "stale.patch"
    p.write_text((PATCHES / "01-cmdline-text.patch").read_text().replace("saved_command_line", "old_cmdline"))
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(p), "-o", str(tmp_path / "x.ko"))
    assert r.returncode == 1
    assert "stale.patch does not apply to" in r.stderr


def test_refuses_other_compiler(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    gcc = fake / "gcc"
    gcc.write_text("#!/bin/sh\necho 'gcc (Debian 13.1.0-1) 13.1.0'\n")
    gcc.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    r = build(kernel, "00-cmdline-noreloc.patch", tmp_path / "x.ko", env=env)
    assert r.returncode == 1
    assert "compiler mismatch: vmlinux was built by '(Debian" in r.stderr
    assert "gcc on PATH is '(Debian 13.1.0-1) 13.1.0'" in r.stderr


def test_refuses_kernel_without_livepatch(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path) -> None:
    fake = tmp_path / "build"
    fake.mkdir()
    cfg = (kernel.build / ".config").read_text().replace("CONFIG_LIVEPATCH=y", "# CONFIG_LIVEPATCH is not set")
    (fake / ".config").write_text(cfg)
    (fake / "vmlinux").symlink_to(kernel.build / "vmlinux")
    r = klpforge("build", "-s", str(kernel.src), "-O", str(fake), str(PATCHES / "00-cmdline-noreloc.patch"),
                 "-o", str(tmp_path / "x.ko"))
    assert r.returncode == 1
    assert "CONFIG_LIVEPATCH is not set; this kernel cannot load live patches" in r.stderr


def _popen_build(kernel: KernelLayout, patch: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "klpforge", "build", "-s", str(kernel.src), "-O",
                             str(kernel.build), str(patch), "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, start time, command name) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            f = stat[stat.rindex(")") + 2:].split()
            out[int(d.name)] = (int(f[1]), f[19], name)
    return out


def _descendants(pid: int) -> dict[int, tuple[str, str]]:
    """Every process below ``pid`` (by parent links, whatever its process group): pid -> (start, name)."""
    procs = _procs()
    kids: dict[int, list[int]] = {}
    for p, (pp, _st, _n) in procs.items():
        kids.setdefault(pp, []).append(p)
    out, todo = {}, [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out[c] = (procs[c][1], procs[c][2])
            todo.append(c)
    return out


def _assert_all_ended(snapshot: dict[int, tuple[str, str]]) -> None:
    deadline = time.monotonic() + 15
    while True:
        now = _procs()
        alive = {p: n for p, (st, n) in snapshot.items() if p in now and now[p][1] == st}
        alive = {p: n for p, n in alive.items() if Path(f"/proc/{p}/stat").is_file()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes left running: {alive}"
        time.sleep(0.1)


def _wait_for(proc: subprocess.Popen[str], cond, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"build ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _has_child(proc: subprocess.Popen[str], names: set[str]) -> bool:
    return any(n in names for _st, n in _descendants(proc.pid).values())


MOMENTS = {
    "check": lambda tmp, proc: any(tmp.glob("klpforge-build-*")),
    "orig-compile": lambda tmp, proc: _has_child(proc, {"cc1", "objtool"}),
    "patched-pause": lambda tmp, proc: any(tmp.glob("klpforge-build-*/orig/fs/proc/cmdline.o")),
    # make M= compiling the generated core: cc1 under make (gcc's temporary files must go too)
    "module-make": lambda tmp, proc: {"make", "cc1"} <= {n for _st, n in _descendants(proc.pid).values()},
}


@pytest.mark.parametrize("moment,sig,code", [
    ("check", signal.SIGTERM, 143), ("orig-compile", signal.SIGTERM, 143), ("patched-pause", signal.SIGTERM, 143),
    ("module-make", signal.SIGTERM, 143), ("orig-compile", signal.SIGHUP, 129), ("patched-pause", signal.SIGINT, 130),
    ("module-make", signal.SIGINT, 130)])
def test_signal_ends_build_and_children(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path,
                                        moment: str, sig: int, code: int) -> None:
    """A signal at several moments: one line on stderr, the documented code, no child left, no temporary
    directory left, no output, the trees untouched (the fixture)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    if moment == "patched-pause":
        env["KLPFORGE_PAUSE_AFTER_APPLY"] = "60"
    proc = _popen_build(kernel, PATCHES / "01-cmdline-text.patch", tmp_path / "x.ko", env)
    _wait_for(proc, lambda: MOMENTS[moment](tmp, proc), moment)
    snapshot = _descendants(proc.pid)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    name = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated by SIGTERM",
            signal.SIGHUP: "terminated by SIGHUP"}[sig]
    assert err == f"klpforge build: {name}\n"
    _assert_all_ended(snapshot)
    assert list(tmp.iterdir()) == []
    assert not (tmp_path / "x.ko").exists()


def test_sigkill_then_user_edit_then_build_keeps_the_edit(kernel: KernelLayout, unchanged_tree: None,
                                                          tmp_path: Path) -> None:
    """SIGKILL cannot be caught, but there is nothing to recover: the tree was never patched. The user's
    later edit survives the next build, which compiles it."""
    target = kernel.src / "fs/proc/cmdline.c"
    original = target.read_bytes()
    st = target.stat()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), KLPFORGE_PAUSE_AFTER_APPLY="60")
    proc = _popen_build(kernel, PATCHES / "01-cmdline-text.patch", tmp_path / "x.ko", env)
    _wait_for(proc, lambda: MOMENTS["patched-pause"](tmp, proc), "the pause")
    proc.kill()
    proc.wait()
    assert target.read_bytes() == original
    edited = original + b"/* the user's edit after the kill */\n"
    try:
        target.write_bytes(edited)
        r = build(kernel, "00-cmdline-noreloc.patch", tmp_path / "y.ko")
        assert r.returncode == 0, r.stderr
        assert target.read_bytes() == edited
        assert b"klpforge: no relocation" in (tmp_path / "y.ko").read_bytes()
    finally:
        target.write_bytes(original)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_concurrent_builds_on_one_tree(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path) -> None:
    """Two builds of two different patches of the same file at once: both right, neither sees the other."""
    env = dict(os.environ)
    a = _popen_build(kernel, PATCHES / "00-cmdline-noreloc.patch", tmp_path / "a.ko", env)
    time.sleep(0.5)
    b = _popen_build(kernel, PATCHES / "01-cmdline-text.patch", tmp_path / "b.ko", env)
    for p in (a, b):
        _out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    ka, kb = (tmp_path / "a.ko").read_bytes(), (tmp_path / "b.ko").read_bytes()
    assert b"klpforge: no relocation" in ka and b"klpforge=cmdline" not in ka
    assert b"klpforge=cmdline" in kb and b"klpforge: no relocation" not in kb
    for ko in (ka, kb):
        assert b"cmdline_proc_show" in ko


def test_other_cache_directory(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path) -> None:
    """Nothing about the tree lives in the cache any more: another KLPFORGE_CACHE builds the same."""
    env = dict(os.environ, KLPFORGE_CACHE=str(tmp_path / "other-cache"))
    r = build(kernel, "00-cmdline-noreloc.patch", tmp_path / "c.ko", env=env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "other-cache").exists()


def _git_patch(kernel: KernelLayout, doc: str) -> str:
    """Patch 00 as git writes it, plus a rename, a mode change and a new empty file."""
    body = (PATCHES / "00-cmdline-noreloc.patch").read_text().split("\n--- a/", 1)[1]
    new_doc = doc.replace(".rst", "-renamed.rst")
    return ("diff --git a/fs/proc/cmdline.c b/fs/proc/cmdline.c\nold mode 100644\nnew mode 100755\n"
            f"index 1111111..2222222\n--- a/{body}"
            f"diff --git a/{doc} b/{new_doc}\nsimilarity index 100%\nrename from {doc}\nrename to {new_doc}\n"
            "diff --git a/fs/proc/README.klpforge b/fs/proc/README.klpforge\nnew file mode 100644\n"
            "index 0000000..e69de29\n")


def test_git_patch_with_rename_mode_change_and_empty_file(kernel: KernelLayout, unchanged_tree: None,
                                                          tmp_path: Path) -> None:
    doc = "Documentation/admin-guide/README.rst"
    assert (kernel.src / doc).is_file()
    p = tmp_path / "git.patch"
    p.write_text(_git_patch(kernel, doc))
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(p), "-o", str(tmp_path / "g.ko"))
    assert r.returncode == 0, r.stderr
    assert b"klpforge: no relocation" in (tmp_path / "g.ko").read_bytes()
    assert not (kernel.src / "fs/proc/README.klpforge").exists()
    assert (kernel.src / doc).is_file()
    # a renamed C file is refused, clearly
    p.write_text("diff --git a/fs/proc/cmdline.c b/fs/proc/cmdline2.c\nsimilarity index 100%\n"
                 "rename from fs/proc/cmdline.c\nrename to fs/proc/cmdline2.c\n")
    r = klpforge("build", "-s", str(kernel.src), "-O", str(kernel.build), str(p), "-o", str(tmp_path / "h.ko"))
    assert r.returncode == 1
    assert r.stderr.strip() == ("klpforge build: fs/proc/cmdline.c -> fs/proc/cmdline2.c: the patch renames or "
                                "copies a source file; a live patch can only change existing objects in place")
    assert not (tmp_path / "h.ko").exists()


def test_build_dir_of_another_tree_refused(kernel: KernelLayout, unchanged_tree: None, tmp_path: Path) -> None:
    """-s names a copy of the tree while -O's .cmd files name the original: refused, nothing compiled."""
    other = tmp_path / "copy"
    (other / "kernel").mkdir(parents=True)
    (other / "fs/proc").mkdir(parents=True)
    for rel in ("Makefile", "fs/proc/cmdline.c"):
        (other / rel).write_bytes((kernel.src / rel).read_bytes())
    r = klpforge("build", "-s", str(other), "-O", str(kernel.build), str(PATCHES / "00-cmdline-noreloc.patch"),
                 "-o", str(tmp_path / "x.ko"))
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"klpforge build: {kernel.build}/fs/proc/.cmdline.o.cmd: fs/proc/cmdline.o was compiled from "
        f"{kernel.src}/fs/proc/cmdline.c, which is not in the source tree {other} (-s); this build directory "
        "belongs to another (moved or copied) tree: pass the source tree it was built from")
    assert not (tmp_path / "x.ko").exists()


def test_tree_knows_parents_and_header_users(kernel: KernelLayout) -> None:
    from klpforge.kbuild.tree import KernelTree
    from klpforge.util.errors import InputError

    tree = KernelTree(kernel.src, kernel.build)
    assert tree.parent_of("fs/proc/uptime.o").target == "vmlinux"
    par = tree.parent_of("samples/kobject/kobject-example.o")
    assert (par.target, par.binary.name) == ("kobject_example", "kobject-example.ko")
    users = tree.objects_including("fs/proc/internal.h")
    assert {"fs/proc/base.o", "fs/proc/meminfo.o", "fs/proc/uptime.o"} <= set(users)
    assert "kernel/fork.o" not in users
    # a .c file another .c file #includes: the includer's object (fixdep's list), not a guessed name
    assert tree.objects_including("kernel/sched/completion.c") == ["kernel/sched/build_utility.o"]
    assert tree.objects_including("mm/percpu-km.c") == ["mm/percpu.o"]
    assert tree.objects_including("fs/proc/cmdline.c") == ["fs/proc/cmdline.o"]
    with pytest.raises(InputError, match="not built in"):
        tree.parent_of("drivers/gpu/drm/drm_drv.o")
    assert tree.vmlinux_compiler().startswith("GCC: (")


def test_included_c_file_rebuilds_the_includer(kernel: KernelLayout, unchanged_tree: None,
                                               tmp_path: Path) -> None:
    """kernel/sched/completion.c is compiled only as part of build_utility.c (6.1): a change to it is built
    from build_utility.o, the object whose recorded dependencies name it, and the function is replaced."""
    out = tmp_path / "inc.ko"
    r = build(kernel, "15-included-c-file.patch", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.with_suffix(".json").read_text())
    got = {o["object"]: sorted(f["old_name"] for f in o["functions"]) for o in rep["objects"]}
    assert got == {"kernel/sched/build_utility.o": ["completion_done"]}


HEADER_PATCH = (
    "--- a/fs/proc/internal.h\n+++ b/fs/proc/internal.h\n@@ -213,7 +213,8 @@\n \n"
    " static inline void pde_get(struct proc_dir_entry *pde)\n {\n \trefcount_inc(&pde->refcnt);\n"
    "+\tWRITE_ONCE(pde->flags, READ_ONCE(pde->flags));\n }\n extern void pde_put(struct proc_dir_entry *);\n \n")


def _text_sections(obj: Path) -> dict[str, bytes]:
    from elftools.elf.elffile import ELFFile

    with obj.open("rb") as f:
        return {s.name: s.data() for s in ELFFile(f).iter_sections()
                if s.name.startswith(".text") and s["sh_type"] == "SHT_PROGBITS"}


def test_header_change_compiles_every_user_from_the_overlay(kernel: KernelLayout, unchanged_tree: None,
                                                            tmp_path: Path) -> None:
    """A static inline changed in fs/proc/internal.h: every object whose .cmd lists the header is compiled
    twice through the view, and exactly the functions calling the inline differ (pde_get: generic.c's
    lookup/readdir, root.c's proc_fill_super); nothing is read from the tree's copy of the header."""
    from klpforge.kbuild.overlay import Overlay
    from klpforge.kbuild.patchfile import SourcePatch
    from klpforge.kbuild.pipeline import SECTION_FLAGS, _changed_objects, _compile_all
    from klpforge.kbuild.tree import KernelTree

    p = tmp_path / "h.patch"
    p.write_text(HEADER_PATCH)
    sp = SourcePatch.parse(p)
    tree = KernelTree(kernel.src, kernel.build)
    objs, _ = _changed_objects(tree, sp)
    users = {str(c.relative_to(kernel.build)).replace("/.", "/")[:-4] for c in kernel.build.rglob(".*.o.cmd")
             if f"{kernel.src}/fs/proc/internal.h" in c.read_text()}
    assert set(objs) == {u for u in users if (kernel.build / u).is_file()}
    assert {"fs/proc/generic.o", "fs/proc/root.o", "fs/proc/base.o"} <= set(objs)
    ov = Overlay(tree.src, tmp_path / "src", sp.files)
    ov.snapshot(sp)
    ov.build_view()
    out = {}
    for which in ("orig", "new"):
        ov.show(which)
        out[which] = _compile_all(tree, ov, objs, tmp_path / which, 2, SECTION_FLAGS)
    changed = {o: sorted(k for k, v in _text_sections(out["new"][o]).items()
                         if _text_sections(out["orig"][o]).get(k) != v) for o in objs}
    changed = {o: c for o, c in changed.items() if c}
    assert set(changed) == {"fs/proc/generic.o", "fs/proc/root.o"}, changed
    assert ".text.proc_fill_super" in changed["fs/proc/root.o"]
