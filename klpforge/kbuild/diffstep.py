"""Call the diff engine (:mod:`klpforge.diff`, issue 2) for one object and adapt its result.

The contract used here: ``run_diff(orig, patched, out, DiffOptions(target=, symtab=, symvers=, env=))``
returns a result with ``patched_functions`` (each ``.old_name``, ``.sympos``, ``.new_symbol``), optional
``callbacks`` and a ``report`` dict; it raises ``UnsafeChange``/``NoChange``/``InputError``.
Linking through Kbuild uses ``klpforge.diff.emit.postlink.strip_klp``/``apply_klp``.

>>> adapt_callbacks({"pre_patch": "klp_cb_pre"})
{'pre_patch': 'klp_cb_pre'}
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..util.errors import InputError
from .module import CALLBACK_KINDS, KlpFunc

__all__ = ["DiffOutcome", "run_object_diff", "adapt_callbacks", "postlink_api"]


@dataclass
class DiffOutcome:
    """What the module builder needs from one object's diff."""

    obj: str
    target: str
    out: Path
    funcs: list[KlpFunc]
    callbacks: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    #: callbacks as named in the patch (``callbacks`` may be renamed for linking)
    callback_sources: dict[str, str] = field(default_factory=dict)
    #: other functions carried in the module (new ones, callees), name -> why
    carried: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.callback_sources:
            self.callback_sources = dict(self.callbacks)


def _diff_module() -> Any:
    try:
        return importlib.import_module("klpforge.diff")
    except ModuleNotFoundError as e:
        if e.name == "klpforge.diff":
            raise InputError("the diff engine (klpforge.diff, issue 2) is not in this checkout") from None
        raise


def postlink_api() -> Any | None:
    """``klpforge.diff.emit.postlink`` if present (``strip_klp``, ``apply_klp``), else None."""
    try:
        mod = importlib.import_module("klpforge.diff.emit.postlink")
    except ModuleNotFoundError as e:
        if e.name == "klpforge.diff.emit.postlink":
            return None
        raise
    return mod if hasattr(mod, "strip_klp") and hasattr(mod, "apply_klp") else None


def adapt_callbacks(cbs: Any) -> dict[str, str]:
    """Normalise the diff engine's callbacks to ``{kind: symbol}`` (kinds of :data:`CALLBACK_KINDS`).

    Accepts a dict ``{kind: symbol}``, or a list of items with ``kind`` and ``symbol``/``new_symbol``.
    """
    out: dict[str, str] = {}
    if not cbs:
        return out
    items = cbs.items() if isinstance(cbs, dict) else (
        (getattr(c, "kind", None) or c.get("kind"),
         getattr(c, "new_symbol", None) or getattr(c, "symbol", None)
         or (c.get("new_symbol") or c.get("symbol") if isinstance(c, dict) else None))
        for c in cbs)
    for kind, sym in items:
        k = str(kind).removesuffix("_callback").replace("-", "_")
        if k not in CALLBACK_KINDS or not sym:
            raise InputError(f"diff engine reported an unknown callback {kind!r} -> {sym!r}")
        out[k] = str(sym)
    return out


def _reasons(report: dict[str, Any]) -> dict[str, str]:
    """Function name -> why the diff engine included it (``changed`` entries win over ``included``)."""
    out: dict[str, str] = {}
    for key in ("included", "changed"):
        for ent in report.get(key) or []:
            if isinstance(ent, dict) and ent.get("name") and ent.get("why"):
                out[str(ent["name"])] = str(ent["why"])
    return out


def run_object_diff(obj: str, orig: Path, patched: Path, out: Path, target: str, symtab: Path,
                    symvers: Path | None, env: dict[str, str]) -> DiffOutcome:
    """Diff one object pair; ``NoChange``/``UnsafeChange``/``InputError`` propagate from the engine."""
    diff = _diff_module()
    opts = diff.DiffOptions(target=target, symtab=symtab, symvers=symvers, env=env)
    res = diff.run_diff(orig, patched, out, opts)
    report = getattr(res, "report", None) or {}
    whys = _reasons(report if isinstance(report, dict) else {})
    funcs = []
    for f in res.patched_functions:
        why = (getattr(f, "reason", "") or whys.get(str(getattr(f, "new_name", "") or f.old_name))
               or whys.get(str(f.old_name), ""))
        funcs.append(KlpFunc(str(f.old_name), int(f.sympos or 0), str(f.new_symbol), str(why)))
    cbs = adapt_callbacks(getattr(res, "callbacks", None))
    replaced = {f.old_name for f in funcs} | {str(getattr(f, "new_name", "")) for f in res.patched_functions}
    carried = {}
    for ent in (report.get("included") or []) if isinstance(report, dict) else []:
        if (isinstance(ent, dict) and ent.get("type") == "function" and ent.get("name") not in replaced
                and ent.get("name") not in cbs.values()):
            carried[str(ent["name"])] = str(ent.get("why", ""))
    return DiffOutcome(obj, target, out, funcs, cbs, dict(report) if isinstance(report, dict) else {},
                       carried=carried)
