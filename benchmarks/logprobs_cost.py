"""What logprobs cost: decoding with and without `logprobs` on the same prompts, interleaved, for plain
decoding and ngram speculation (issue 17's target: <= 3 % of decode time).

    python benchmarks/logprobs_cost.py --logprobs 5 --rounds 3

Prints per config the median decode time ratio (with / without) and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics

from verispec.benchmark.prompts import load_prompts
from verispec.config import RuntimeConfig, SamplingParams
from verispec.llm import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(args.model, RuntimeConfig(threads=args.threads))
    prompts = [p.text for p in load_prompts("spec-bench", ["summarization", "qa", "writing", "coding"], 1)]
    ratios: dict[str, list[float]] = {"plain": [], "ngram/4": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        for text in prompts:
            for config, found in ratios.items():
                drafter = llm.make_drafter("ngram") if config != "plain" else None
                llm.engine.use(drafter, 4 if drafter else 0)
                seconds = []
                for lp in ((None, args.logprobs) if r % 2 else (args.logprobs, None)):
                    params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.max_tokens,
                                            temperature=args.temperature, seed=1, logprobs=lp)
                    stats = llm.generate(text, params, chat=True, speculative=drafter is not None).stats
                    seconds.append((lp is not None, stats.decode_s))
                if r > 0:
                    with_, without = (dict(seconds)[True], dict(seconds)[False])
                    found.append(with_ / without)
    result = {c: round(statistics.median(x), 4) for c, x in ratios.items()}
    for c, x in result.items():
        print(f"{c:10} decode time with logprobs={args.logprobs} / without: {x:.3f} (median of {len(ratios[c])})")
    print(json.dumps({"logprobs": args.logprobs, "temperature": args.temperature, "ratio": result}))


if __name__ == "__main__":
    main()
