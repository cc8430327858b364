"""`verispec bench`: per category, speculative decoding beside plain decoding measured in the same run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from verispec import hub
from verispec.cli.flags import add_flags, from_flags
from verispec.cli.generate import add_suffix_flag
from verispec.config import RuntimeConfig
from verispec.errors import InvalidInputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speedup, acceptance and time split per prompt category")
    p.add_argument("--model", default=hub.DEFAULT_MODEL)
    p.add_argument("--drafter", default="ngram", help="comma-separated: ngram,suffix,draft:MODEL,eagle:DIR")
    add_suffix_flag(p)
    p.add_argument("--prompts", default="spec-bench",
                   help="spec-bench, repetitive (benchmarks/repetitive.py: requests that repeat each other's "
                        "answers), or a JSONL file; prompts run in file order")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    p.add_argument("--per-category", type=int, default=None,
                   help="prompts per category (default: 2 of spec-bench, all of the others)")
    p.add_argument("--num-draft-tokens", default="1,2,4,8,auto", help="comma-separated taus; auto = the controller")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy, outputs checked against plain decoding's; > 0: sampled, a seed per prompt and "
                        "round (speed only: sampled outputs differ by design)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every prompt this many times (interleaved); speedups are medians over rounds")
    p.add_argument("--baselines", default="plain",
                   help="comma-separated: plain,transformers,llamacpp (llamacpp: the extra verispec[llamacpp])")
    p.add_argument("--output", default=None, help="a folder for result.json, traces and PNG plots")
    add_flags(p, RuntimeConfig)
    p.set_defaults(run=run)


def _taus(text: str) -> list[int | str]:
    try:
        values: list[int | str] = [x if x == "auto" else int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v != "auto" and not 1 <= int(v) <= 15 for v in values):
        raise InvalidInputError(f"num_draft_tokens={text!r} is not allowed: give comma-separated values, "
                                "each 'auto' or an integer in [1, 15]")
    return values


def run(args: argparse.Namespace) -> None:
    from verispec.benchmark import llamacpp
    from verispec.benchmark.plots import write_plots
    from verispec.benchmark.prompts import load_prompts
    from verispec.benchmark.runner import BASELINES, LLAMACPP, run_bench
    from verispec.llm import LLM

    taus = _taus(args.num_draft_tokens)
    baselines = args.baselines.split(",")
    if not set(baselines) <= set(BASELINES):
        raise InvalidInputError(f"baselines={args.baselines!r} is not allowed: choose from {', '.join(BASELINES)}")
    if LLAMACPP in baselines:
        llamacpp.require()  # before any model loads
    if args.max_tokens < 2:
        raise InvalidInputError(f"max_tokens={args.max_tokens} is not allowed: it must be >= 2")
    if not args.temperature >= 0:
        raise InvalidInputError(f"temperature={args.temperature} is not allowed: it must be >= 0")
    if args.rounds < 1:
        raise InvalidInputError(f"rounds={args.rounds} is not allowed: it must be >= 1")
    per_category = args.per_category if args.per_category is not None else 2 if args.prompts == "spec-bench" else None
    prompts = load_prompts(args.prompts, args.categories.split(",") if args.categories else None, per_category)
    llm = LLM(args.model, from_flags(RuntimeConfig, args), suffix_global=args.suffix_global,
              suffix_budget=args.suffix_budget)
    result = run_bench(llm, prompts, args.drafter.split(","), taus, args.max_tokens, baselines, rounds=args.rounds,
                       temperature=args.temperature)
    traces = result.pop("traces")
    result["model"] = args.model
    print(table(result))
    for d in result["divergences"]:
        print(f"CORRECTNESS FAILURE: {d['config']} diverged from plain decoding on {d['category']}/"
              f"{d['question_id']} at output position {d['position']} (target logit margin there "
              f"{d['logit_margin']})", file=sys.stderr)
    if args.output:
        out = Path(args.output)
        (out / "traces").mkdir(parents=True, exist_ok=True)
        for key, text in traces.items():
            (out / "traces" / (key.replace("/", "_").replace("|", "-").replace(":", "_") + ".jsonl")).write_text(text)
        (out / "result.json").write_text(json.dumps(result, indent=1))
        for path in write_plots(result, out):
            print(f"wrote {path}")
    print(json.dumps(result))


def table(result: dict[str, Any]) -> str:
    llamacpp = bool(result.get("llamacpp_verify_ms"))
    lines = [f"{'category':15} {'config':30} {'tok/s':>7} {'speedup':>8} {'workload':>8} "
             + (f"{'vs llama.cpp':>12} " if llamacpp else "")
             + f"{'predicted':>9} {'accept':>7} {'len':>5} {'draft/verify/other':>19} {'same':>5}"]
    for category, rows in result["categories"].items():
        for name, r in rows.items():
            spec = "acceptance" in r
            split = "/".join(f"{r['time_split'][k]:.0%}" for k in ("draft", "verify", "other")) if spec else ""
            lines.append(f"{category:15} {name:30} {r['tok_s']:7.1f} {r['speedup']:7.2f}x {r['workload_speedup']:7.2f}x "
                         + (f"{r['vs_llamacpp']:11.2f}x " if llamacpp else "")
                         + (f"{r['predicted_speedup']:8.2f}x {r['acceptance']:7.0%} {r['mean_accepted_length']:5.2f} "
                            f"{split:>19} {'-' if r['identical'] is None else r['identical']:>2}/{r['runs']}"
                            if spec else ""))
    for label, curve in (("verispec", result["verify_ms"]), ("llama.cpp", result.get("llamacpp_verify_ms"))):
        if curve:
            lines.append(f"{label} verify cost T(k)/T(1), T(1) = {curve[1]:.1f} ms: "
                         + " ".join(f"{k}:{ms / curve[1]:.2f}" for k, ms in curve.items()))
    if llamacpp:
        lines.append("llama.cpp's greedy output parts from our plain decoding at position (median over runs): "
                     f"{result['categories']['overall']['llamacpp']['parts_from_plain_at']}")
    if result["controller"]:
        lines.append("auto against the best fixed tau in hindsight (tau 0 = plain decoding), by the median speedup "
                     "over prompts and by the workload's (all tokens / all time):")
    for scope, by_drafter in result["controller"].items():
        for drafter, rating in by_drafter.items():
            lines.append(f"{scope:15} {drafter}/auto " + "; ".join(
                f"{measure.replace('_', ' ')} {r['ratio']:.3f} (auto {r['auto']:.2f}x, tau {r['best_fixed_tau']} "
                f"{r['best_fixed']:.2f}x)" for measure, r in rating.items()))
    return "\n".join(lines)
