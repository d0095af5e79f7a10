"""Set operations on integer arrays that do not import ``numpy.ma``.

numpy 2.x's ``np.unique`` (without ``return_index``/``return_inverse``) asks ``np.ma.is_masked`` and so
imports the whole masked-array package (~8 ms, 3 % of a small ``klpforge diff`` process) on first use, and
``np.isin`` calls it. klpforge's tables are plain integer arrays: sorting does the same work.

>>> unique(np.array([3, 1, 3, 2])).tolist(), isin(np.array([1, 5, 2]), [2, 3, 1]).tolist()
([1, 2, 3], [True, False, True])
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["unique", "isin"]


def unique(a: np.ndarray | Iterable[int]) -> np.ndarray:
    """The sorted distinct values of ``a`` (flattened): ``np.unique(a)`` for arrays without NaN.
    O(n log n); shape (k,), ``a``'s dtype."""
    s = np.sort(np.asarray(a).ravel())
    if s.size < 2:
        return s
    keep = np.empty(s.size, bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def isin(a: np.ndarray, values: np.ndarray | Iterable[int]) -> np.ndarray:
    """Boolean mask, ``a``'s shape: is each element of ``a`` one of ``values`` (``np.isin`` for
    arrays without NaN; ``values`` may be any iterable, a set included). O((n + m) log m)."""
    a = np.asarray(a)
    v = values if isinstance(values, np.ndarray) else np.fromiter(values, np.int64) \
        if isinstance(values, (set, frozenset)) else np.asarray(values)
    if v.size == 0:
        return np.zeros(a.shape, bool)
    v = np.sort(v.ravel())
    i = np.searchsorted(v, a)
    np.minimum(i, v.size - 1, out=i)
    return v[i] == a
