"""`verispec generate`: one prompt, streamed to the terminal (or one JSON object), optionally beside
plain decoding and with a per-cycle trace."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack

from verispec import hub
from verispec.cli.flags import add_flags, from_flags, on_off
from verispec.config import RuntimeConfig, SamplingParams
from verispec.drafters.suffix import BUDGET
from verispec.types import Output


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("--model", default=hub.DEFAULT_MODEL, help="a built-in name, a .gguf file or a Hugging Face folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_drafter_flags(g)
    g.add_argument("--compare", action="store_true",
                   help="also run plain decoding and print the speedup and whether the outputs are identical")
    g.add_argument("--trace", metavar="FILE", help="write one JSON line per cycle (docs/trace.md)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_flags(g, SamplingParams, skip=("suffix_global",))  # a drafter flag here: one request, one LLM
    add_flags(g, RuntimeConfig)
    g.set_defaults(run=run)


def add_drafter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", default="none",
                   help="none | ngram (prompt lookup) | suffix (suffix trees over the request and past "
                        "responses) | draft:MODEL (a draft model) | eagle:DIR (an EAGLE-3 head, verispec train-drafter)")
    p.add_argument("--num-draft-tokens", type=tau_flag, default="auto",
                   help="tokens drafted per cycle (tau): 1..15, or auto (a controller picks tau every cycle)")
    add_suffix_flag(p)


def add_suffix_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suffix-global", type=on_off, default=True, metavar="on|off",
                   help="suffix drafter: learn from past responses in a tree shared by all requests (default on); "
                        "off: no request's outputs shape another's drafts")
    p.add_argument("--suffix-budget", type=int, default=BUDGET, metavar="TOKENS",
                   help=f"suffix drafter: tokens of past responses the global tree keeps, oldest evicted first "
                        f"(default {BUDGET})")


def tau_flag(text: str) -> int | str:
    return text if text == "auto" else int(text)


def run(args: argparse.Namespace) -> None:
    from verispec.engine.calibrate import forward_ms, warm_up
    from verispec.engine.trace import TraceWriter
    from verispec.llm import LLM

    params = from_flags(SamplingParams, args)
    llm = LLM(args.model, from_flags(RuntimeConfig, args), drafter=args.drafter,
              num_draft_tokens=args.num_draft_tokens, suffix_global=args.suffix_global,
              suffix_budget=args.suffix_budget)
    with ExitStack() as stack:
        trace = None
        if args.trace:
            file = stack.enter_context(open(args.trace, "w"))
            warm_up(llm.target, llm.engine.cache, seconds=1.0)
            trace = TraceWriter(file, model=args.model, drafter=args.drafter, num_draft_tokens=args.num_draft_tokens,
                                target_step_ms=round(forward_ms(llm.target, llm.engine.cache, 1), 4))
        if args.json or params.n > 1:
            out = llm.generate(args.prompt, params, chat=args.chat, trace=trace)
            for j, choice in enumerate(out.choices if not args.json and params.n > 1 else []):
                print(f"[choice {j}]\n{choice.text}")
        else:
            for piece in llm.stream(args.prompt, params, chat=args.chat, trace=trace):
                if isinstance(piece, Output):
                    out = piece
                else:
                    print(piece, end="", flush=True)
            print()
    plain = llm.generate(args.prompt, params, chat=args.chat, speculative=False) if args.compare else None
    if args.json:
        result = out.to_dict()
        if plain is not None:
            result["plain"] = plain.to_dict()
        print(json.dumps(result))
        return
    s = out.stats
    print(f"\n[{s.completion_tokens} tokens, finish_reason={out.finish_reason}, prompt {s.prompt_tokens} tokens "
          f"in {s.prefill_s:.2f}s, decode {s.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    if s.drafted:
        print(f"[drafter {args.drafter}, tau {args.num_draft_tokens}: {s.cycles} cycles, {s.drafts} drafts, "
              f"{s.drafted} draft tokens, acceptance {s.acceptance_rate:.0%}, mean accepted length "
              f"{s.mean_accepted_length:.2f}, {s.tokens_per_cycle:.2f} tokens per target forward, accepted by "
              f"position {s.accepted_per_position}/{s.drafted_per_position}]", file=sys.stderr)
    if plain is not None:
        p = plain.stats
        same = "identical" if plain.token_ids == out.token_ids else "DIFFERENT (a correctness failure)"
        print(f"[plain decoding {p.decode_tokens_per_s:.1f} tok/s -> speedup "
              f"{s.decode_tokens_per_s / p.decode_tokens_per_s:.2f}x; outputs {same}]", file=sys.stderr)
