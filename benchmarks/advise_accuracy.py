"""Is `verispec advise` right, and is it cheap? Two measurements in one run (issue 16's targets):

1. cost: plain decoding of N prompts one at a time (prefill included, wall clock), then `advise`
   over the same prompts; the ratio of the two (target: <= 1.5);
2. accuracy, per Spec-Bench category: advise's ranking from `--train` prompts of the category (as
   many as it has beside the test ones), then
   its best two configurations and plain decoding measured on `--test` other prompts of it (held
   out), interleaved over rounds; per category the prediction against the measurement (target:
   within 10 %) and the top choice's measured speedup against the best measured (within 5 %).

    python benchmarks/advise_accuracy.py --prompts 100 --train 20 --test 4 --rounds 2

Prints a table per part and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

from verispec.benchmark import advise as adv
from verispec.benchmark.prompts import load_prompts
from verispec.config import RuntimeConfig, SamplingParams
from verispec.engine.cost import CostModel
from verispec.llm import LLM


def spread(prompts, n):
    """n prompts, the categories taken in turn."""
    return [prompts[i] for i in adv.sample_of(prompts, n)]


def cost(llm: LLM, prompts, drafters, max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    for p in prompts:
        llm.generate(p.text, params, chat=True, speculative=False)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    adv.advise(llm, prompts, drafters, max_tokens, progress=False)
    advise_s = time.perf_counter() - start
    return {"prompts": len(prompts), "plain_s": round(plain_s, 1), "advise_s": round(advise_s, 1),
            "ratio": round(advise_s / plain_s, 3)}


def accuracy(llm: LLM, prompts, drafters, category: str, train: int, test: int, max_tokens: int, rounds: int
             ) -> dict:
    mine = [p for p in prompts if p.category == category][: train + test]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ids = [llm.encode(p.text, chat=True) for p in mine]
    outputs = adv.decode_all(llm, ids, params, progress=False)
    curves = adv.context_curve(llm, max(len(a) + len(b) for a, b in zip(ids, outputs)))
    make = adv.Drafters(llm)
    overhead = llm.overhead_ms()
    models = {d: CostModel(curves.short, *llm.drafter_costs(make(d)), overhead) for d in drafters}
    priced = [p for d in drafters for p in adv.price(llm, make, d, adv.TAUS, models[d], curves, ids, outputs)]
    fit, held_out = list(range(len(mine) - test)), list(range(len(mine) - test, len(mine)))  # small categories: fewer to fit
    priced.sort(key=lambda p: -p.speedup(fit))
    measured = adv.measure(llm, make, priced[:2], models, ids, outputs, held_out, params, rounds, progress=False)
    top = priced[0]
    best = max(m["measured"] for m in measured.values())
    return {"category": category, "top": top.name, "predicted": round(top.speedup(fit), 3),
            "predicted_held_out": measured[top.name]["predicted"], "measured": measured[top.name]["measured"],
            "error": round(top.speedup(fit) / measured[top.name]["measured"] - 1, 3),
            "top_vs_best_measured": round(measured[top.name]["measured"] / best, 3),
            "second": priced[1].name, "second_measured": measured[priced[1].name]["measured"],
            "identical": all(m["identical"] == m["runs"] for m in measured.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--drafters", default="ngram,suffix")
    ap.add_argument("--prompts", type=int, default=100, help="prompts of the cost measurement (0: skip it)")
    ap.add_argument("--train", type=int, default=20)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--categories", default=None, help="comma-separated (default: every Spec-Bench category)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(args.model, RuntimeConfig(threads=args.threads))
    drafters = args.drafters.split(",")
    bench = load_prompts("spec-bench")
    result: dict = {}
    if args.prompts:
        result["cost"] = cost(llm, spread(bench, args.prompts), drafters, args.max_tokens)
        c = result["cost"]
        print(f"cost: plain decoding of {c['prompts']} prompts {c['plain_s']} s, advise {c['advise_s']} s: "
              f"{c['ratio']:.2f}x")
    categories = args.categories.split(",") if args.categories else sorted({p.category for p in bench})
    rows = [accuracy(llm, bench, drafters, c, args.train, args.test, args.max_tokens, args.rounds) for c in categories]
    print(f"{'category':15} {'top':12} {'predicted':>9} {'held-out':>9} {'measured':>9} {'error':>6} "
          f"{'top/best':>8} {'second':12} {'measured':>8}")
    for r in rows:
        print(f"{r['category']:15} {r['top']:12} {r['predicted']:8.2f}x {r['predicted_held_out']:8.2f}x "
              f"{r['measured']:8.2f}x {r['error']:+6.0%} {r['top_vs_best_measured']:8.2f} {r['second']:12} "
              f"{r['second_measured']:7.2f}x" + ("" if r["identical"] else "  OUTPUTS DIFFER"))
    result["accuracy"] = rows
    result["within_10_percent"] = sum(abs(r["error"]) <= 0.10 for r in rows)
    result["top_within_5_percent"] = sum(r["top_vs_best_measured"] >= 0.95 for r in rows)
    print(f"prediction within 10 % in {result['within_10_percent']}/{len(rows)} categories; top choice within 5 % "
          f"of the best measured in {result['top_within_5_percent']}/{len(rows)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
