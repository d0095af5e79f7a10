"""``klpforge impact``: which functions must a live patch replace, given what GCC inlined and cloned.

>>> # klpforge impact --dumps build/ helper
>>> # klpforge impact --distro debian:6.1.0-56-amd64 --patch fix.patch --svg impact.svg
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..util.errors import InputError
from ..util.outputs import atomic_write, check_paths
from ..util.proc import signals_held

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``impact`` sub-command."""
    p = subparsers.add_parser(
        "impact", help="functions a live patch must replace (from -fdump-ipa-clones dumps)",
        description="Compute the functions a live patch must replace when FUNC... (or the functions a patch "
                    "touches) change: inlined copies, IPA clones and their callers, cold parts and aliases.")
    p.add_argument("--dumps", metavar="DIR_OR_LIST",
                   help="directory searched for *.ipa-clones, one dump, or a file listing dumps")
    p.add_argument("--distro", metavar="NAME:RELEASE",
                   help="a distribution kernel (debian:6.1.0-56-amd64): its prepared tree gives the source, the "
                        "objects and their dumps (objects without a dump are compiled first)")
    p.add_argument("--objects", metavar="DIR", type=Path,
                   help="directory of the objects (default: X.o or X.o.syms beside each dump)")
    p.add_argument("funcs", nargs="*", metavar="FUNC", help="function name or file.c:name")
    p.add_argument("--patch", type=Path, help="unified diff: analyse the functions its hunks touch (found from "
                   "the objects' DWARF line tables when built with -g, else by parsing the source)")
    p.add_argument("--source", type=Path,
                   help="source tree the patch applies to (default: current directory)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text tree")
    p.add_argument("--dot", type=Path, metavar="OUT.dot", help="write the impact graph for Graphviz")
    p.add_argument("--svg", type=Path, metavar="OUT.svg", help="render the impact graph with Graphviz")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk index")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``klpforge impact``; returns the exit code."""
    from ..ipa import report
    from ..ipa.closure import impact
    from ..ipa.dumps import find_dumps
    from ..ipa.index import load_index

    if args.distro and args.dumps:
        raise InputError("give either --distro or --dumps, not both (--distro finds the release's dumps itself)")
    if args.distro and (args.objects or args.source):
        raise InputError(f"--distro uses the prepared tree's source and objects: drop "
                         f"{'--objects' if args.objects else '--source'}")
    if not args.distro and not args.dumps:
        raise InputError("give --dumps DIR_OR_LIST, or --distro NAME:RELEASE")
    if args.patch and args.funcs:
        raise InputError("give either FUNC... or --patch, not both")
    if not args.patch and not args.funcs:
        raise InputError("nothing to analyse: give FUNC... or --patch FILE")
    if args.dot and args.svg:
        raise InputError("give either --dot or --svg, not both")
    if args.distro:
        return _run_distro(args)
    if args.source is None:
        args.source = Path(".")
    check_paths({"--dot": args.dot, "--svg": args.svg},
                {"--dumps": args.dumps, "--objects": args.objects, "--patch": args.patch,
                 "--source": args.source if args.patch else None},
                kinds={"--dumps": "any", "--objects": "dir", "--source": "dir"},
                reads=(".o", ".ipa-clones", ".syms", ".c", ".h", ".ko"))
    dumps = find_dumps(args.dumps)
    notes: list[str] = []
    if not dumps:
        from ..ipa.dwarf import fallback_index
        idx, msg = fallback_index(Path(args.dumps), args.objects)
        notes.append(msg)
    else:
        root = Path(args.dumps) if Path(args.dumps).is_dir() else None
        idx = load_index(dumps, args.objects, root, use_cache=not args.no_cache)
    funcs = list(args.funcs)
    if args.patch:
        from ..ipa.patchmap import functions_of_patch
        dumps_dir = Path(args.dumps) if Path(args.dumps).is_dir() else Path(args.dumps).parent
        funcs, pnotes = functions_of_patch(args.patch, args.source, args.objects or dumps_dir)
        notes += pnotes
        if not funcs:
            raise InputError(f"{args.patch}: no hunk touches a function")
    res = impact(idx, funcs)
    res.notes = notes + res.notes
    if args.json:
        sys.stdout.write(report.to_json(res))
    else:
        sys.stdout.write(report.to_text(res, color=sys.stdout.isatty()))
    if args.dot:
        atomic_write(args.dot, report.to_dot(res))
    if args.svg:
        report.write_svg(res, args.svg)
    return 0


