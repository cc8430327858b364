"""The controller against every fixed τ, priced by the cost model instead of timed (noise-free).

For each Spec-Bench prompt the target's greedy output is generated once; then every fixed τ and
the controller (one for all prompts, learning across them as a server's slot would; with
--per-request a new one for each, as a one-off `verispec generate`) replay their cycles on it with
the drafter (verispec/benchmark/replay.py; a suffix drafter learns from the outputs before, in
order, one per policy), priced by a verify curve measured here.
The controller sees the curve's times with multiplicative noise (--noise, default 10 %, this
machine's spread). Prints per category the speedups (the workload's: all tokens over all time, and
the median over prompts), auto / the best fixed τ in hindsight by both, and a last JSON line.

    python benchmarks/controller_replay.py [--categories summarization,rag] [--per-category 3]
        [--max-tokens 256] [--drafter ngram|ngram-tree|suffix|suffix-tree] [--per-request]
        [--noise 0.1] [--set decay=0.95 ...] [--outputs FILE]

--outputs keeps the generated outputs and the curve in FILE (made on the first run, read on later
ones), so that controller settings can be compared on the same cases in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from verispec import hub
from verispec.benchmark.prompts import load_prompts
from verispec.benchmark.replay import Replayed, replay
from verispec.config import RuntimeConfig, SamplingParams
from verispec.drafters.base import Drafter, finish
from verispec.drafters.ngram import NgramDrafter
from verispec.drafters.suffix import BUDGET, History, SuffixDrafter
from verispec.engine.calibrate import verify_curve_ms
from verispec.engine.controller import Controller, ControllerConfig
from verispec.engine.cost import CostModel, VerifyCurve
from verispec.llm import LLM
from verispec.sampling import Sampler

NGRAM_MS = 0.002  # the n-gram drafter's cost per token (verispec calibrate: ~0.001 ms); suffix's alike here


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=hub.DEFAULT_MODEL)
    ap.add_argument("--categories", default=None)
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--taus", default="1,2,3,4,5,6,8")
    ap.add_argument("--drafter", default="ngram", choices=["ngram", "ngram-tree", "suffix", "suffix-tree"])
    ap.add_argument("--per-request", action="store_true", help="a new controller for every prompt")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--set", nargs="*", default=[], help="ControllerConfig fields, e.g. decay=0.95")
    ap.add_argument("--outputs", type=Path, default=None, help="a JSON file keeping the outputs and the curve")
    args = ap.parse_args()
    config = ControllerConfig(**{k: type(getattr(ControllerConfig(), k))(v) for k, v in (s.split("=") for s in args.set)})

    if args.outputs is not None and args.outputs.exists():
        kept = json.loads(args.outputs.read_text())
        curve, cases, eos_ids = kept["verify_ms"], kept["cases"], kept["eos_ids"]
    else:
        curve, cases, eos_ids = generate_cases(args)
        if args.outputs is not None:
            args.outputs.write_text(json.dumps({"verify_ms": curve, "cases": cases, "eos_ids": eos_ids}))
    model = CostModel(VerifyCurve(tuple(curve)), NGRAM_MS)
    params = SamplingParams(max_tokens=args.max_tokens)

    taus = [int(t) for t in args.taus.split(",")]
    policies: dict[str, int | Controller] = {f"tau {t}": t for t in taus} | {"auto": Controller(model, config)}
    drafters = {name: make_drafter(args.drafter) for name in policies}  # a suffix drafter's History each
    runs: list[tuple[str, str, Replayed]] = []  # (category, policy, replayed)
    for i, (category, ids, out) in enumerate(cases):
        sampler = Sampler(params, ids, eos_ids)
        if args.per_request:
            policies["auto"] = Controller(model, config)
        for name, policy in policies.items():
            runs.append((category, name, replay(drafters[name], sampler, ids, out, policy, model, args.noise, seed=i)))
            finish(drafters[name], out)

    result: dict[str, dict[str, dict[str, float]]] = {}
    print("speedup over plain decoding: the workload's (all tokens / all time) and the median over prompts")
    for scope in sorted({c for c, _, _ in cases}) + ["overall"]:
        mine = [(policy, r) for c, policy, r in runs if scope in (c, "overall")]
        rows = {}
        for policy in [f"tau {t}" for t in taus] + ["auto"]:
            done = [r for p, r in mine if p == policy]
            rows[policy] = {"workload": sum(r.plain_ms for r in done) / sum(r.ms for r in done),
                            "median": statistics.median(r.speedup for r in done)}
        rating = {}
        for measure in ("workload", "median"):
            best_name, best = max([("plain", 1.0)] + [(n, x[measure]) for n, x in rows.items() if n != "auto"],
                                  key=lambda nx: nx[1])
            rating[measure] = {"best_fixed": best_name, "auto_vs_best": round(rows["auto"][measure] / best, 3)}
        result[scope] = {"speedups": {n: {m: round(v, 3) for m, v in x.items()} for n, x in rows.items()},
                         "auto_vs_best": rating}
        print(f"{scope:15} " + " ".join(f"{n} {x['workload']:.2f}x" for n, x in rows.items())
              + " | auto / best fixed: " + ", ".join(f"{m} {r['auto_vs_best']:.3f} ({r['best_fixed']})"
                                                     for m, r in rating.items()))
    print(json.dumps({"verify_ms": [round(x, 2) for x in model.curve.ms], "noise": args.noise,
                      "drafter": args.drafter, "per_request": args.per_request,
                      "controller": dataclasses.asdict(config), "categories": result}))


def make_drafter(kind: str) -> Drafter:
    tree = kind.endswith("-tree")
    return SuffixDrafter(History(BUDGET), tree=tree) if kind.startswith("suffix") else NgramDrafter(tree=tree)


def generate_cases(args: argparse.Namespace) -> tuple[list[float], list[tuple[str, list[int], list[int]]], list[int]]:
    """T(1..9) measured here, and (category, prompt ids, the target's greedy output) per prompt."""
    llm = LLM(args.model, RuntimeConfig(threads=2, max_context=4096), drafter="ngram", num_draft_tokens=4)
    prompts = load_prompts("spec-bench", args.categories.split(",") if args.categories else None, args.per_category)
    curve = list(verify_curve_ms(llm.target, llm.engine.cache, ControllerConfig().max_tau + 1))
    params = SamplingParams(max_tokens=args.max_tokens)
    cases = []
    for p in prompts:  # generated speculatively: greedy, so the same tokens as plain decoding, faster
        ids = llm.encode(p.text, chat=True)
        cases.append((p.category, ids, llm.generate(ids, params).token_ids))
    return curve, cases, list(llm.eos_ids)


if __name__ == "__main__":
    main()
