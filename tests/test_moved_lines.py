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
