"""`verispec diagnose TRACE`: what holds the speedup back, in plain words with the numbers."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="explain a trace (docs/trace.md): acceptance, costs, verdict, fixes")
    p.add_argument("trace", help="a trace file written by --trace or converted from another engine's logs")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from verispec.engine.diagnose import diagnose, explain
    from verispec.engine.trace import read_trace

    report = diagnose(read_trace(args.trace))
    print(json.dumps(report.to_dict()) if args.json else explain(report))
