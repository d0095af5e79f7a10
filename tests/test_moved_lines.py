"""A patch that only moves lines (a comment added near the top of a file) is no change (issue 16 item 3).

Every ``__LINE__`` below the comment moves: the line arguments of calls to line-taking functions defined
in the same file (GCC turns ``-fipa-ra`` off under ``-pg``, so they keep the standard ABI), and the
``"file.c:LINE"`` strings of 6.1's FORTIFY ``memcpy`` check. A real change is still caught. Compiled by
gcc during the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from klpforge.diff import DiffOptions, run_diff
from klpforge.util.errors import NoChange

SRC = r"""
#define __stringify_1(x) #x
#define __stringify(x) __stringify_1(x)
extern int printk(const char *, ...);
extern void fortify_warn(const char *what, unsigned long size);
/* fs/ext4/super.c defines __ext4_error() and calls it from the same file */
__attribute__((noinline)) void __ext4_error(void *sb, const char *function, unsigned int line, int force_ro,
                                            int error, unsigned long long block, const char *fmt, ...)
{
    printk(fmt, function, line, force_ro, error, block);
}
#define ext4_error(sb, fmt) __ext4_error(sb, __func__, __LINE__, 0, 5, 0, fmt)
__attribute__((noinline, noclone)) void report_at(const char *file, int line, int code)
{
    printk("%s:%d %d\n", file, line, code);
}
int check_sb(void *sb, int x)
{
    if (x > 3)
        ext4_error(sb, "bad %d");
    return x * 2;
}
int check_code(int x)
{
    if (x < 0)
        report_at(__FILE__, __LINE__, @CODE@);
    return x + 1;
}
int copy_field(char *dst, const char *src, unsigned long n)
{
    if (n > 8)  /* the FORTIFY memcpy warning of 6.1 */
        fortify_warn("memcpy: field \"dst\" at " __FILE__ ":" __stringify(__LINE__), n);
    __builtin_memcpy(dst, src, n & 7);
    return 0;
}
"""

COMMENT = "/*\n * A comment added near the top of the file.\n */\n"


def _diff(a: Path, b: Path, tmp: Path):
    return run_diff(a, b, tmp / "lp.o", DiffOptions(symtab=a, env={}))


def test_comment_near_the_top_is_no_change(cc, tmp_path: Path) -> None:
    a = cc(SRC.replace("@CODE@", "3"), "a")
    b = cc(COMMENT + SRC.replace("@CODE@", "3"), "b")
    with pytest.raises(NoChange, match=r"only __LINE__ values moved in check_code, check_sb"):
        _diff(a, b, tmp_path)
    assert not (tmp_path / "lp.o").exists()


def test_real_change_beside_moved_lines_is_caught(cc, tmp_path: Path) -> None:
    """A changed constant in another argument of the same local call is a change, lines moved or not."""
    a = cc(SRC.replace("@CODE@", "3"), "a")
    b = cc(COMMENT + SRC.replace("@CODE@", "4"), "b")
    res = _diff(a, b, tmp_path)
    assert [f.old_name for f in res.patched_functions] == ["check_code"]
    assert {c["name"] for c in res.report["changed"]} == {"check_code"}


def test_changed_text_of_a_file_line_string_is_caught(cc, tmp_path: Path) -> None:
    a = cc(SRC.replace("@CODE@", "3"), "a")
    b = cc(COMMENT + SRC.replace("@CODE@", "3").replace('field \\"dst\\"', 'field \\"dest\\"'), "b")
    res = _diff(a, b, tmp_path)
    assert [f.old_name for f in res.patched_functions] == ["copy_field"]


# 6.1 fs/ext4/inode.c: check_block_validity() passes __func__, __LINE__ to a static helper that GCC
# clones (IPA-CP propagates the constant __func__ away): __check_block_validity.constprop.0(inode, line,
# map). The clone's line register comes from its DWARF (klpforge/diff/dwarfread.py clone_line_regs).
CLONE = r"""
struct inode { unsigned long i_ino; void *i_sb; };
struct map { unsigned long long m_pblk; unsigned int m_lblk, m_len; };
extern void __ext4_error_inode(struct inode *inode, const char *function, unsigned int line,
                               unsigned long long block, const char *fmt, ...);
extern int ext4_inode_block_valid(struct inode *inode, unsigned long long start, unsigned int len);
extern int journal_ino(void *sb);
static __attribute__((noinline)) int __check_block_validity(struct inode *inode, const char *func,
                                                            unsigned int line, struct map *map, int why)
{
    if (inode->i_ino == journal_ino(inode->i_sb))
        return 0;
    if (!ext4_inode_block_valid(inode, map->m_pblk, map->m_len)) {
        __ext4_error_inode(inode, func, line, map->m_pblk, "lblock %lu mapped to illegal pblock %llu (%d)",
                           (unsigned long)map->m_lblk, map->m_pblk, why);
        return -117;
    }
    return 0;
}
#define check_block_validity(inode, map, why) __check_block_validity((inode), __func__, __LINE__, (map), why)
extern int lookup(struct inode *, struct map *, int);
int ext4_map_blocks(struct inode *inode, struct map *map, int flags)
{
    int ret = lookup(inode, map, flags);
    if (ret > 0) {
        int err = check_block_validity(inode, map, 1);
        if (err)
            return err;
    }
    ret = lookup(inode, map, flags | 1);
    if (ret > 0) {
        int err = check_block_validity(inode, map, @WHY@);
        if (err)
            return err;
    }
    return ret;
}
"""


def _clone_pair(cc, why_b: str, *flags: str) -> tuple[Path, Path]:
    a = cc(CLONE.replace("@WHY@", "2"), "a", *flags)
    b = cc(COMMENT + CLONE.replace("@WHY@", why_b), "b", *flags)
    return a, b


def test_line_argument_of_a_gcc_clone_is_found_in_dwarf(cc, tmp_path: Path) -> None:
    """The issue's fs/ext4/inode.c comment case: the moved lines reach the clone's line argument."""
    from klpforge.diff.dwarfread import clone_line_regs
    from klpforge.diff.lineargs import LINE_ARGS
    from klpforge.diff.model import Object

    a, b = _clone_pair(cc, "2", "-g")
    assert "__check_block_validity.constprop.0" in Object.load(a).sym_names  # gcc made the clone
    assert clone_line_regs(Object.load(a), LINE_ARGS) == {"__check_block_validity.constprop.0": "rsi"}
    with pytest.raises(NoChange, match=r"only __LINE__ values moved in ext4_map_blocks"):
        _diff(a, b, tmp_path)


def test_other_argument_of_a_gcc_clone_is_a_change(cc, tmp_path: Path) -> None:
    """A constant given to another parameter of the clone (lines moved too) is a change."""
    a, b = _clone_pair(cc, "3", "-g")
    res = _diff(a, b, tmp_path)
    assert [f.old_name for f in res.patched_functions] == ["ext4_map_blocks"]


def test_gcc_clone_without_dwarf_still_counts(cc, tmp_path: Path) -> None:
    """Without DWARF the clone's argument positions are unknown: the moved line counts as a change."""
    a, b = _clone_pair(cc, "2")
    res = _diff(a, b, tmp_path)
    assert [f.old_name for f in res.patched_functions] == ["ext4_map_blocks"]