def _distro_objects(args: argparse.Namespace, src: Path) -> list[str]:
    """The objects (``drivers/block/loop.o``) whose dumps the query needs: those of the ``.c`` files the patch
    changes, or of the files named by ``file.c:name`` queries."""
    if args.patch:
        from ..kbuild.patchfile import SourcePatch

        sp = SourcePatch.parse(args.patch)
        sp.refuse_unpatchable()
        sp.check_tree(src)
        objs = [f[:-2] + ".o" for f in sp.files if f.endswith(".c") and f not in sp.created]
        if not objs:
            raise InputError(f"{args.patch}: changes no existing .c file; with --distro, add the .c files "
                             "that use the changed header (a prepared tree records no include dependencies)")
        return list(dict.fromkeys(objs))
    objs = []
    for q in args.funcs:
        f, sep, _name = q.rpartition(":")
        if not sep or not f.endswith(".c"):
            raise InputError(f"{q}: with --distro, name the file too (drivers/block/loop.c:{q})")
        objs.append(f[:-2] + ".o")
    return list(dict.fromkeys(objs))


def _run_distro(args: argparse.Namespace) -> int:
    """``impact --distro NAME:RELEASE``: prepare (or reuse) the release's tree, compile the original objects
    that have no ``-fdump-ipa-clones`` dump yet (Kbuild single-target builds, :func:`compile_original`), copy
    objects and dumps into a private directory and analyse them there; paths are shown relative to the
    tree's source."""
    from ..distro import backend_for
    from ..distro.compile import compile_original, ipa_dump_of
    from ..ipa import report
    from ..ipa.closure import impact
    from ..ipa.dumps import find_dumps
    from ..ipa.index import load_index
    from ..util.fsutil import tree_lock

    mod, release = backend_for(args.distro)  # a malformed NAME:RELEASE first: nothing else is looked at
    check_paths({"--dot": args.dot, "--svg": args.svg}, {"--patch": args.patch}, reads=(".o", ".ipa-clones"))
    say = (lambda m: print(f"prepare: {m}", file=sys.stderr)) if sys.stderr.isatty() else (lambda _m: None)
    tree = mod.prepare_tree(release, progress=say)
    objs = _distro_objects(args, tree.src)
    notes: list[str] = []
    if args.patch:
        # a changed .c file another .c #includes has a second copy there (fs/compat_binfmt_elf.c includes
        # fs/binfmt_elf.c); the analysis covers the file's own object only: say so rather than stay silent
        from ..distro.reach import includer_candidates

        srcs = [o[:-2] + ".c" for o in objs]
        for f, users in includer_candidates(tree, srcs).items():
            if users:
                notes.append(f"{f} is also #included by {', '.join(u[:-2] + '.c' for u in users)}: the copies "
                             "there are not analysed (`build --distro` rebuilds and replaces them)")
    work: Path | None = None
    try:
        with signals_held():  # a signal now is raised inside this try, with work bound
            work = Path(tempfile.mkdtemp(prefix="klpforge-impact-"))
        have: list[str] = []
        with tree_lock(tree.lock or tree.build / ".lock"):  # Kbuild may be writing build/: copy under its lock
            for o in objs:
                built = tree.build / o
                dump = ipa_dump_of(built) if built.is_file() else None
                if dump is None:
                    continue
                (work / o).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(built, work / o)
                shutil.copyfile(dump, (work / o).parent / dump.name)
                have.append(o)
        missing = [o for o in objs if o not in have]
        if missing:
            # an object never compiled in this tree has no dump: build the original as `build --distro` does
            print(f"compiling {len(missing)} original object(s) of {release} for their clone dumps: "
                  f"{', '.join(missing)}", file=sys.stderr)
            compile_original(tree, missing, work, 2, tree.build.parent / "impact.log")
            notes.append(f"compiled {', '.join(missing)} to get GCC's clone dump")
        dumps = find_dumps(str(work))
        lacking = [o for o in objs if ipa_dump_of(work / o) is None]
        if lacking:
            raise InputError(f"{lacking[0]}: compiled without a clone dump (-fdump-ipa-clones missing from its "
                             f"flags?)")
        idx = load_index(dumps, work, work, use_cache=False)  # the work directory is new every run
        funcs = list(args.funcs)
        if args.patch:
            from ..ipa.patchmap import functions_of_patch

            funcs, pnotes = functions_of_patch(args.patch, tree.src, work)
            notes += pnotes
            if not funcs:
                raise InputError(f"{args.patch}: no hunk touches a function")
        res = impact(idx, funcs)
        res.notes = notes + res.notes
        res = report.relative_paths(res, str(tree.src))
        res = report.relative_paths(res, str(work))
        what = args.patch.name if args.patch else ", ".join(args.funcs)
        title = f"impact of {what} on {args.distro} (paths relative to its source tree)"
        if args.json:
            sys.stdout.write(report.to_json(res))
        else:
            sys.stdout.write(report.to_text(res, color=sys.stdout.isatty()))
        if args.dot:
            atomic_write(args.dot, report.to_dot(res, title))
        if args.svg:
            report.write_svg(res, args.svg, title)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return 0
