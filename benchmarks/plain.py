"""Plain decoding speed: ours vs transformers' generate on the same weights, the memory-bandwidth
roofline, and the verify-cost curve T(k)/T(1). Prints a table; the last line is one JSON object.

    python benchmarks/plain.py --model smollm2-135m-instruct [--tokens 128] [--runs 3] [--no-transformers]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from verispec import hub
from verispec.benchmark import baselines
from verispec.config import RuntimeConfig, SamplingParams
from verispec.engine.calibrate import verify_curve_ms
from verispec.llm import LLM

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle gear system works.",
           "List ten facts about the Moon and explain each."]


def cold_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of one pass over a buffer far larger than the caches (the decode step's access pattern)."""
    buf = torch.ones(int(gib * 2**30) // 4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.nbytes / statistics.median(times)


def ours_tok_s(llm: LLM, prompts: list[list[int]], tokens: int, runs: int) -> float:
    params = SamplingParams(max_tokens=tokens, min_tokens=tokens)
    llm.generate(prompts[0], SamplingParams(max_tokens=8))  # warm-up
    rates = [llm.generate(p, params).stats.decode_tokens_per_s for _ in range(runs) for p in prompts]
    return statistics.median(rates)


def transformers_tok_s(llm: LLM, prompts: list[list[int]], tokens: int, runs: int) -> float:
    model = baselines.load_hf(llm.source)
    baselines.decode_tok_s(model, prompts[0], 8)  # warm-up
    return statistics.median(baselines.decode_tok_s(model, p, tokens) for _ in range(runs) for p in prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=hub.DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()

    llm = LLM(args.model, RuntimeConfig(threads=args.threads, max_context=2048))
    prompts = [llm.encode(p, chat=bool(llm.tokenizer.chat_template)) for p in PROMPTS]
    bandwidth = cold_read_bandwidth()
    weight_bytes = llm.target.weight_bytes_per_token
    roofline = bandwidth / weight_bytes
    ours = ours_tok_s(llm, prompts, args.tokens, args.runs)
    curve = dict(enumerate(verify_curve_ms(llm.target, llm.engine.cache, 16, repeats=7), 1))  # ms
    theirs = None if args.no_transformers else transformers_tok_s(llm, prompts, args.tokens, args.runs)

    print(f"model {args.model}: {weight_bytes / 1e6:.0f} MB of fp32 weights read per token, "
          f"{args.threads} threads, greedy, {args.tokens} new tokens, median of {args.runs * len(prompts)} runs")
    print(f"cold read bandwidth      {bandwidth / 1e9:6.1f} GB/s  -> roofline {roofline:6.1f} tok/s")
    print(f"verispec                 {ours:6.1f} tok/s  ({ours / roofline:.0%} of roofline)")
    if theirs is not None:
        print(f"transformers generate    {theirs:6.1f} tok/s  -> verispec is {ours / theirs:.2f}x")
    print("verify cost T(k)/T(1):   " + "  ".join(f"k={k}:{t / curve[1]:.2f}" for k, t in curve.items()))
    print(json.dumps({
        "model": args.model, "tokens": args.tokens, "threads": args.threads,
        "verispec_tok_s": round(ours, 2), "transformers_tok_s": theirs and round(theirs, 2),
        "speedup_vs_transformers": theirs and round(ours / theirs, 3),
        "bandwidth_gb_s": round(bandwidth / 1e9, 2), "weight_mb_per_token": round(weight_bytes / 1e6, 1),
        "roofline_tok_s": round(roofline, 2), "fraction_of_roofline": round(ours / roofline, 3),
        "t1_ms": round(curve[1], 2), "verify_curve": {k: round(t / curve[1], 3) for k, t in curve.items()},
    }))


if __name__ == "__main__":
    main()
