"""Find the prepared test kernel for the test-suite (``pytest.mark.kernel`` tests).

>>> lay = prepared_kernel()          # doctest: +SKIP
"""

from __future__ import annotations

import os

from .prepare import KernelLayout, is_current

__all__ = ["prepared_kernel", "require_kernel"]


def prepared_kernel(version: str = "6.1", variant: str = "") -> KernelLayout | None:
    """The cached kernel (``variant``: ``ibt`` for ``kernel prepare --variant ibt``) if ``klpforge kernel
    prepare`` completed for it with the current config fragment, else None (a stale kernel would test the
    wrong configuration)."""
    lay = KernelLayout.default(version, variant=variant)
    if lay.stamp.is_file() and lay.bzimage.is_file() and (lay.build / "vmlinux").is_file() and is_current(lay):
        return lay
    return None


def require_kernel() -> bool:
    """True when the environment demands the kernel tests run (CI sets ``KLPFORGE_REQUIRE_KERNEL=1``)."""
    return os.environ.get("KLPFORGE_REQUIRE_KERNEL") == "1"
