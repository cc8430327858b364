"""Structured output with speculation against plain constrained decoding (issue 17's targets: >= 1.3x
on the extraction workload; the grammar's masks <= 5 % of a step).

    python benchmarks/structured.py --drafters ngram,suffix --prompts 20 --rounds 2

The workload is verispec/data/repetitive.jsonl's extraction-json prompts (the same six keys asked of
different passages), each answered under their JSON schema, greedy. Per round and prompt the
configurations run interleaved: plain constrained decoding, then each drafter (τ auto). The speedup
is total plain decode time over total speculative decode time; every output must validate and equal
plain decoding's. The grammar's share is the time in Grammar.fit and Grammar.masks over decode time.
Prints a table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema

from verispec.benchmark.prompts import load_prompts
from verispec.config import RuntimeConfig, SamplingParams
from verispec.llm import LLM
from verispec.sampling.grammar import Grammar

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "founded", "city", "employees", "product", "ceo"],
          "properties": {"name": {"type": "string"}, "founded": {"type": "integer"}, "city": {"type": "string"},
                         "employees": {"type": "integer"}, "product": {"type": "string"}, "ceo": {"type": "string"}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "company", "schema": SCHEMA}}


class Clock:
    """Seconds spent in the grammar's methods (wrapped once)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in ("fit", "masks"):
            method = getattr(Grammar, name)
            setattr(Grammar, name, self._timed(method))

    def _timed(self, method):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--drafters", default="ngram,suffix")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(args.model, RuntimeConfig(threads=args.threads), num_draft_tokens="auto")
    prompts = [p for p in load_prompts("repetitive") if p.category == "extraction-json"][: args.prompts]
    configs = ["plain"] + args.drafters.split(",")
    drafters = {name: llm.make_drafter(name) for name in configs[1:]}  # one each: the suffix tree learns
    params = SamplingParams(max_tokens=args.max_tokens, response_format=FORMAT)
    clock = Clock()
    decode = {c: 0.0 for c in configs}
    grammar = {c: 0.0 for c in configs}
    tokens = {c: 0 for c in configs}
    valid = {c: 0 for c in configs}
    identical = {c: 0 for c in configs[1:]}
    runs = 0
    for r in range(args.rounds + 1):  # round 0 warms up
        for p in prompts:
            outputs = {}
            for config in configs:
                llm.engine.use(drafters.get(config), 0, llm.new_controller() if config != "plain" else None)
                before = clock.seconds
                out = llm.generate(p.text, params, chat=p.chat, speculative=config != "plain")
                outputs[config] = out
                if r == 0:
                    continue
                decode[config] += out.stats.decode_s
                grammar[config] += clock.seconds - before
                tokens[config] += len(out.token_ids)
                try:
                    jsonschema.validate(json.loads(out.text), SCHEMA)
                    valid[config] += 1
                except (json.JSONDecodeError, jsonschema.ValidationError):
                    pass
            if r > 0:
                runs += 1
                for config in configs[1:]:
                    identical[config] += outputs[config].token_ids == outputs["plain"].token_ids
    result = {}
    print(f"{'config':8} {'tok/s':>7} {'speedup':>8} {'grammar %':>10} {'valid':>7} {'identical':>10}")
    for config in configs:
        row = {"tok_s": round(tokens[config] / decode[config], 1),
               "speedup": round(decode["plain"] / decode[config], 3),
               "grammar_share": round(grammar[config] / decode[config], 4),
               "valid": f"{valid[config]}/{runs}"}
        if config != "plain":
            row["identical"] = f"{identical[config]}/{runs}"
        result[config] = row
        print(f"{config:8} {row['tok_s']:7.1f} {row['speedup']:8.3f} {100 * row['grammar_share']:9.2f}% "
              f"{row['valid']:>7} {row.get('identical', '-'):>10}")
    print(json.dumps({"prompts": len(prompts), "rounds": args.rounds, "max_tokens": args.max_tokens,
                      "results": result}))


if __name__ == "__main__":
    main()
