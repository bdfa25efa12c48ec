"""`st-sdk cache`: what st-sdk keeps in its cache directory, and removing what is stale."""
from __future__ import annotations

import argparse
import json
import os

from st_sdk.sizes import fmt_bytes, tree_bytes

#: what each top-level entry of the cache directory holds
KNOWN = {"experts": "prepared expert files and kept expert use counts (memory-budget mode; st_sdk.offload)",
         "selection.json": "measured backend choices (`st-sdk backends --clear-cache` removes it)",
         "demo": "the demo's model (`st-sdk demo`)",
         "models": "synthesised benchmark models (st_sdk.bench.files)"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "cache", help="list st-sdk's cache directory; remove stale prepared expert files and use counts",
        description="List what st-sdk keeps in its cache directory (ST_SDK_CACHE_DIR, else the platform's user "
                    "cache directory): the prepared expert files that memory-budget mode reads and the expert use "
                    "counts it keeps between loads, each with the model file it was made from and whether it "
                    "is stale (its model file changed or is gone, another st-sdk version wrote it, or a write "
                    "was interrupted), and the other entries with their sizes. --clean removes the stale files.")
    p.add_argument("--clean", action="store_true", help="remove the stale prepared expert files and use counts")
    p.add_argument("--all", action="store_true",
                   help="with --clean: every one (a later load under a budget writes its own again; kept use "
                        "counts start over)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from st_sdk.environment import cache_dir
    from st_sdk.errors import InputError
    from st_sdk.offload import prepared

    if args.all and not args.clean:
        raise InputError("--all goes with --clean (it says which prepared expert files --clean removes)")
    root = cache_dir()
    experts = root / "experts"
    removed = prepared.clean(experts, everything=args.all) if args.clean else []
    entries = prepared.scan(experts)
    others = sorted(p for p in root.iterdir() if p.name != "experts") if root.is_dir() else []
    if args.json:
        print(json.dumps({
            "directory": str(root),
            "removed": [{"path": str(e.path), "bytes": e.nbytes, "kind": e.kind, "why": e.why or "--all"}
                        for e in removed],
            "expert_files": [{"path": str(e.path), "bytes": e.nbytes, "kind": e.kind, "state": e.state, "why": e.why,
                              "sources": list(e.sources)} for e in entries],
            "other": [{"path": str(p), "bytes": tree_bytes(p), "holds": KNOWN.get(p.name, "")} for p in others]}, indent=2))
        return 0
    where = "ST_SDK_CACHE_DIR" if os.environ.get("ST_SDK_CACHE_DIR") else "the platform's user cache directory"
    print(f"st-sdk cache directory: {root} ({where})")
    for e in removed:
        print(f"  removed {fmt_bytes(e.nbytes):>11}  {e.path.name}  ({e.why or 'current; --all'})")
    if removed:
        print(f"  freed {fmt_bytes(sum(e.nbytes for e in removed))}")
    print(f"prepared expert files and kept use counts ({experts}):" if entries
          else f"no prepared expert files or kept use counts in {experts}")
    for e in entries:
        made = f"from {', '.join(e.sources)}" if e.sources else ""
        print(f"  {fmt_bytes(e.nbytes):>11}  {e.kind:7s} {e.state:8s} {e.path.name}  {made}")
        if e.why:
            print(f"  {'':11}  {'':7s} {'':8s} {e.why}")
    stale = [e for e in entries if e.state == "stale"]
    if entries:
        print(f"  total {fmt_bytes(sum(e.nbytes for e in entries))}"
              + (f"; {len(stale)} stale ({fmt_bytes(sum(e.nbytes for e in stale))}): `st-sdk cache --clean` "
                 f"removes them" if stale else ""))
    if others:
        print("other entries:")
        for p in others:
            print(f"  {fmt_bytes(tree_bytes(p)):>11}  {p.name}{'/' if p.is_dir() else ''}  {KNOWN.get(p.name, '')}")
    return 0
