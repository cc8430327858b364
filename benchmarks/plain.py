"""Plain decoding speed: verispec beside llama.cpp and transformers' generate on the same weights and
prompts, in one run, interleaved per prompt; the memory-bandwidth roofline; the verify-cost curve
T(k)/T(1), ours and llama.cpp's; prefill of a 512-token prompt, ours and llama.cpp's. Prints a table;
the last line is one JSON object.

    python benchmarks/plain.py --model smollm2-135m-instruct [--tokens 128] [--runs 2] [--threads 2]
                               [--no-transformers] [--no-llamacpp] [--torch]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from verispec import hub
from verispec.benchmark import baselines, llamacpp
from verispec.benchmark.runner import first_difference
from verispec.config import RuntimeConfig, SamplingParams
from verispec.engine.calibrate import median_ms, verify_curve_ms
from verispec.errors import InvalidInputError
from verispec.llm import LLM
from verispec.model.transformer import Segment

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle gear system works.",
           "List ten facts about the Moon and explain each."]
PREFILL_TOKENS = 512
MAX_K = 16


@dataclass
class System:
    """One row of the table: greedy decoding on (prompt ids, new tokens) -> (decode tok/s, output ids or
    None), and what the row measured."""

    label: str
    decode: Callable[[list[int], int], tuple[float, list[int] | None]]
    verify_ms: tuple[float, ...] = ()  # T(1), ..., T(MAX_K)
    prefill_s: float | None = None  # PREFILL_TOKENS - 1 ids into an empty cache
    roofline_tok_s: float | None = None
    rates: list[float] = field(default_factory=list)  # tok/s, one per (run, prompt) in job order
    outputs: list[list[int] | None] = field(default_factory=list)


def verispec_llms(model: str, threads: int, with_torch: bool) -> list[tuple[str, LLM]]:
    """Our configurations, one row each: another is one more `make(label, field=value)` line."""

    def make(label: str, **runtime: Any) -> tuple[str, LLM]:
        return label, LLM(model, RuntimeConfig(threads=threads, max_context=2048, **runtime))

    rows = [make("verispec native exact", backend="native"),
            make("verispec native int8", backend="native", activations="int8")]
    return rows + ([make("verispec torch", backend="torch")] if with_torch else [])


def cold_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of one pass over a buffer far larger than the caches (the decode step's access pattern)."""
    buf = torch.ones(int(gib * 2**30) // 4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.nbytes / statistics.median(times)


def verispec_system(label: str, llm: LLM, prefill_ids: list[int], bandwidth: float) -> System:
    def decode(ids: list[int], tokens: int) -> tuple[float, list[int] | None]:
        out = llm.generate(ids, SamplingParams(max_tokens=tokens, min_tokens=tokens))
        return out.stats.decode_tokens_per_s, out.token_ids

    cache = llm.engine.cache

    def prefill() -> None:  # as the engine prefills: every prompt id but the last, no logits
        cache.truncate(0)
        llm.target.forward_many([Segment(torch.tensor(prefill_ids, device=llm.target.device), cache, "none")])

    curve = verify_curve_ms(llm.target, cache, MAX_K, repeats=7)  # ms
    try:
        prefill_s = median_ms(prefill, repeats=3) / 1e3
    finally:
        cache.truncate(0)
    return System(label, decode, curve, prefill_s, bandwidth / llm.target.weight_bytes_per_token)


def llamacpp_system(llm: LLM, threads: int, prefill_ids: list[int]) -> System | None:
    """llama.cpp on the same GGUF, or None, said in one line, when it cannot run here (the extra not
    installed, a model that is not a GGUF)."""
    try:
        model = llamacpp.LlamaCpp(llm.source, threads)
    except InvalidInputError as e:
        print(f"llama.cpp left out: {e}")
        return None
    return System("llama.cpp", model.decode, model.verify_curve_ms(MAX_K, repeats=7), model.prefill_s(prefill_ids))


def transformers_system(llm: LLM) -> System:
    model = baselines.load_hf(llm.source)
    return System("transformers generate", lambda ids, tokens: (baselines.decode_tok_s(model, ids, tokens), None))


def run_interleaved(systems: list[System], prompts: list[list[int]], tokens: int, runs: int) -> None:
    """Warm every system up, then per (run, prompt) run them all, each taking every place in the order
    in turn, so a slow spell of the shared machine hits all alike."""
    for s in systems:
        s.decode(prompts[0], 8)
    for n, ids in enumerate(ids for _ in range(runs) for ids in prompts):
        order = systems[n % len(systems):] + systems[: n % len(systems)]
        for s in order if n % 2 == 0 else order[::-1]:
            rate, output = s.decode(ids, tokens)
            s.rates.append(rate)
            s.outputs.append(output)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=hub.DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--torch", action="store_true", help="add the torch backend (fp32, the reference) as a row")
    args = ap.parse_args()

    # 1. load; the same prompt ids for every system (one GGUF, so one vocabulary)
    rows = verispec_llms(args.model, args.threads, args.torch)
    llm = rows[0][1]
    chat = bool(llm.tokenizer.chat_template)
    prompts = [llm.encode(p, chat=chat) for p in PROMPTS]
    long_ids = llm.encode(" ".join(PROMPTS * 100))
    if len(long_ids) < PREFILL_TOKENS:
        raise SystemExit(f"the prefill text has only {len(long_ids)} tokens, fewer than {PREFILL_TOKENS}")
    prefill_ids = long_ids[: PREFILL_TOKENS - 1]
    bandwidth = cold_read_bandwidth()
    # 2. per system its verify curve and prefill, then decoding interleaved over all of them
    systems = [verispec_system(label, row_llm, prefill_ids, bandwidth) for label, row_llm in rows]
    theirs = None if args.no_llamacpp else llamacpp_system(llm, args.threads, prefill_ids)
    systems += [theirs] if theirs is not None else []
    hf = None if args.no_transformers else transformers_system(llm)
    systems += [hf] if hf is not None else []
    run_interleaved(systems, prompts, args.tokens, args.runs)

    # 3. report: ratios are medians over the (run, prompt) pairs, each measured in the same round
    def tok_s(s: System) -> float:
        return statistics.median(s.rates)

    def ratio(a: System, b: System) -> float:
        return statistics.median(x / y for x, y in zip(a.rates, b.rates))

    def curve(s: System) -> dict[int, float]:
        return {k: round(t / s.verify_ms[0], 3) for k, t in enumerate(s.verify_ms, 1)}

    first = systems[0]
    parts_at = [first_difference(a, b) for a, b in zip(theirs.outputs, first.outputs)] if theirs else []
    print(f"model {args.model}: {args.threads} threads, greedy, {args.tokens} new tokens, median of "
          f"{args.runs * len(prompts)} runs per system, interleaved; cold read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'system':24} {'tok/s':>7} {'vs llama.cpp':>12} {'roofline':>8} {'T(1) ms':>8} "
          f"{'prefill ' + str(PREFILL_TOKENS) + ' ms':>12}  T(k)/T(1) for k = 2, 4, 8, 16")
    for s in systems:
        shape = "  ".join(f"{curve(s)[k]:5.2f}" for k in (2, 4, 8, 16)) if s.verify_ms else ""
        print(f"{s.label:24} {tok_s(s):7.1f} " + (f"{ratio(s, theirs):11.2f}x " if theirs else f"{'':12} ")
              + (f"{tok_s(s) / s.roofline_tok_s:8.0%} " if s.roofline_tok_s else f"{'':8} ")
              + (f"{s.verify_ms[0]:8.1f} " if s.verify_ms else f"{'':8} ")
              + (f"{s.prefill_s * 1e3:12.0f}  " if s.prefill_s else f"{'':12}  ") + shape)
    if theirs:
        print(f"llama.cpp's greedy output parts from {first.label}'s at positions {parts_at} "
              f"(one per prompt and run; {args.tokens} = never)")
    print(json.dumps({
        "model": args.model, "tokens": args.tokens, "threads": args.threads, "runs": args.runs,
        "verispec_tok_s": round(tok_s(first), 2), "transformers_tok_s": hf and round(tok_s(hf), 2),
        "speedup_vs_transformers": hf and round(ratio(first, hf), 3),
        "llamacpp_tok_s": theirs and round(tok_s(theirs), 2),
        "ratio_vs_llamacpp": theirs and round(ratio(first, theirs), 3),
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "weight_mb_per_token": round(llm.target.weight_bytes_per_token / 1e6, 1),
        "roofline_tok_s": round(first.roofline_tok_s, 2),
        "fraction_of_roofline": round(tok_s(first) / first.roofline_tok_s, 3),
        "t1_ms": round(first.verify_ms[0], 2), "verify_curve": curve(first),
        "llamacpp_t1_ms": theirs and round(theirs.verify_ms[0], 2), "llamacpp_verify_curve": theirs and curve(theirs),
        "prefill": {"tokens": PREFILL_TOKENS, "verispec_s": round(first.prefill_s, 4),
                    "llamacpp_s": theirs and round(theirs.prefill_s, 4),
                    "speed_ratio_vs_llamacpp": theirs and round(theirs.prefill_s / first.prefill_s, 3)},
        "llamacpp_parts_from_verispec_at": parts_at,
        "rows": {s.label: {"tok_s": round(tok_s(s), 2), "ratio_vs_llamacpp": theirs and round(ratio(s, theirs), 3),
                           "t1_ms": round(s.verify_ms[0], 2) if s.verify_ms else None,
                           "verify_curve": curve(s) if s.verify_ms else None,
                           "prefill_s": None if s.prefill_s is None else round(s.prefill_s, 4)} for s in systems},
    }))


if __name__ == "__main__":
    main()
