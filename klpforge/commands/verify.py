"""``klpforge verify MOD.ko --kernel BZIMAGE --check CMD``: prove a live patch in a booted kernel (QEMU).

>>> # klpforge verify livepatch-sample.ko --kernel $BZIMAGE --check 'cat /proc/cmdline' \\
>>> #     --expect 'this has been live patched'
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..qemu.modinfo import module_name
from ..qemu.modprobe import ModIndex, modname
from ..qemu.report import report_verify
from ..qemu.targets import module_targets
from ..qemu.verify import VerifySpec, check_bzimage, image_release, verify_module
from ..util.errors import InputError
from ..util.outputs import check_paths
from ..util.termout import console, note, status
from ..xen.cli import add_verify_args, run_xen_verify, wants_xen_verify

__all__ = ["register", "run_verify"]


def _files(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for s in specs:
        host, _, guest = s.partition(":")
        out[guest or f"/lib/klp/{Path(host).name}"] = Path(host)
    return out


def _tree_hints(kernel: Path, missing: list[str]) -> dict[str, str]:
    """``--preload <path>`` advice for each module in ``missing`` that the kernel's build tree has (its
    ``modules.order``, next to ``arch/x86/boot/bzImage``)."""
    hints: dict[str, str] = {}
    try:
        build = kernel.resolve().parents[3]
        order = (build / "modules.order").read_text().split()
    except (OSError, IndexError):
        return hints
    for line in order:
        ko = build / line.removesuffix(".o")
        ko = ko if ko.suffix == ".ko" else ko.with_suffix(".ko")
        name = ko.name.removesuffix(".ko").replace("-", "_")
        if name in missing and ko.is_file():
            hints[name] = f"--preload {ko}, or insmod it in --setup or --check"
    return hints


def run_verify(args: argparse.Namespace) -> int:
    """Boot, load, check, disable, unload; print each step; exit 1 with the console log saved on failure."""
    # every output and input before any work (issue 8)
    ins: dict[str, str | Path | None] = {"MOD.ko": args.module, "--kernel": args.kernel,
                                         "--gen-init-cpio": args.gen_init_cpio}
    for opt, paths in (("--preload", list(args.preload)), ("--file", list(_files(args.file).values()))):
        ins.update({opt if len(paths) == 1 else f"{opt} #{k}": p for k, p in enumerate(paths, 1)})
    check_paths({"--console-log": args.console_log}, ins)
    if wants_xen_verify(args):
        return run_xen_verify(args)
    con = console(stderr=True)
    kernel = Path(args.kernel) if args.kernel else None
    gen = Path(args.gen_init_cpio) if args.gen_init_cpio else None
    preload = [Path(p) for p in args.preload]
    memory = "256M"
    # the modules the patch has functions for: loaded first when shipped (--distro), else named if missing
    targets = module_targets(Path(args.module))
    preloaded = {module_name(p) for p in preload}
    hints: dict[str, str] = {}
    if args.distro:
        from ..distro import backend_for
        from ..distro.modules import plain_module, shipped_modules

        mod, release = backend_for(args.distro)
        with status(con, "verify", f"preparing {args.distro}"):
            tree = mod.prepare_tree(release)
        kernel = kernel or tree.vmlinuz
        gen = gen or tree.build / "usr/gen_init_cpio"
        wanted = [m for spec in args.load_modules for m in spec.split(",") if m]
        shipped = shipped_modules(tree)  # runs depmod once when the image ships no modules.dep
        assert tree.modules_dir is not None  # shipped_modules refused otherwise
        idx = ModIndex.read(tree.modules_dir)
        auto = [t for t in targets if t not in {modname(w) for w in wanted} and t not in preloaded and t in shipped]
        order = idx.load_order(wanted + auto)
        if auto:
            note("verify", f"loading {', '.join(auto)} too: the live patch has functions for "
                           f"{'them' if len(auto) > 1 else 'it'} (shipped with {release})")
        if order:
            note("verify", "modules loaded first, as modprobe orders them (modules.dep, modules.softdep): "
                           + ", ".join(order))
        # busybox insmod hands the file to init_module as it is: compressed shipped modules go in decompressed
        preload = [plain_module(tree.modules_dir / idx.path(m)) for m in order] + preload
        hints = {t: f"{t} is not shipped with {release}: --preload its .ko" for t in targets if t not in shipped}
        memory = "1G"  # a distribution kernel with its modules needs more than the test kernel
    elif args.load_modules:
        raise InputError("--load-modules needs --distro (it reads the shipped modules.dep); with --kernel give "
                         "--preload MOD.ko for each module, dependencies first")
    if kernel is None:
        raise InputError("give --kernel BZIMAGE or --distro NAME:RELEASE")
    check_bzimage(kernel)  # before "booting ..." is printed: a wrong file is one error line, no progress
    _check_release(Path(args.module), kernel)
    if not args.distro:
        hints = _tree_hints(kernel, [t for t in targets if t not in preloaded])
    spec = VerifySpec(ko=Path(args.module), bzimage=kernel, check=args.check, expect=args.expect,
                      timeout=args.timeout, preload=preload, files=_files(args.file),
                      after_check=args.after_check, after_expect=args.after_expect, append=args.append or "",
                      setup=args.setup, accel=args.accel, gen_init_cpio=gen, memory=memory,
                      load_hints=hints)
    with status(con, "verify", f"booting {spec.bzimage.name} with {spec.ko.name} under QEMU"):
        res = verify_module(spec, Path(args.console_log) if args.console_log else None)
    outs = [("check", res.check_output)]
    if not res.ok and res.dmesg.strip():  # the guest kernel's own words about the failure
        outs.append(("guest kernel log (last 20 lines)", "\n".join(res.dmesg.strip().splitlines()[-20:])))
    return report_verify(con, res, spec.ko, args.console_log, outs)


def _check_release(ko: Path, bzimage: Path) -> None:
    """Refuse (exit 2, the words of ``klpforge load``) a module built for another kernel release than the image
    says it is, before a boot whose insmod could only fail ("invalid module format")."""
    from ..qemu.modinfo import modinfo
    from ..util.errors import UnsafeChange

    built = modinfo(ko).get("vermagic", "").split(" ", 1)[0]
    release = image_release(bzimage)
    if built and release and built != release:
        raise UnsafeChange(f"refused: {ko.name}: built for kernel {built}, not {release} ({bzimage.name}'s "
                           "release): the guest's insmod would refuse it (vermagic)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``verify`` to the CLI."""
    p = subparsers.add_parser(
        "verify", help="boot a kernel under QEMU, load a livepatch module, check it, disable and unload it",
        description="Steps: boot, preload, insmod, enabled, transition (=0), check, patched (every object the "
                    "patch has functions for reads patched=1: a module target must be loaded), disable (sysfs dir "
                    "gone), unpatched, rmmod. Exit 0 only if all pass and the check exits 0 (and prints --expect).")
    p.add_argument("module", metavar="MOD.ko", help="livepatch module")
    p.add_argument("--kernel", metavar="BZIMAGE", help="kernel image to boot")
    p.add_argument("--load-modules", action="append", default=[], metavar="MOD[,MOD]",
                   help="with --distro debian:RELEASE: shipped modules (or aliases) to load first, as modprobe "
                        "would: dependencies (modules.dep) and soft dependencies (modules.softdep) first. The modules "
                        "the live patch has functions for are loaded without being named")
    p.add_argument("--check", required=True, metavar="CMD",
                   help="shell command run in the guest while patched")
    p.add_argument("--expect", metavar="TEXT", help="text the check's output must contain")
    p.add_argument("--setup", metavar="CMD", help="command run in the guest before the module is loaded "
                   "(e.g. start a task that sleeps in the patched function, with '&')")
    p.add_argument("--after-check", metavar="CMD", help="command run after the patch is disabled")
    p.add_argument("--after-expect", metavar="TEXT", help="text --after-check's output must contain")
    p.add_argument("--preload", action="append", default=[], metavar="MOD.ko",
                   help="module to insmod before the patch (e.g. the module being patched); repeatable")
    p.add_argument("--file", action="append", default=[], metavar="HOST[:GUEST]",
                   help="extra file for the guest (default guest path /lib/klp/NAME); repeatable")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="whole-run timeout (default 120)")
    p.add_argument("--console-log", metavar="FILE", help="save the serial console here (always)")
    p.add_argument("--append", metavar="ARGS", help="extra kernel command line")
    p.add_argument("--accel", default="tcg", help="QEMU accelerator (default tcg: software emulation)")
    p.add_argument("--gen-init-cpio", metavar="PATH", help="usr/gen_init_cpio (default: next to the kernel)")
    p.add_argument("--before-check", metavar="CMD", help="command run before the patch is applied (Xen)")
    add_verify_args(p)
    p.set_defaults(func=run_verify)
