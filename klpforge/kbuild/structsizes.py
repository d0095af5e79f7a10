"""Sizes of the special-section entry structs, measured with the kernel's own headers and flags.

kpatch-build reads them from vmlinux DWARF; our test kernel has no debug info, so we compile a tiny probe
with the recorded command of ``init/main.o`` (same flags, same config) and read the constants back from the
assembly, the way Kbuild's ``asm-offsets`` works. The names are the ``*_STRUCT_SIZE`` variables the diff
engine takes.

>>> struct_sizes(KernelTree(Path("linux"), Path("build")))     # doctest: +SKIP
{'BUG_STRUCT_SIZE': '12', 'EX_STRUCT_SIZE': '12', 'ALT_STRUCT_SIZE': '12', ...}
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ..util.errors import InputError
from ..util.proc import run
from .tree import KernelTree

__all__ = ["struct_sizes", "PROBE_SOURCE"]

# Struct names and headers as of Linux 6.1 (x86_64); 6.12 lacks paravirt_patch_site (version-guarded).
PROBE_SOURCE = r"""
#include <linux/version.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/uaccess.h>
#include <linux/bug.h>
#include <linux/jump_label.h>
#include <linux/static_call_types.h>
#include <linux/printk.h>
#include <asm/alternative.h>
#include <asm/orc_types.h>
#ifdef CONFIG_PARAVIRT
#include <asm/paravirt_types.h>
#endif
#define KLPSZ(name, expr) asm volatile("\n.ascii \"->KLPSZ " #name " %c0\"" : : "i" (expr))
void klpforge_probe(void);
void klpforge_probe(void)
{
#ifdef CONFIG_GENERIC_BUG
	KLPSZ(BUG_STRUCT_SIZE, sizeof(struct bug_entry));
#endif
#ifdef CONFIG_JUMP_LABEL
	KLPSZ(JUMP_STRUCT_SIZE, sizeof(struct jump_entry));
#endif
	KLPSZ(ALT_STRUCT_SIZE, sizeof(struct alt_instr));
	KLPSZ(EX_STRUCT_SIZE, sizeof(struct exception_table_entry));
	KLPSZ(ORC_STRUCT_SIZE, sizeof(struct orc_entry));
	KLPSZ(STATIC_CALL_STRUCT_SIZE, sizeof(struct static_call_site));
#if defined(CONFIG_PARAVIRT) && LINUX_VERSION_CODE < KERNEL_VERSION(6, 8, 0)
	/* 6.8 moved paravirt patching to alternatives: no .parainstructions, no struct */
	KLPSZ(PARA_STRUCT_SIZE, sizeof(struct paravirt_patch_site));
#endif
#ifdef CONFIG_PRINTK_INDEX
	KLPSZ(PRINTK_INDEX_STRUCT_SIZE, sizeof(struct pi_entry));
#endif
}
"""


def struct_sizes(tree: KernelTree, reference_obj: str = "init/main.o") -> dict[str, str]:
    """``{"BUG_STRUCT_SIZE": "12", ...}`` for ``tree``; entries whose feature is off are absent."""
    cc = tree.compile_command(reference_obj)
    cmd = cc.command.split(" ; ", 1)[0]  # drop objtool and other post-steps
    if "-flto" in cmd:  # Clang LTO: -S would write LLVM IR, not the assembly the constants are read from
        cmd += " -fno-lto"
    with tempfile.TemporaryDirectory(prefix="klpforge-sizes-") as td:
        probe = Path(td) / "probe.c"
        probe.write_text(PROBE_SOURCE)
        out = Path(td) / "probe.s"
        dep = f"{Path(reference_obj).parent}/.{Path(reference_obj).name}.d"
        cmd = cmd.replace(f"-Wp,-MMD,{dep}", f"-Wp,-MMD,{td}/.probe.d")
        cmd = cmd.replace(f" -c -o {reference_obj} ", f" -S -o {out} ")
        # O= builds name the source by absolute path, in-tree builds relative to the tree (6.1 srctree ".")
        src_tok = str(cc.source) if str(cc.source) in cmd else os.path.relpath(cc.source, tree.build)
        cmd = re.sub(rf"(?<=\s){re.escape(src_tok)}(?=\s|$)", str(probe), cmd)
        if str(probe) not in cmd or str(out) not in cmd:
            raise InputError(f"cannot derive a probe compile from the command of {reference_obj}")
        r = run(cmd, shell=True, cwd=tree.build, capture_output=True, text=True)
        if r.returncode != 0:
            raise InputError(f"struct-size probe failed to compile: {r.stderr.strip()[:300]}")
        text = out.read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"->KLPSZ (\w+) (\d+)", text)}
