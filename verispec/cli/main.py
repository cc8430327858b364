"""The `verispec` command: thin parsing and printing over the library. Bad input exits 2 with a message."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from verispec import hub
from verispec.config import RuntimeConfig, SamplingParams
from verispec.errors import VerispecError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verispec", description="Lossless speculative decoding.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("--model", default=hub.DEFAULT_MODEL, help="a built-in name, a .gguf file or a Hugging Face folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=SamplingParams.max_tokens)
    g.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    g.add_argument("--top-k", type=int, default=SamplingParams.top_k)
    g.add_argument("--top-p", type=float, default=SamplingParams.top_p)
    g.add_argument("--min-p", type=float, default=SamplingParams.min_p)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--max-context", type=int, default=None, help="KV cache capacity in tokens")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--device", default="auto")
    g.add_argument("--drafter", default="none", help="none | ngram (prompt lookup)")
    g.add_argument("--num-draft-tokens", type=int, default=4, help="tokens drafted per cycle (tau), 1..15")
    g.add_argument("--compare", action="store_true",
                   help="also run plain decoding and print the speedup and whether the outputs are identical")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    m = sub.add_parser("models", help="built-in models")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="list built-in models and whether they are fetched")
    f = msub.add_parser("fetch", help="fetch a built-in model into the cache (VERISPEC_CACHE)")
    f.add_argument("name", choices=sorted(hub.BUILTINS))
    return p


def _generate(args: argparse.Namespace) -> None:
    from verispec.llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos)
    runtime = RuntimeConfig(device=args.device, threads=args.threads, max_context=args.max_context)
    llm = LLM(args.model, runtime, drafter=args.drafter, num_draft_tokens=args.num_draft_tokens)
    out = llm.generate(args.prompt, params, chat=args.chat)
    plain = llm.generate(args.prompt, params, chat=args.chat, speculative=False) if args.compare else None
    if args.json:
        result = out.to_dict()
        if plain is not None:
            result["plain"] = plain.to_dict()
        print(json.dumps(result))
        return
    print(out.text)
    s = out.stats
    print(f"\n[{s.completion_tokens} tokens, finish_reason={out.finish_reason}, prompt {s.prompt_tokens} tokens "
          f"in {s.prefill_s:.2f}s, decode {s.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    if s.drafted:
        print(f"[drafter {args.drafter}, tau {args.num_draft_tokens}: {s.cycles} cycles, acceptance "
              f"{s.acceptance_rate:.0%}, {s.mean_accepted_length:.2f} tokens per target forward, accepted by "
              f"position {s.accepted_per_position}/{s.drafted_per_position}]", file=sys.stderr)
    if plain is not None:
        p = plain.stats
        same = "identical" if plain.token_ids == out.token_ids else "DIFFERENT (a correctness failure)"
        print(f"[plain decoding {p.decode_tokens_per_s:.1f} tok/s -> speedup "
              f"{s.decode_tokens_per_s / p.decode_tokens_per_s:.2f}x; outputs {same}]", file=sys.stderr)


def _models(args: argparse.Namespace) -> None:
    if args.action == "list":
        for name, b in hub.BUILTINS.items():
            state = "fetched" if hub.is_fetched(name) else "not fetched"
            print(f"{name:24} {state:12} {b.description}")
        print(f"cache: {hub.cache_dir()}")
        return
    print(hub.fetch(args.name))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"generate": _generate, "models": _models}[args.command](args)
    except VerispecError as e:
        print(f"verispec: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
