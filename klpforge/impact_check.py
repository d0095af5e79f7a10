"""``klpforge diff --impact DUMPS``: were the functions diff found changed predicted by ipa-clones?

>>> check_impact(Path("build/"), result)["unpredicted"]
[]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["check_impact"]


def check_impact(dumps: Path, res: Any) -> dict[str, Any]:
    """Compare ``res.changed`` with the impact predicted from the dumps for the changed functions."""
    try:
        from . import ipa
        predict = ipa.predict  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        raise InputError("--impact needs the impact analysis (klpforge.ipa.predict), which is not available") from None
    paths = sorted(dumps.rglob("*.ipa-clones")) if dumps.is_dir() else [dumps]
    if not paths:
        raise InputError(f"{dumps}: no *.ipa-clones dumps found")
    changed = list(res.changed)
    pred = predict(paths, changed)
    predicted = set(getattr(pred, "functions", pred))
    return {
        "predicted": sorted(predicted),
        "unpredicted": sorted(set(changed) - predicted),
        "predicted_unchanged": sorted(predicted - set(changed)),
    }
