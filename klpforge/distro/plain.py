"""The plain form for kernels without a backend: ``klpforge build -s SRC (-c CONFIG | -O BUILD) --symbols FILE
--symvers FILE [--modules DIR] [--headers DIR] fix.patch``.

``-c CONFIG``: the source is configured with that config into a klpforge-owned build directory
(``<cache>/distro/plain/<key>/build``, keyed by the source path, the config and the flags; prepared once like
a distribution tree, never a full build, the source tree is only read). ``-O BUILD``: an already prepared
build directory (``make olddefconfig prepare modules_prepare`` done with
:data:`~klpforge.distro.debian.KCFLAGS`, else the first compile re-runs ``prepare``).

>>> plain_key(Path("/src"), b"CONFIG_X=y\\n")[:4].isalnum()
True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write, cache_dir, tree_lock
from .base import DistroTree, Say, run_logged
from .debian import KCFLAGS, _check_config_kept, check_compiler, make_command

__all__ = ["plain_tree", "plain_key"]


def plain_key(src: Path, config: bytes) -> str:
    """Cache key of a (source tree, config) pair."""
    h = hashlib.sha256(str(src.resolve()).encode() + b"\0" + config + b"\0" + KCFLAGS.encode())
    return h.hexdigest()[:16]


def plain_tree(src: Path, config: Path | None = None, build: Path | None = None, release: str | None = None,
               modules: Path | None = None, headers: Path | None = None, cache: str | os.PathLike[str] | None = None,
               jobs: int = 2, progress: Say | None = None) -> DistroTree:
    """A :class:`DistroTree` for a source tree and a config (or a prepared build directory).

    Raises :class:`InputError` for a missing tree, config or compiler, or a failed ``make``.
    """
    say = progress or (lambda _m: None)
    src = src.resolve()
    if not (src / "Makefile").is_file() or not (src / "kernel").is_dir():
        raise InputError(f"{src}: not a kernel source tree (no Makefile/kernel/)")
    if build is not None:
        build = build.resolve()
        if not (build / ".config").is_file() or not (build / "scripts/mod/modpost").is_file():
            raise InputError(f"{build}: not a prepared build directory (run `make O={build} olddefconfig prepare "
                             "modules_prepare`, or pass -c CONFIG instead of -O)")
        cfg = build / ".config"
        cc = check_compiler(cfg)
        tree = DistroTree(src=src, build=build, config=cfg, release=release or _release(build), modules=modules,
                          headers=headers or build, kcflags=KCFLAGS, lock=build / ".klpforge.lock")
        tree.extra["cc"] = cc
        return tree
    if config is None:
        raise InputError("the plain form needs -c CONFIG (the kernel's config) or -O BUILD (a prepared build dir)")
    try:
        cfg_bytes = config.read_bytes()
    except OSError as e:
        raise InputError(f"{config}: cannot read ({e.strerror})") from None
    cc = check_compiler(config)
    root = cache_dir("distro", "plain", plain_key(src, cfg_bytes), cache=cache)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "config").is_file():
        shutil.copyfile(config, root / "config")
    tree = DistroTree(src=src, build=root / "build", config=root / "config", release=release or "",
                      modules=modules, kcflags=KCFLAGS, lock=root / ".lock")
    tree.extra["cc"] = cc
    with tree_lock(root / ".lock"):
        stamp = root / "prepared.json"
        if not stamp.is_file():
            if (src / ".config").is_file() or (src / "include/config").is_dir():
                raise InputError(f"{src} is configured in-tree; Kbuild builds out of tree (O=) only from a clean "
                                 "source tree (pass -O with the in-tree build instead)")
            log = root / "prepare.log"
            log.write_text("")
            shutil.rmtree(tree.build, ignore_errors=True)
            tree.build.mkdir(parents=True)
            shutil.copyfile(root / "config", tree.build / ".config")
            say(f"configuring {src} with {config.name} and preparing it (make -j{jobs}, log: {log})")
            run_logged(make_command(tree, "olddefconfig", jobs=1), log)
            _check_config_kept(tree)
            run_logged(make_command(tree, "prepare", "modules_prepare", jobs=jobs), log)
            (tree.build / "usr").mkdir(exist_ok=True)
            run_logged([cc, "-O2", "-o", str(tree.build / "usr/gen_init_cpio"), str(src / "usr/gen_init_cpio.c")],
                       log)
            atomic_write(stamp, json.dumps({"src": str(src), "config": str(config), "prepared": time.time()}) + "\n")
    tree.headers = headers or tree.build
    tree.release = release or _release(tree.build)
    return tree


def _release(build: Path) -> str:
    p = build / "include/config/kernel.release"
    return p.read_text().strip() if p.is_file() else "unknown"
