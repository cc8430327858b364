"""`verispec calibrate`: measure T(k) and the drafter's cost here, store them for later runs."""

from __future__ import annotations

import argparse
import json

from verispec import hub
from verispec.cli.flags import add_flags, from_flags
from verispec.config import RuntimeConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure the verify-cost curve T(k) and the drafter's cost on this machine")
    p.add_argument("--model", default=hub.DEFAULT_MODEL)
    p.add_argument("--drafter", default="none", help="none | ngram | suffix | draft:MODEL | eagle:DIR")
    p.add_argument("--repeats", type=int, default=5, help="timings per value (the median is kept)")
    add_flags(p, RuntimeConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from verispec.llm import LLM

    llm = LLM(args.model, from_flags(RuntimeConfig, args), drafter=args.drafter)
    cal = llm.calibrate(repeats=args.repeats)
    model = cal.cost_model()
    print(f"{'k':>3} {'T(k) ms':>9} {'T(k)/T(1)':>10}")
    for k, ms in enumerate(cal.verify_ms, 1):
        print(f"{k:>3} {ms:>9.2f} {ms / cal.verify_ms[0]:>10.2f}")
    print(f"drafter {args.drafter}: {cal.draft_ms_per_token:.3f} ms per token, c = {model.c:.4f}; "
          f"{cal.feed_ms_per_token:.3f} ms per token taken in before drafting")
    print(f"the engine's own time per cycle, outside the forward: {cal.overhead_ms:.3f} ms")
    print(f"stored in {llm.calibration_path}")
    print(json.dumps({"model": args.model, "drafter": args.drafter, "verify_ms": [round(x, 4) for x in cal.verify_ms],
                      "draft_ms_per_token": round(cal.draft_ms_per_token, 4),
                      "feed_ms_per_token": round(cal.feed_ms_per_token, 4), "c": round(model.c, 5),
                      "overhead_ms": round(cal.overhead_ms, 4),
                      "path": str(llm.calibration_path)}))
