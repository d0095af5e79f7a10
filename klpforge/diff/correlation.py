"""The result type of the *correlate* stage: which original symbol and section is which patched one.

Kept apart from :mod:`.correlate` so that the helpers of that stage (:mod:`.statics`) and every later
stage use the map without importing the stage itself (no import cycle).

>>> corr.o2p[i], corr.reason_for_orig(i)   # doctest: +SKIP
(7, 'same name')
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .model import Object

__all__ = ["Correlation", "pair"]


@dataclass
class Correlation:
    """Symbol and section pairing between ``orig`` and ``patched``."""

    orig: Object
    patched: Object
    o2p: np.ndarray  # orig symbol -> patched symbol, -1 if none
    p2o: np.ndarray
    so2p: np.ndarray  # orig section -> patched section
    sp2o: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)  # orig symbol -> rule that matched it
    never: set[int] = field(default_factory=set)  # patched symbols excluded from correlation
    #: patched static locals with several plausible twins -> why (select refuses a patch that uses one)
    ambiguous: dict[int, str] = field(default_factory=dict)

    def reason_for_orig(self, i: int) -> str:
        return self.reasons.get(i, "")


def pair(corr: Correlation, o: int, p: int, why: str) -> None:
    """Record that original symbol ``o`` and patched symbol ``p`` are one symbol, and the rule ``why``."""
    corr.o2p[o] = p
    corr.p2o[p] = o
    corr.reasons[o] = why
