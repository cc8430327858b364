"""`verispec models list|fetch`."""

from __future__ import annotations

import argparse

from verispec import hub


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="built-in models")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="list built-in models and whether they are fetched")
    f = msub.add_parser("fetch", help="fetch a built-in model into the cache (VERISPEC_CACHE)")
    f.add_argument("name", choices=sorted(hub.BUILTINS))
    m.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.action == "list":
        for name, b in hub.BUILTINS.items():
            state = "fetched" if hub.is_fetched(name) else "not fetched"
            print(f"{name:24} {state:12} {b.description}")
        print(f"cache: {hub.cache_dir()}")
        return
    print(hub.fetch(args.name))
