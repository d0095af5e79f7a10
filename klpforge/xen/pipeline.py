"""``klpforge build --xen``: from a built Xen tree and a source patch to a livepatch payload.

Steps (each timed): *check* (tree built with CONFIG_LIVEPATCH, the patch applies, which objects it
changes), *orig* and *patched* (recompile those objects with their recorded commands into a temp dir; the
patch is applied to private copies and both compiles read the tree through an
:class:`~klpforge.kbuild.overlay.Overlay` view: the user's tree is never written), *diff* (read →
correlate → compare → select → :func:`klpforge.xen.emit.emit_xen` per object),
*link* (``ld -r --build-id=sha1`` with the dependency notes).

>>> res = build_xen_payload(XenBuildOptions(src=Path("xen"), patch=Path("fix.patch"),
...                         xen_syms=Path("xen-syms"), output=Path("fix.livepatch")))  # doctest: +SKIP
>>> [f.name for f in res.funcs]                                                       # doctest: +SKIP
['evtchn_fifo_expand_array']
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..diff.arch import arch_for
from ..diff.compare import compare
from ..diff.correlate import correlate
from ..diff.model import Object
from ..diff.run import check_pair
from ..diff.select import select
from ..kbuild.overlay import Overlay
from ..kbuild.patchfile import SourcePatch, unknown_reach
from ..util.buildlog import BuildLog
from ..util.errors import InputError, KlpError, NoChange, UnsafeChange
from ..util.fsutil import scratch_dir
from ..util.proc import signals_held
from .emit import XenEmitOptions, XenFunc, emit_xen
from .payload import link_payload
from .syms import XenSyms
from .tree import XenTree

__all__ = ["XenBuildOptions", "XenBuildResult", "build_xen_payload", "STEPS", "hooks_include_dir"]

STEPS = ("check", "orig", "patched", "diff", "link")


def hooks_include_dir() -> Path:
    """Directory with ``xen-livepatch-hooks.h`` (``-I`` on both compiles)."""
    from importlib import resources
    return Path(str(resources.files("klpforge") / "data"))


@dataclass
class XenBuildOptions:
    src: Path
    patch: Path
    xen_syms: Path
    output: Path | None = None
    config: Path | None = None
    keep_tmp: bool = False


@dataclass
class XenBuildResult:
    output: Path
    funcs: list[XenFunc]
    objects: list[str]
    unchanged: list[str]
    build_id: str
    timings: dict[str, float] = field(default_factory=dict)
    special_kept: dict[str, tuple[int, int]] = field(default_factory=dict)
    tmpdir: str | None = None
    hooks: list[str] = field(default_factory=list)  # .livepatch.hooks.<kind> sections in the payload


def _check_compiler(xs: XenSyms, obj: Path) -> None:
    """The compiler on PATH must be the one that built the running hypervisor (``.comment``)."""
    from ..elf import ElfFile

    def comments(e: ElfFile) -> list[str]:
        i = e.find_section(".comment")
        return [] if i is None else [c for c in e.section_bytes(i).decode(errors="replace").split("\0") if c]
    ours, theirs = comments(ElfFile.open(obj)), comments(xs.elf)
    if ours and theirs and not set(ours) & set(theirs):
        raise InputError(f"the compiler here ({ours[0]!r}) is not the one that built {xs.path.name} "
                         f"({theirs[0]!r}): code would differ from the running hypervisor's")


def _config_lines(text: str) -> set[str]:
    """The settings of a Kconfig file (comments and blank lines do not count)."""
    return {ln.strip() for ln in text.splitlines() if ln.startswith("CONFIG_")}


def _objects(tree: XenTree, patch: SourcePatch) -> list[str]:
    objs: list[str] = []
    for f in patch.files:
        if not f.startswith("xen/"):
            raise UnsafeChange(f"{f}: outside xen/, not part of the hypervisor")
        if f.endswith((".S", ".s", ".lds", ".lds.S")):
            raise UnsafeChange(f"{f}: assembly and linker scripts cannot be live-patched "
                               "(no function boundaries to redirect)")
        hits = tree.objects_for(f)
        for o in hits:
            stem = Path(o)
            if (tree.hv / stem.parent / f".{stem.stem}.init.o.cmd").is_file():
                raise UnsafeChange(f"{f}: {o} is built as {stem.stem}.init.o, all of it __init code, which "
                                   "has run and been freed in the running hypervisor")
        if not hits and f.endswith(".c"):
            raise InputError(f"{f}: not compiled in this configuration (no object records it)")
        if not hits and f not in patch.created and (why := unknown_reach(f)):
            raise InputError(f"{f}: {why}")
        objs += [o for o in hits if o not in objs]
    if not objs:
        raise NoChange(f"{patch.path.name} changes no compiled hypervisor object")
    return objs


def build_xen_payload(opts: XenBuildOptions,
                      progress: Callable[[str, str], None] = lambda _s, _m: None) -> XenBuildResult:
    """Build the payload (see the module docstring). Raises :class:`InputError` (1),
    :class:`UnsafeChange` (2, every refusal with its symbol and reason) or :class:`NoChange` (3);
    nothing is written then, and the tree is left as it was. The build log is kept in the cache on failure
    and attached to the error (:mod:`klpforge.util.buildlog`)."""
    blog: BuildLog | None = None
    try:
        with signals_held():  # no moment where a signal would leave the log file in $TMPDIR
            blog = BuildLog.start("build", opts.patch.name.removesuffix(".patch").removesuffix(".diff"))
        res = _build_xen_payload(opts, blog.wrap(progress))
    except BaseException as e:
        if blog is not None:
            blog.failed(e)
        raise
    blog.succeeded()
    return res


def _build_xen_payload(opts: XenBuildOptions, progress: Callable[[str, str], None]) -> XenBuildResult:
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def lap(step: str) -> None:
        nonlocal t0
        now = time.monotonic()
        timings[step] = timings.get(step, 0.0) + now - t0
        t0 = now

    progress("check", "checking the tree and the patch")
    tree = XenTree(opts.src)
    if tree.config_value("LIVEPATCH") != "y":
        raise InputError(f"{tree.config}: CONFIG_LIVEPATCH is not set: this hypervisor cannot load payloads")
    if opts.config is not None:
        try:
            want = _config_lines(opts.config.read_text(errors="replace"))
        except OSError as e:
            raise InputError(f"{opts.config}: cannot read ({e.strerror})") from None
        have = _config_lines(tree.config.read_text(errors="replace"))
        if want != have:
            diff = sorted(want ^ have)[:3]
            raise InputError(f"{tree.config} differs from {opts.config} ({', '.join(diff)}): build the tree "
                             "with the running hypervisor's configuration")
    xs = XenSyms.load(opts.xen_syms)
    patch = SourcePatch.parse(opts.patch)
    patch.check_tree(tree.root)
    objs = _objects(tree, patch)
    out = opts.output or Path(f"{opts.patch.stem}.livepatch")
    inc = ["-I", str(hooks_include_dir())]
    with scratch_dir("klpforge-xen-", keep=opts.keep_tmp) as tmp:
        try:
            ov = Overlay(tree.root, tmp / "overlay", patch.files)
            ov.snapshot(patch)  # raises if the patch does not apply
            ov.build_view()
            lap("check")
            progress("orig", f"compiling {len(objs)} original object(s)")
            ov.show("orig")
            for o in objs:
                tree.compile(o, tmp / "orig" / o, inc, view=ov.view)
            _check_compiler(xs, tmp / "orig" / objs[0])
            lap("orig")
            progress("patched", "compiling the patched object(s)")
            ov.show("new")
            for o in objs:
                tree.compile(o, tmp / "patched" / o, inc, view=ov.view)
            lap("patched")
            progress("diff", "diffing")
            funcs: list[XenFunc] = []
            parts: list[Path] = []
            refusals: list[str] = []
            unchanged: list[str] = []
            kept: dict[str, tuple[int, int]] = {}
            for o in objs:
                a, b = Object.load(tmp / "orig" / o), Object.load(tmp / "patched" / o)
                check_pair(a, b)
                arch = arch_for(a.elf.machine)
                if arch.name != "x86_64":
                    raise InputError(f"{o}: {arch.name} objects: only x86_64 Xen payloads are supported")
                corr = correlate(a, b)
                cmp = compare(corr, arch)
                sel = select(corr, cmp, arch, require_ftrace=False)
                if sel.refusals:
                    refusals += [f"{o}: {r}" for r in sel.refusals]
                    continue
                if not sel.included:
                    unchanged.append(o)
                    continue
                part = emit_xen(corr, cmp, sel, arch, XenEmitOptions(xs))
                if part.refusals:
                    refusals += [f"{o}: {r}" for r in part.refusals]
                    continue
                pp = tmp / "parts" / (o.replace("/", "__") + ".o")
                pp.parent.mkdir(parents=True, exist_ok=True)
                pp.write_bytes(part.data)
                parts.append(pp)
                funcs += part.funcs
                for k, v in part.special_kept.items():
                    was = kept.get(k, (0, 0))
                    kept[k] = (was[0] + v[0], was[1] + v[1])
            if refusals:
                raise UnsafeChange(refusals)
            if not funcs and not parts:
                raise NoChange(f"{opts.patch.name}: no function of {', '.join(objs)} changed")
            lap("diff")
            progress("link", f"linking {out.name}")
            link_payload(parts, out, xs.build_id, xs.build_id)
            lap("link")
            from ..elf import ElfFile
            from .syms import read_build_id
            hooks = sorted(n[len(".livepatch.hooks."):] for n in ElfFile.open(out).section_names
                           if n.startswith(".livepatch.hooks."))
            return XenBuildResult(out, funcs, [o for o in objs if o not in unchanged], unchanged,
                                  read_build_id(out).hex(), timings, kept, str(tmp) if opts.keep_tmp else None, hooks)
        except KlpError as e:
            if opts.keep_tmp:
                e.kept = tmp
            raise
