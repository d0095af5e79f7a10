"""Results on the shared vmlinux corpus pinned to what the first (unoptimised) implementation computed, so that
speed work on the parser, the index or the closure cannot change them.

The expected values were produced by commit 31b7707 (before the vectorised rewrite) with the summary and
digest functions below. Chains are compared by length only: BFS gives shortest chains, but when several
chains are equally short, which one is shown depends on node numbering (now: order of first mention in the
dumps).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from klpforge.ipa import closure_all, find_dumps, load_index
from klpforge.ipa.closure import ImpactResult, impact
from klpforge.ipa.index import Index

from .test_ipa_corpus import TARBALL, corpus_dir


@pytest.fixture(scope="module")
def corpus_index() -> tuple[Path, Index]:
    if not TARBALL.exists():
        pytest.skip(f"shared corpus not found at {TARBALL}")
    root = corpus_dir()
    return root, load_index(find_dumps(root), use_cache=False)


def _digest(x: object) -> str:
    return hashlib.sha256(repr(x).encode()).hexdigest()[:16]


def _summary(res: ImpactResult, root: Path) -> list[tuple[object, ...]]:
    """Every entry as (name, object relative to the corpus, status, chain length, avoided_by, pieces and
    functions folded at its address: one field, as pinned before folding was told apart from pieces)."""
    return sorted({(e.name, os.path.relpath(e.obj, root) if e.obj.startswith(str(root)) else e.obj, e.status,
                    len(e.chain), tuple(e.avoided_by), tuple(sorted(e.pieces + e.folded))) for e in res.entries})


# query: (functions to replace, entries, digest of sorted functions, digest of entry summaries)
PINNED = {
    "get_current": (2497, 5173, "cfa78a9ad86c5030", "7e3a040fe75c8fbb"),
    "kmalloc": (2125, 5713, "21257537fe48c5f4", "b20e5b9844c222ad"),
    "copy_from_user": (451, 943, "0e8bac98244437c4", "61f13f60e5103f78"),
    "net/netfilter/nf_sockopt.c:nf_sockopt_find": (1, 2, "0c22aed135f6baa8", "0c4a8216576bf6ce"),
    "set_schedstats": (2, 4, "da93f0ea7e01b2a3", "7f09b6ac5b0544ef"),  # a split part inlined back: a cycle
    "sync_blockdev": (6, 9, "9b48dfa432ffb1e9", "24d3fa7918d75f4d"),
    "__migrate_task": (2, 6, "7b4a7aa03521c86b", "5dc37249c925ab1b"),  # .part.0.isra.0 chains
    "__x64_sys_io_setup": (473, 474, "932333e21c04bb31", "9275f36b0a498c12"),  # ICF into 472 sys_ni stubs
}


@pytest.mark.parametrize("query", sorted(PINNED))
def test_pinned_query(corpus_index: tuple[Path, Index], query: str) -> None:
    root, idx = corpus_index
    res = impact(idx, [query])
    summary = _summary(res, root)
    got = (len(res.functions), len(summary), _digest(sorted(res.functions)), _digest(summary))
    assert got == PINNED[query]


def test_pinned_small_results(corpus_index: tuple[Path, Index]) -> None:
    root, idx = corpus_index
    res = impact(idx, ["set_schedstats"])
    assert res.functions == {"setup_schedstats", "sysctl_schedstats"}
    assert {(e.name, e.status) for e in res.entries} == {
        ("set_schedstats", "removed"), ("set_schedstats.part.0", "removed"), ("setup_schedstats", "replace"),
        ("sysctl_schedstats", "replace")}
    res = impact(idx, ["__migrate_task"])
    assert res.functions == {"__balance_push_cpu_stop", "migration_cpu_stop"}
    assert res.reasons("__migrate_task.part.0")[0].status == "missing"  # no removal record for it


def test_pinned_closure_of_everything(corpus_index: tuple[Path, Index]) -> None:
    """The closure of every node (the benchmark's full analysis) as labelled pairs."""
    root, idx = corpus_index
    src, dst = closure_all(idx)
    rel = [os.path.relpath(d, root) for d in idx.dumps]
    labels: dict[int, str] = {}

    def label(n: int) -> str:
        if n not in labels:
            f = int(idx.n_func[n])
            labels[n] = (f"{rel[int(idx.n_group[n])]}|{idx.names[int(idx.f_name[f])]}|{idx.loc(f)}:"
                         f"{int(idx.f_col[f])}")
        return labels[n]

    pairs = sorted(f"{label(a)}>{label(b)}" for a, b in zip(src.tolist(), dst.tolist(), strict=True))
    assert len(pairs) == 637_046
    assert hashlib.sha256("\n".join(pairs).encode()).hexdigest() == (
        "cc5badbed599b3bff4fb76d15a054f67ace1dbda1d3326583108a205b8a990af")
