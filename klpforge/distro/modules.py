"""The shipped modules' index and their plain ELF form (the guest's load order: :mod:`klpforge.qemu.modprobe`).

``modules.dep``: Debian's image package ships none; ``depmod -b`` writes it into
the cached, unpacked image once; kmod reads ``.ko.xz``/``.ko.zst`` itself.

Compressed modules: Debian 13's kernels set ``CONFIG_MODULE_COMPRESS_XZ`` + ``MODULE_COMPRESS_ALL``, so
every module ships as ``.ko.xz`` (``xz --check=crc32 --lzma2=dict=1MiB``, Linux 6.12
``scripts/Makefile.modinst``); ``.ko.zst`` (``MODULE_COMPRESS_ZSTD``) and ``.ko.gz`` are read too.
:func:`plain_module` decompresses one once into a cache directory; whatever reads a shipped module (the
diff's symbol tables, the size proof, the guest's ``insmod``) takes that ELF file.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import shutil
import subprocess
from pathlib import Path

from ..util.errors import InputError
from ..util.fsutil import atomic_write, tree_lock
from .base import DistroTree

__all__ = ["modules_dep", "shipped_modules", "plain_module", "COMPRESSED", "compress_module"]

#: Suffixes of compressed modules (after ``.ko``), as Linux 6.12 ``scripts/Makefile.modinst`` writes them.
COMPRESSED = (".xz", ".zst", ".gz")


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        if path.suffix == ".xz":
            return lzma.decompress(data)
        if path.suffix == ".gz":
            return gzip.decompress(data)
        if path.suffix == ".zst":
            zstd = shutil.which("zstd")
            if zstd is None:
                raise InputError(f"{path.name}: reading .ko.zst modules needs zstd (Debian package zstd)")
            r = subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=False)
            if r.returncode != 0:
                raise InputError(f"{path}: not a valid zstd file ({r.stderr.decode(errors='replace').strip()[:200]})")
            return r.stdout
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise InputError(f"{path}: cannot decompress ({e})") from None
    raise InputError(f"{path}: unknown module compression {path.suffix}")


def plain_module(path: Path, cache_dir: Path | None = None) -> Path:
    """``path`` itself for a ``.ko``; for ``X.ko.xz``/``.ko.zst``/``.ko.gz`` the decompressed ``X.ko`` in
    ``cache_dir`` (default: ``<klpforge cache>/modules-plain/<hash of the module's directory>``, never
    inside the shipped tree, where depmod would find it), written once and atomically.
    Raises :class:`InputError` for a damaged file or one that is not an ELF module."""
    if path.suffix not in COMPRESSED:
        return path
    name = path.name[: -len(path.suffix)]
    if not name.endswith(".ko"):
        raise InputError(f"{path}: not a kernel module (expected NAME.ko{path.suffix})")
    if cache_dir is None:
        from ..util.fsutil import cache_root

        key = hashlib.sha256(str(path.parent.resolve()).encode()).hexdigest()[:16]
        cache_dir = cache_root() / "modules-plain" / key
    dest_dir = cache_dir
    out = dest_dir / name
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    mark = dest_dir / f".{name}.from"
    if out.is_file() and mark.is_file() and mark.read_text() == stamp:
        return out
    data = _decompress(path)
    if not data.startswith(b"\x7fELF"):
        raise InputError(f"{path}: decompressed, it is not an ELF module")
    dest_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data, 0o644)
    atomic_write(mark, stamp)
    return out


def compress_module(ko: Path, suffix: str) -> bytes:
    """The bytes of ``ko`` compressed as the kernel's ``modules_install`` does for ``suffix``
    (``.xz``: ``xz --check=crc32 --lzma2=dict=1MiB``, the in-kernel decompressor needs CRC32; ``.zst``:
    ``zstd -T0 --rm -f -q``; ``.gz``: ``gzip -n -f``)."""
    data = ko.read_bytes()
    if suffix == ".xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20}])
    if suffix == ".gz":
        return gzip.compress(data, mtime=0)
    if suffix == ".zst":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise InputError("writing a .ko.zst needs zstd (Debian package zstd)")
        return subprocess.run([zstd, "-q", "-c", str(ko)], capture_output=True, check=True).stdout
    raise InputError(f"unknown module compression {suffix}")


def modules_dep(tree: DistroTree) -> dict[str, tuple[Path, list[str]]]:
    """Module name -> (``.ko`` path, names it depends on), from ``modules.dep`` (generated if missing)."""
    mdir = tree.modules_dir
    if mdir is None or tree.image is None:
        raise InputError("no shipped modules directory")
    dep = mdir / "modules.dep"
    if not dep.is_file():
        depmod = shutil.which("depmod") or ("/usr/sbin/depmod" if Path("/usr/sbin/depmod").exists() else None)
        if not depmod:
            raise InputError("depmod not found (Debian package kmod) and the image ships no modules.dep")
        with tree_lock(tree.lock or mdir / ".lock"):
            if not dep.is_file():
                base = mdir.parents[2]  # <base>/lib/modules/<release>: the image, or its usr/ (Debian 13)
                r = subprocess.run([depmod, "-b", str(base), tree.release], capture_output=True, text=True,
                                   check=False)
                if r.returncode != 0 or not dep.is_file():
                    raise InputError(f"depmod -b {base} failed: {r.stderr.strip()[:300]}")
    out: dict[str, tuple[Path, list[str]]] = {}
    for line in dep.read_text().splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        name = Path(path).name.split(".ko", 1)[0].replace("-", "_")
        out[name] = (mdir / path, [Path(d).name.split(".ko", 1)[0].replace("-", "_") for d in deps.split()])
    return out


def shipped_modules(tree: DistroTree) -> set[str]:
    """Names (``_`` spelling) of every module shipped for ``tree.release``."""
    return set(modules_dep(tree))
