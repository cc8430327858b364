"""How far int8 activations part from exact ones: on Spec-Bench prompts, the first position where the
greedy outputs differ, and the top-1 agreement per position when int8 reads exact's output (teacher
forcing, so one early difference does not hide the rest). Prints a table; the last line is one JSON object.

    python benchmarks/int8_divergence.py [--model smollm2-135m-instruct] [--per-category 1] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from verispec import hub
from verispec.benchmark.prompts import load_prompts
from verispec.config import RuntimeConfig, SamplingParams
from verispec.llm import LLM


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def top1_agreement(exact: LLM, int8: LLM, prompt: list[int], output: list[int]) -> list[bool]:
    """Per output position: does int8's argmax, reading prompt + exact's output, equal exact's token?"""
    ids = torch.tensor(prompt + output[:-1])
    rows = int8.target.forward(ids, torch.arange(len(ids)), int8.target.new_cache())[len(prompt) - 1:]
    return (rows.argmax(-1) == torch.tensor(output)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=hub.DEFAULT_MODEL)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    exact = LLM(args.model, RuntimeConfig(threads=args.threads, max_context=4096, backend="native"))
    int8 = LLM(args.model, RuntimeConfig(threads=args.threads, max_context=4096, backend="native",
                                         activations="int8"))
    chat = bool(exact.tokenizer.chat_template)
    params = SamplingParams(max_tokens=args.tokens, min_tokens=args.tokens)
    rows = []
    for p in load_prompts("spec-bench", per_category=args.per_category):
        ids = exact.encode(p.text, chat=chat)
        a, b = exact.generate(ids, params).token_ids, int8.generate(ids, params).token_ids
        agree = top1_agreement(exact, int8, ids, a)
        rows.append({"category": p.category, "question_id": p.question_id, "first_difference": first_difference(a, b),
                     "top1_agreement": round(sum(agree) / len(agree), 4)})
        print(f"{p.category:16s} {p.question_id:>5s}  first difference at {rows[-1]['first_difference']}  "
              f"top-1 agreement {rows[-1]['top1_agreement']:.3f}")
    same = sum(r["first_difference"] is None for r in rows)
    agreement = statistics.mean(r["top1_agreement"] for r in rows)
    print(f"{same} of {len(rows)} outputs identical; mean top-1 agreement {agreement:.4f}")
    print(json.dumps({"model": args.model, "tokens": args.tokens, "identical": same, "prompts": len(rows),
                      "mean_top1_agreement": round(agreement, 4), "rows": rows}))


if __name__ == "__main__":
    main()
