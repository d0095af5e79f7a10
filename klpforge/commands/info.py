"""``klpforge info NAME``: one live patch in detail (module, targets and functions, installation, kernel state).

>>> # klpforge info livepatch_fix [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register", "run_info"]


def run_info(args: argparse.Namespace) -> int:
    """Print the details."""
    from ..host.actions import info_json
    from ..host.store import host_root

    d = info_json(args.name, host_root(args.root))
    if args.json:
        json.dump(d, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"name:       {d['name']}")
    print(f"state:      {d['state']}")
    if "installed" in d:
        i = d["installed"]
        print(f"installed:  {i['path']} ({i['via']}, release {i['release']})")
    m = d.get("module")
    if m:
        print(f"vermagic:   {m['vermagic']}")
        print(f"replace:    {'yes (cumulative: replaces every earlier patch)' if m['replace'] else 'no'}"
              if m["replace"] is not None else "replace:    unknown")
        print(f"signed:     {'yes' if m['signed'] else 'no'}")
        print(f"sha256:     {m['sha256']}")
        for o in m["objects"]:
            funcs = ", ".join(f["name"] + (f",{f['sympos']}" if f["sympos"] else "") for f in o["funcs"])
            print(f"object:     {o['name']}: {funcs or '(relocations only)'}")
        for k, v in sorted(m["modinfo"].items()):
            if k.startswith("klpforge"):
                print(f"modinfo:    {k}={v}")
    meta = d.get("metadata", {})
    for f in meta.get("fixes", []):
        print(f"fix:        {f['file']} {f.get('subject', '')}".rstrip())
    if meta.get("cves"):
        print(f"cves:       {' '.join(meta['cves'])}")
    lo = d.get("loaded")
    if lo:
        print(f"kernel:     enabled={int(lo['enabled'])} transition={int(lo['transition'])}"
              + (f" stack_order={lo['stack_order']}" if lo["stack_order"] is not None else ""))
        for o in lo["objects"]:
            pat = "" if o["patched"] is None else f" patched={int(o['patched'])}"
            print(f"  {o['name']}:{pat} {' '.join(o['functions'])}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``info``."""
    p = subparsers.add_parser(
        "info", help="details of one live patch",
        description="NAME is a module name (installed or loaded) or a .ko file: its release, vermagic, "
                    "cumulative (replace) or not, signature, targets and replaced functions (read from the "
                    "module), where it is installed and the fixes it carries, and the kernel's view "
                    "(enabled, transition, per-object patched, functions).",
        epilog="exit codes: 0 ok, 1 error (no such patch)")
    p.add_argument("name", metavar="NAME", help="module name or .ko file")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.add_argument("--root", metavar="DIR", help="as for list (also $KLPFORGE_ROOT)")
    p.set_defaults(func=run_info)
