"""`verispec advise`: which drafter and τ pay on your own traffic, predicted from one target pass and
checked by measuring the best two."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from verispec import hub
from verispec.cli.flags import add_flags, from_flags
from verispec.cli.generate import add_suffix_flag
from verispec.config import RuntimeConfig
from verispec.drafters.select import parse_drafter
from verispec.errors import InvalidInputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("advise", help="will speculation pay on these prompts, and with which drafter and tau?")
    p.add_argument("--model", default=hub.DEFAULT_MODEL)
    p.add_argument("--prompts", required=True,
                   help="a JSONL file: per line {\"prompt\": ...}, {\"messages\": [...]} or a logged OpenAI request "
                        "body (optional \"category\"); or spec-bench, repetitive")
    p.add_argument("--drafters", default="ngram,suffix", help="comma-separated: ngram,suffix,ngram-tree,draft:MODEL,eagle:DIR")
    add_suffix_flag(p)
    p.add_argument("--max-prompts", type=int, default=None, help="the file's first N prompts (default: all)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--measure", type=int, default=4, metavar="N",
                   help="prompts the best two configurations and plain decoding are measured on (0: none)")
    p.add_argument("--rounds", type=int, default=2, help="times each measured prompt runs, interleaved")
    p.add_argument("--output", default=None, help="a folder for advise.json and advise.png")
    add_flags(p, RuntimeConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from verispec.benchmark.advise import advise, table, verdict
    from verispec.benchmark.plots import write_advice_plot
    from verispec.benchmark.prompts import load_prompts
    from verispec.llm import LLM

    drafters = args.drafters.split(",")
    if "none" in drafters:
        raise InvalidInputError("drafters='none' is not allowed here: plain decoding is always compared")
    for d in drafters:
        parse_drafter(d)
    for name in ("max_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"{name}={getattr(args, name)} is not allowed: it must be >= 1")
    if args.measure < 0 or (args.max_prompts is not None and args.max_prompts < 1):
        raise InvalidInputError(f"measure={args.measure}, max_prompts={args.max_prompts} are not allowed: "
                                "measure must be >= 0 and max_prompts >= 1")
    prompts = load_prompts(args.prompts)[: args.max_prompts]
    if not prompts:
        raise InvalidInputError(f"prompts={args.prompts!r} has no prompts")
    llm = LLM(args.model, from_flags(RuntimeConfig, args), suffix_global=args.suffix_global,
              suffix_budget=args.suffix_budget)
    result = advise(llm, prompts, drafters, args.max_tokens, args.measure, args.rounds)
    result["model"] = args.model
    print(table(result))
    print()
    print("\n".join(verdict(result)))
    print(f"advise took {result['seconds']:.0f} s, of which the target pass {result['target_seconds']:.0f} s")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "advise.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {write_advice_plot(result, out)}")
    print(json.dumps(result))
