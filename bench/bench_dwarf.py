"""DWARF of kernel objects: pyelftools' own relocation (baseline) against klpforge/diff/dwarfread.py's numpy one,
and the struct layout pass of klpforge/diff/layout.py.

Usage: ``python3 bench/bench_dwarf.py [OBJ.o ...]`` (default: the prepared Debian 6.1 build's objects with
DWARF, ``fs/ext4/super.o`` first). CPU seconds (``time.process_time``) of one fresh read per object; the
ratio is baseline / ours in the same run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from elftools.elf.elffile import ELFFile

from klpforge.diff.dwarfread import _cache, dwarf_info
from klpforge.diff.layout import layouts
from klpforge.diff.model import Object


def _walk(info: object) -> int:
    n = 0
    for cu in info.iter_CUs():  # type: ignore[attr-defined]
        for _die in cu.get_top_DIE().iter_children():
            n += 1
    return n


def main(argv: list[str]) -> int:
    objs = [Path(a) for a in argv]
    if not objs:
        build = Path.home() / ".cache/klpforge/distro/debian/6.1.0-56-amd64/build"
        objs = [build / p for p in ("fs/ext4/super.o", "kernel/sys.o", "mm/vmstat.o", "net/ipv4/proc.o")]
        objs = [p for p in objs if p.is_file()]
    print("| object | .debug_info KiB | pyelftools relocate + open s | numpy relocate + open s | ratio | "
          "top-level DIEs | layouts | layout pass s |")
    print("|---|---|---|---|---|---|---|---|")
    for p in objs:
        o = Object.load(p)
        sec = o.find_section(".debug_info")
        if sec is None:
            continue
        kib = int(o.shdrs["size"][sec]) // 1024
        t = time.process_time()
        with p.open("rb") as f:
            base = ELFFile(f).get_dwarf_info(relocate_dwarf_sections=True)
            base_s = time.process_time() - t
        del base
        _cache.pop(o, None)
        t = time.process_time()
        info = dwarf_info(o)
        ours_s = time.process_time() - t
        t = time.process_time()
        lay = layouts(o) or {}  # first pass over the DIEs (pyelftools parses lazily)
        lay_s = time.process_time() - t
        n = _walk(info)
        print(f"| {p.name} | {kib} | {base_s:.2f} | {ours_s:.2f} | {base_s / max(ours_s, 1e-6):.0f}x | {n} | "
              f"{len(lay)} | {lay_s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
