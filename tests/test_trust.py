"""Issue 17: what klpforge runs and reads is trusted and bounded, and it leaves nothing running.

Every case runs the real CLI (``python -m klpforge``) in a subprocess and checks the one stderr line, the
exit code and that no work was done (no output, nothing created in the cache).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

PATCH = ROOT / "tests" / "distro_patches" / "00-nfsd-sequence-cve.patch"


def _klp(*args: str | Path, env: dict[str, str] | None = None, cwd: Path = ROOT,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klpforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout,
                          check=False)


def _one_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def _tree(d: Path) -> list[str]:
    """What the cache holds, byte-code aside (``<cache>/pycache``, klpforge.util.bytecode: private, its own)."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.relative_to(d).parts[0] != "pycache")


# ---------------------------------------------------------------- item 1: cache directories others can write


def test_cache_root_writable_by_others_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    p = _klp("kernel", "prepare", env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    line = _one_line(p)
    assert f"unsafe cache directory {cache}: it is writable by other users (mode 0777)" in line
    assert f"chmod go-w {cache}" in line
    assert _tree(cache) == []  # nothing unpacked, nothing built


def test_distro_debs_writable_by_others_is_refused_before_any_download(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    debs = cache / "distro" / "debian" / "debs"
    debs.mkdir(parents=True)
    debs.chmod(0o757)
    before = _tree(cache)
    p = _klp("build", "--distro", "debian:6.1.0-56-amd64", PATCH, "-o", tmp_path / "lp.ko",
             env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    assert f"unsafe cache directory {debs}: it is writable by other users (mode 0757)" in _one_line(p)
    assert _tree(cache) == before and not (tmp_path / "lp.ko").exists()


def test_directory_deep_in_a_prepared_tree_writable_by_others_is_refused(tmp_path: Path) -> None:
    """Not only the top: any directory under the release (here inside the prepared build tree)."""
    cache = tmp_path / "cache"
    deep = cache / "distro" / "debian" / "6.1.0-56-amd64" / "build" / "scripts" / "mod"
    deep.mkdir(parents=True)
    deep.chmod(0o777)
    p = _klp("build", "--distro", "debian:6.1.0-56-amd64", PATCH, "-o", tmp_path / "lp.ko",
             env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    assert f"unsafe cache directory {deep}: it is writable by other users" in _one_line(p)


def test_impact_index_cache_writable_by_others_is_refused(cc, tmp_path: Path) -> None:
    """``impact`` honours KLPFORGE_CACHE (item 7) and checks it like the others."""
    obj = cc("static int f(int x) { return x * 3; }\nint g(int x) { return f(x) + 1; }\n", "a",
             "-fdump-ipa-clones")
    cache = tmp_path / "cache"
    (cache / "impact").mkdir(parents=True)
    ok = _klp("impact", "--dumps", obj.parent, "f", env={"KLPFORGE_CACHE": str(cache)})
    assert ok.returncode == 0, ok.stderr
    assert list((cache / "impact").glob("*.npz")), "impact did not use KLPFORGE_CACHE"
    (cache / "impact").chmod(0o777)
    p = _klp("impact", "--dumps", obj.parent, "f", env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    assert f"unsafe cache directory {cache / 'impact'}: it is writable by other users" in _one_line(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_cache_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    other = cache / "distro"
    other.mkdir(parents=True)
    os.chown(other, 65534, 65534)  # nobody
    p = _klp("build", "--distro", "debian:6.1.0-56-amd64", PATCH, "-o", tmp_path / "lp.ko",
             env={"KLPFORGE_CACHE": str(cache)})
    assert p.returncode == 1
    line = _one_line(p)
    assert f"unsafe cache directory {other}: it is owned by nobody, not by root" in line
    assert f"chown root {other}" in line


def test_private_cache_under_sticky_tmp_is_accepted(tmp_path: Path) -> None:
    """/tmp is world-writable but sticky and root's: others cannot replace our entries (ssh's rule too)."""
    from klpforge.util.fsutil import check_private_dir
    assert os.stat("/tmp").st_mode & 0o1000
    cache = tmp_path / "cache" / "kernel-6.1" / "build"
    cache.mkdir(parents=True)
    check_private_dir(tmp_path / "cache")  # does not raise


# ---------------------------------------------------------------- item 4: no orphans on a signal


def _session(sid: int) -> list[str]:
    """``pid comm`` of every living process of session ``sid``: the command was started with ``setsid``, so
    all it started -- reparented to init or not -- is here unless it called setsid itself (none of ours do)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            st = (d / "stat").read_text()
        except OSError:
            continue
        f = st[st.rfind(")") + 2:].split()
        if int(f[3]) == sid and f[0] != "Z":
            out.append(f"{d.name} {st[st.find('(') + 1:st.rfind(')')]}")
    return out


def _start(args: list[str | Path], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "klpforge", *map(str, args)], cwd=cwd, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for(proc: subprocess.Popen[str], names: tuple[str, ...], timeout: float = 300) -> None:
    """Until a process named one of ``names`` runs in ``proc``'s session (the command is mid-way)."""
    deadline = time.monotonic() + timeout
    while not any(p.split(" ", 1)[1] in names for p in _session(proc.pid)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {names} after {timeout} s: {_session(proc.pid)}"
        time.sleep(0.1)


def _gone(sid: int, within: float) -> list[str]:
    deadline = time.monotonic() + within
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129}
WORD = {signal.SIGTERM: "terminated by SIGTERM", signal.SIGINT: "interrupted", signal.SIGHUP: "terminated by SIGHUP"}


@pytest.mark.kernel
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])  # SIGINT: flag-cost, SIGHUP: verify
def test_distro_prepare_signalled_leaves_no_process(kernel, tmp_path: Path, sig: int) -> None:
    """The distribution backend's ``make prepare`` (plain form: the test kernel's source and config, a cold
    private cache) signalled mid-way: make and every compiler it started are gone. SIGKILL cannot be
    handled: make dies with klpforge (PR_SET_PDEATHSIG) and the compile it was running ends on its own."""
    cache = tmp_path / "cache"
    proc = _start(["build", "-s", kernel.src, "-c", kernel.build / ".config", "-j", "2", "-o", tmp_path / "x.ko",
                   ROOT / "tests/kernel_patches/01-cmdline-text.patch"], env={"KLPFORGE_CACHE": str(cache)})
    try:
        _wait_for(proc, ("cc1", "conf", "fixdep", "gcc"))
        time.sleep(1)
        os.kill(proc.pid, sig)
        _out, err = proc.communicate(timeout=60)
        if sig != signal.SIGKILL:
            assert proc.returncode == EXIT[sig] and err == f"klpforge build: {WORD[sig]}\n"
        left = _gone(proc.pid, 2 if sig != signal.SIGKILL else 30)
        assert left == [], f"still running after {signal.Signals(sig).name}: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in _session(proc.pid):  # never leave them to the next test
            os.kill(int(p.split()[0]), signal.SIGKILL)


SHARED_DEBS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "klpforge/distro/debian/debs"


@pytest.mark.distro
@pytest.mark.skipif(not list(SHARED_DEBS.glob("linux-source-6.1_*.deb")),
                    reason="no Debian 6.1.0-56 packages in the user cache (tests/test_distro_debian.py fetches them)")
def test_debian_prepare_signalled_leaves_no_process(tmp_path: Path) -> None:
    """``build --distro debian:6.1.0-56-amd64`` with a cold private cache (the packages hard-linked from the
    user cache, nothing unpacked or prepared): SIGTERM once ``make prepare`` compiles; nothing survives."""
    debs = tmp_path / "cache/distro/debian/debs"
    debs.mkdir(parents=True)
    for d in SHARED_DEBS.glob("*.deb"):
        try:
            os.link(d, debs / d.name)
        except OSError:
            pytest.skip("the user cache is on another file system")
    proc = _start(["build", "--distro", "debian:6.1.0-56-amd64", PATCH, "-o", tmp_path / "x.ko"],
                  env={"KLPFORGE_CACHE": str(tmp_path / "cache")})
    try:
        deadline = time.monotonic() + 400
        while not any(p.split(" ", 1)[1] in ("cc1", "fixdep", "conf") for p in _session(proc.pid)):
            if proc.poll() is not None:
                pytest.skip(f"the build ended before make ran: {proc.communicate()[1].strip()}")
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 143 and err.endswith("klpforge build: terminated by SIGTERM\n"), err
        left = _gone(proc.pid, 2)
        assert left == [], f"still running after SIGTERM: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in _session(proc.pid):
            os.kill(int(p.split()[0]), signal.SIGKILL)


@pytest.mark.kernel
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_verify_signalled_with_a_hung_guest_leaves_no_qemu(kernel, tmp_path: Path, sig: int) -> None:
    """``verify`` whose guest never finishes its check; SIGKILL of klpforge (nothing of klpforge runs after
    it) still ends QEMU at once: the kernel kills it with its parent (PR_SET_PDEATHSIG)."""
    ko = kernel.build / "samples/livepatch/livepatch-sample.ko"
    proc = _start(["verify", ko, "--kernel", kernel.bzimage, "--check", "sleep 600"],
                  env={"TMPDIR": str(tmp_path)})
    try:
        _wait_for(proc, ("qemu-system-x86",))
        time.sleep(3)  # booting
        os.kill(proc.pid, sig)
        _out, err = proc.communicate(timeout=60)
        if sig != signal.SIGKILL:
            assert proc.returncode == EXIT[sig] and err == f"klpforge verify: {WORD[sig]}\n"
        left = _gone(proc.pid, 3)
        assert left == [], f"still running after {signal.Signals(sig).name}: {left}"
    finally:
        for p in _session(proc.pid):
            os.kill(int(p.split()[0]), signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_flag_cost_parallel_compiles_signalled_leave_no_process(gcc: str, tmp_path: Path, sig: int) -> None:
    """flag-cost's two compilers at once (``-j 2``), each a slow compiler (a script that sleeps, then runs
    gcc), signalled: no compiler survives."""
    slow = tmp_path / "slowcc"
    slow.write_text(f'#!/bin/sh\nfor a; do [ "$a" = -c ] && sleep 600; done\nexec {gcc} "$@"\n')
    slow.chmod(0o755)
    src, build = tmp_path / "src", tmp_path / "build"
    for u in ("a", "b"):
        (src / "d").mkdir(parents=True, exist_ok=True)
        (src / f"d/{u}.c").write_text(f"int {u}(int x) {{ return x + 1; }}\n")
        (build / "d").mkdir(parents=True, exist_ok=True)
        (build / f"d/.{u}.o.cmd").write_text(
            f"cmd_d/{u}.o := {slow} -O2 -c -o d/{u}.o {src}/d/{u}.c\n\nsource_d/{u}.o := {src}/d/{u}.c\n")
    (src / "Makefile").write_text("# fake\n")
    proc = _start(["flag-cost", "-s", src, "-O", build, "-j", "2", "d/"])
    try:
        _wait_for(proc, ("sleep",), timeout=60)
        time.sleep(0.5)
        os.kill(proc.pid, sig)
        _out, err = proc.communicate(timeout=60)
        if sig != signal.SIGKILL:
            assert proc.returncode == EXIT[sig] and err == f"klpforge flag-cost: {WORD[sig]}\n"
            assert _gone(proc.pid, 2) == []
        else:  # the sh dies with klpforge (PDEATHSIG); the watchdog ends its group, the sleep with it
            assert _gone(proc.pid, 3 + 2) == []  # the watchdog ends the sleep the killed sh left
    finally:
        for p in _session(proc.pid):
            os.kill(int(p.split()[0]), signal.SIGKILL)


# ---------------------------------------------------------------- item 5: inputs are regular files, bounded

FIX_C = "static int f(int x) { return x * 3; }\nint g(int x) { return f(x) + 1; }\n"


@pytest.fixture
def inputs(cc, tmp_path: Path) -> dict[str, Path]:
    """A real pair, its dump, a patch, a FIFO and /dev/zero."""
    a = cc(FIX_C, "a", "-fdump-ipa-clones")
    b = cc(FIX_C.replace("x * 3", "x * 5"), "b")
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a/unit.c\n+++ b/unit.c\n@@ -1,2 +1,2 @@\n-static int f(int x) { return x * 3; }\n"
                     "+static int f(int x) { return x * 5; }\n int g(int x) { return f(x) + 1; }\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {"a": a, "b": b, "dumps": a.parent, "patch": patch, "fifo": fifo, "zero": Path("/dev/zero"),
            "out": tmp_path / "out.o"}


#: (what is replaced, the command line with X where the bad input goes, the option the message names)
BAD_INPUT_CASES = [
    ("ORIG", "diff X {b} -o {out} --symtab {a}", "ORIG"),
    ("PATCHED", "diff {a} X -o {out} --symtab {a}", "PATCHED"),
    ("--symtab", "diff {a} {b} -o {out} --symtab X", "--symtab"),
    ("--symvers", "diff {a} {b} -o {out} --symtab {a} --symvers X", "--symvers"),
    ("--impact", "diff {a} {b} -o {out} --symtab {a} --impact X", "--impact"),
    ("--dumps", "impact --dumps X f", "--dumps"),
    ("--patch", "impact --dumps {dumps} --patch X --source {dumps}", "--patch"),
    ("build patch", "build -s {dumps} X -o {out}.ko", "patch"),
    ("distro patch", "build --distro debian:6.1.0-56-amd64 X -o {out}.ko", "patch"),
    ("second patch", "build --distro debian:6.1.0-56-amd64 {patch} X -o {out}.ko", "patch #2"),
    ("-c", "build -s {dumps} -c X {patch} -o {out}.ko", "-c"),
    ("--symbols", "build -s {dumps} -c {patch} --symbols X {patch} -o {out}.ko", "--symbols"),
    ("build --symvers", "build -s {dumps} -c {patch} --symvers X {patch} -o {out}.ko", "--symvers"),
    ("--xen-syms", "build --xen -s {dumps} --xen-syms X {patch}", "--xen-syms"),
    ("MOD.ko", "verify X --kernel {a} --check true", "MOD.ko"),
    ("--kernel", "verify {a} --kernel X --check true", "--kernel"),
    ("--preload", "verify {a} --kernel {a} --preload X --check true", "--preload"),
]


@pytest.mark.parametrize("bad", ["fifo", "zero"])
@pytest.mark.parametrize("case", BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
def test_fifo_and_dev_zero_inputs_end_at_once(inputs: dict[str, Path], tmp_path: Path, bad: str,
                                              case: tuple[str, str, str]) -> None:
    _name, line, label = case
    x = inputs[bad]
    argv = [w.format(**inputs) if w != "X" else str(x) for w in line.split()]
    t = time.monotonic()
    p = _klp(*argv, timeout=60, env={"KLPFORGE_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 1, p.stderr
    kind = "a FIFO" if bad == "fifo" else "a character device"
    assert _one_line(p).endswith(f": {label} {x}: not a regular file ({kind})")
    assert time.monotonic() - t < 30
    assert not inputs["out"].exists() and not Path(f"{inputs['out']}.ko").exists()


@pytest.mark.parametrize("bad", ["fifo", "zero"])
def test_fifo_and_dev_zero_found_by_impact_end_at_once(inputs: dict[str, Path], tmp_path: Path, bad: str) -> None:
    """Files ``impact`` finds itself: a dump in the --dumps directory, a name in a list of dumps."""
    dumps = inputs["dumps"]
    lst = tmp_path / "dumps.txt"
    lst.write_text(f"{next(dumps.glob('*.ipa-clones'))}\n{inputs[bad]}\n")
    p = _klp("impact", "--dumps", lst, "f", "--no-cache")
    assert p.returncode == 1
    assert _one_line(p) == f"klpforge impact: {lst}:2: listed dump '{inputs[bad]}' is not a regular file"
    if bad == "fifo":
        os.mkfifo(dumps / "z.c.000i.ipa-clones")
        p = _klp("impact", "--dumps", dumps, "f", "--no-cache", timeout=60)
        assert p.returncode == 1
        assert _one_line(p) == f"klpforge impact: {dumps / 'z.c.000i.ipa-clones'}: not a regular file (a FIFO)"


def test_a_patch_of_gigabytes_is_refused_unread(inputs: dict[str, Path], tmp_path: Path) -> None:
    """A size makes no sense for a patch or a Module.symvers: refused by ``stat`` (a sparse file here)."""
    big = tmp_path / "huge.patch"
    with big.open("wb") as f:
        f.truncate(300 << 20)
    p = _klp("build", "-s", inputs["dumps"], big, "-o", tmp_path / "x.ko")
    assert p.returncode == 1
    assert _one_line(p) == (f"klpforge build: patch {big}: 300 MiB is larger than the 256 MiB such a file can "
                            "sensibly be")
    p = _klp("diff", inputs["a"], inputs["b"], "-o", inputs["out"], "--symtab", inputs["a"], "--symvers", big)
    assert p.returncode == 1 and "--symvers" in _one_line(p) and "larger than the 256 MiB" in _one_line(p)


# ---------------------------------------------------------------- item 6: impact linear in inline depth


def test_deep_inline_chain_shares_its_steps_and_output_stays_linear(cc, tmp_path: Path) -> None:
    """A 300-deep always_inline chain compiled by gcc: every function's chain is complete in memory (shared
    prefixes), and the output names the function whose chain a long one starts with instead of repeating
    it, so following those names rebuilds each chain exactly."""
    import json

    from klpforge.ipa.closure import impact
    from klpforge.ipa.dumps import find_dumps
    from klpforge.ipa.index import load_index
    from klpforge.ipa.report import CHAIN_SHOWN

    depth = 300
    src = ["static inline __attribute__((always_inline)) int f0(int x) { return x + 1; }"]
    src += [f"static inline __attribute__((always_inline)) int f{i}(int x) {{ return f{i - 1}(x) * 3 + {i}; }}"
            for i in range(1, depth)]
    src.append(f"int top(int x) {{ return f{depth - 1}(x); }}")
    obj = cc("\n".join(src) + "\n", "deep", "-fdump-ipa-clones")
    res = impact(load_index(find_dumps(obj.parent), use_cache=False), ["f0"])
    by_name = {e.name: e for e in res.entries}
    top = by_name["top"]
    assert len(top.chain) == depth and [s.dst for s in top.chain][:2] == ["f1", "f2"]
    assert top.chain[-1].src == f"f{depth - 1}" and top.transforms == ["inline"]
    assert top.chain.parent is by_name[f"f{depth - 1}"].chain  # shared, not copied
    p = _klp("impact", "--dumps", obj.parent, "--no-cache", "--json", "f0")
    assert p.returncode == 0, p.stderr
    doc = {e["name"]: e for e in json.loads(p.stdout)["entries"]}
    assert sum(len(e["chain"]) for e in doc.values()) <= CHAIN_SHOWN * len(doc)

    def full(name: str) -> list[str]:
        e = doc[name]
        head = full(e["chain"][0]["src"]) if e.get("chain_elided") else []
        return head + [f"{s['src']}>{s['dst']}" for s in e["chain"]]

    assert doc["top"]["chain_elided"] == depth - CHAIN_SHOWN
    assert full("top") == [f"{s.src}>{s.dst}" for s in top.chain]
    text = _klp("impact", "--dumps", obj.parent, "--no-cache", "f0").stdout
    assert f"... {depth - CHAIN_SHOWN} earlier steps: the chain of `f{depth - CHAIN_SHOWN}`" in text
    assert len(text.splitlines()) < (CHAIN_SHOWN + 2) * len(doc) + 10


# ---------------------------------------------------------------- item 7: the small ones


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_users_umask(inputs: dict[str, Path], tmp_path: Path, mask: int) -> None:
    """As gcc gives an object: 0666 less the umask (mkstemp alone gave 0600), still written atomically."""
    out, rep = inputs["out"], tmp_path / "r.json"
    p = subprocess.run(["sh", "-c", f'umask {mask:03o}; exec "$@"', "sh", sys.executable, "-m", "klpforge", "diff",
                        str(inputs["a"]), str(inputs["b"]), "-o", str(out), "--symtab", str(inputs["a"]),
                        "--json", str(rep), "-q"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr
    gcc_made = inputs["a"]  # compiled under pytest's umask: compare with what we expect, not with it
    assert gcc_made.exists()
    for f in (out, rep):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, oct(f.stat().st_mode)
    assert [x.name for x in out.parent.iterdir() if x.name.startswith(".")] == []  # no temporary left


@pytest.mark.parametrize("path", ["/etc/passwd", "a/../../etc/passwd"])
def test_patch_leaving_the_tree_is_refused(inputs: dict[str, Path], tmp_path: Path, path: str) -> None:
    """An absolute path is refused like '..' (GNU patch -p1 would strip the '/' and patch etc/passwd)."""
    bad = tmp_path / "bad.patch"
    bad.write_text(f"--- {path}\n+++ {path}\n@@ -1 +1 @@\n-root\n+toor\n")
    why = "an absolute path" if path.startswith("/") else "a '..' component"
    want = f"{bad}:1: {path}: {why}; a patched path must stay inside the source tree"
    p = _klp("build", "-s", inputs["dumps"], bad, "-o", tmp_path / "x.ko")
    assert p.returncode == 1 and _one_line(p) == f"klpforge build: {want}"
    p = _klp("impact", "--dumps", inputs["dumps"], "--patch", bad, "--source", inputs["dumps"])
    assert p.returncode == 1 and _one_line(p) == f"klpforge impact: {want}"


def test_diff_json_written_on_refusal_as_help_says(cc, tmp_path: Path) -> None:
    """``--help`` and the behaviour agree: a refused diff writes its --json (result, exit, error, reasons),
    never the live patch; the fields are build --json's."""
    import json

    a = cc("int counter = 1;\nint get(void) { return counter; }\n", "a")
    b = cc("int counter = 2;\nint get(void) { return counter; }\n", "b")
    rep, out = tmp_path / "r.json", tmp_path / "lp.o"
    p = _klp("diff", a, b, "-o", out, "--symtab", a, "--json", rep)
    assert p.returncode == 2, p.stderr
    doc = json.loads(rep.read_text())
    assert doc["result"] == "refused" and doc["exit"] == 2 and doc["reasons"] and doc["error"] in _one_line(p)
    assert not out.exists()
    same = _klp("diff", a, a, "-o", out, "--symtab", a, "--json", rep)
    assert same.returncode == 3 and json.loads(rep.read_text())["result"] == "no change"
    assert "written too when the diff is refused" in " ".join(_klp("diff", "--help").stdout.split())


@pytest.mark.distro
@pytest.mark.skipif(not Path("/usr/bin/apt-get").exists(), reason="needs apt")
def test_unknown_release_leaves_no_directory_in_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    p = _klp("build", "--distro", "debian:6.1.0-999-amd64", PATCH, "-o", tmp_path / "x.ko",
             env={"KLPFORGE_CACHE": str(cache)}, timeout=300)
    assert p.returncode == 1 and "6.1.0-999-amd64" in _one_line(p)
    assert not (cache / "distro/debian/6.1.0-999-amd64").exists() and not (cache / "distro/debian/debs").exists()


# ---------------------------------------------------------------- item 2: provenance, reproducible .ko


@pytest.mark.kernel
def test_two_builds_of_one_fix_are_byte_identical_and_say_what_went_in(kernel, tmp_path: Path) -> None:
    """The same fix built twice from the same inputs -- other working directory, other temporary
    directories, later -- gives the same bytes; the report and .modinfo name the patch by SHA-256, the
    compiler and klpforge's version."""
    import hashlib
    import json
    import re

    import klpforge

    patch = ROOT / "tests/kernel_patches/01-cmdline-text.patch"
    kos = []
    for run in ("one", "two"):
        d = tmp_path / run
        d.mkdir()
        p = _klp("build", "-s", kernel.src, "-O", kernel.build, "-j", "2", patch, "-o", d / "lp-fix.ko",
                 "--json", d / "r.json", cwd=d, timeout=600)
        assert p.returncode == 0, p.stderr
        kos.append(d / "lp-fix.ko")
    assert kos[0].read_bytes() == kos[1].read_bytes()
    sha = hashlib.sha256(patch.read_bytes()).hexdigest()
    cc = re.search(r'^CONFIG_CC_VERSION_TEXT="([^"]*)"', (kernel.build / ".config").read_text(), re.M)
    assert cc is not None
    prov = json.loads((tmp_path / "one/r.json").read_text())["provenance"]
    assert prov == {"klpforge": klpforge.__version__, "compiler": cc.group(1),
                    "patches": [{"file": patch.name, "sha256": sha}]}
    info = subprocess.run(["readelf", "-p", ".modinfo", str(kos[0])], capture_output=True, text=True,
                          check=True).stdout
    assert f"klpforge={klpforge.__version__}" in info
    assert f"klpforge_patch=sha256:{sha} {patch.name}" in info
    assert f"klpforge_compiler={cc.group(1)}" in info
    assert str(tmp_path) not in kos[0].read_bytes().decode("latin-1")  # no path of the build in the module


def test_debian_provenance_names_each_package_by_version_and_hash(tmp_path: Path) -> None:
    """The record a --distro build puts in its report and .modinfo, from the prepared release's stamp and the
    packages in debs/ (an epoch is written %3a in Debian file names)."""
    import hashlib
    import json

    from klpforge.util.provenance import debian_packages, modinfo, record

    root = tmp_path / "distro/debian/6.1.0-56-amd64"
    root.mkdir(parents=True)
    (tmp_path / "distro/debian/debs").mkdir()
    names = {"image": "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb",
             "kbuild": "linux-kbuild-6.1_1%3a6.1.192-3_amd64.deb"}
    for role, n in names.items():
        (tmp_path / "distro/debian/debs" / n).write_bytes(role.encode() * 1000)
    (root / "prepared.json").write_text(json.dumps({"format": 1, "debs": names}))
    pk = debian_packages(root)
    assert [(p["package"], p["version"]) for p in pk] == [("linux-image-6.1.0-56-amd64", "6.1.192-2"),
                                                         ("linux-kbuild-6.1", "1:6.1.192-3")]
    assert pk[0]["sha256"] == hashlib.sha256(b"image" * 1000).hexdigest()
    tags = modinfo(record([], "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0", pk))
    assert ("klpforge_package", f"linux-kbuild-6.1=1:6.1.192-3 sha256:{pk[1]['sha256']}") in tags
    assert debian_packages(tmp_path / "distro/plain/x") == []  # the plain form has no packages
