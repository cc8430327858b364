"""Run every prompt through plain decoding and each (drafter, τ), interleaved so drift hits all alike,
in as many rounds as asked; check greedy outputs against plain; aggregate medians per category; price
the runs with the cost model; rate the controller (`auto`) against the best fixed τ in hindsight."""

from __future__ import annotations

import io
import json
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from verispec.benchmark import baselines
from verispec.benchmark.prompts import BenchPrompt
from verispec.config import SamplingParams
from verispec.drafters.base import Drafter
from verispec.engine.calibrate import verify_curve_ms
from verispec.engine.controller import Controller, ControllerConfig
from verispec.engine.cost import CostModel, VerifyCurve
from verispec.engine.diagnose import diagnose
from verispec.engine.request import Request
from verispec.engine.trace import SCHEMA, TraceWriter, parse_trace
from verispec.llm import AUTO, LLM
from verispec.types import Stats

PLAIN = "plain"


@dataclass(frozen=True)
class Config:
    name: str  # "plain", "ngram/4", "transformers", "transformers/prompt-lookup/4", ...
    drafter: str = "none"
    tau: int | str = 0  # or "auto"
    transformers: bool = False


@dataclass
class Run:
    config: str
    category: str
    question_id: str
    tok_s: float
    round: int = 0
    stats: Stats | None = None
    output_ids: list[int] = field(default_factory=list)


def configs_for(drafters: list[str], taus: list[int], with_transformers: bool) -> list[Config]:
    configs = [Config(PLAIN)] + [Config(f"{d}/{t}", d, t) for d in drafters for t in taus]
    if with_transformers:
        fixed = [t for t in taus if t != AUTO] or [4]
        tau = fixed[len(fixed) // 2]
        configs.append(Config("transformers", transformers=True))
        configs += [Config(f"transformers/prompt-lookup/{tau}", "ngram", tau, True) for d in drafters if d == "ngram"]
        configs += [Config(f"transformers/assisted/{tau}", d, tau, True) for d in drafters if d.startswith("draft:")]
    return configs


def run_bench(llm: LLM, prompts: list[BenchPrompt], drafters: list[str], taus: list[int | str], max_tokens: int,
              with_transformers: bool = False, progress: bool = True, rounds: int = 1) -> dict[str, Any]:
    """1. calibrate T(k); 2. warm up; 3. run all configs per prompt, interleaved, `rounds` times;
    4. check; 5. aggregate."""
    configs = configs_for(drafters, taus, with_transformers)
    made: dict[str, Drafter | None] = {d: llm.make_drafter(d) for d in drafters}
    max_tau = max([t for t in taus if t != AUTO] + ([ControllerConfig().max_tau] if AUTO in taus else []))
    curve = verify_curve_ms(llm.target, llm.engine.cache, max_tau + 1)
    verify_ms = {k: round(ms, 4) for k, ms in enumerate(curve, 1)}
    # one controller per drafter, learning across prompts as a server's would, from this calibration
    controllers = {d: Controller(CostModel(VerifyCurve(curve), *llm.drafter_costs(made[d]))) for d in drafters}
    hf = _transformers_models(llm, configs) if with_transformers else {}
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens)
    traces: dict[tuple[str, str], tuple[io.StringIO, TraceWriter]] = {}
    encoded = [llm.encode(p.text, chat=bool(llm.tokenizer.chat_template)) for p in prompts]

    def one(config: Config, prompt: BenchPrompt, ids: list[int], tokens: int, record: bool, round_: int = 0) -> Run:
        if config.transformers:
            model, kwargs = hf[config.name]
            return Run(config.name, prompt.category, prompt.question_id, baselines.decode_tok_s(model, ids, tokens, **kwargs),
                       round_)
        if config.tau == AUTO:
            llm.engine.use(made.get(config.drafter), 0, controllers[config.drafter])
        else:
            llm.engine.use(made.get(config.drafter), int(config.tau))
        request = Request(ids, SamplingParams(max_tokens=tokens, min_tokens=tokens), llm.eos_ids, llm.engine.capacity)
        trace = None
        if record:
            key = (config.name, prompt.category)
            if key not in traces:
                buffer = io.StringIO()
                traces[key] = (buffer, TraceWriter(buffer, model=str(llm.source.folder), drafter=config.drafter,
                                                   num_draft_tokens=config.tau, target_step_ms=verify_ms[1],
                                                   verify_ms=verify_ms))
            else:
                traces[key][1].next_request()
            trace = traces[key][1]
        stats = llm.engine.run(request, config.tau != 0, trace)
        return Run(config.name, prompt.category, prompt.question_id, stats.decode_tokens_per_s, round_, stats,
                   list(request.output_ids))

    for config in configs:  # warm-up: first calls allocate and fill caches
        one(config, prompts[0], encoded[0], 8, record=False)
    runs: list[Run] = []
    jobs = [(r, prompt, ids) for r in range(rounds) for prompt, ids in zip(prompts, encoded)]
    for n, (r, prompt, ids) in enumerate(tqdm(jobs, desc="bench", disable=not progress)):
        # every config takes every place in the order in turn, so a slow spell hits all alike
        order = configs[n % len(configs):] + configs[: n % len(configs)]
        runs += [one(c, prompt, ids, params.max_tokens, True, r) for c in (order if n % 2 == 0 else order[::-1])]
    divergences = _check(llm, runs, encoded, prompts)
    return _aggregate(configs, runs, traces, divergences, verify_ms, max_tokens, taus, drafters)


def _transformers_models(llm: LLM, configs: list[Config]) -> dict[str, tuple[Any, dict[str, Any]]]:
    target = baselines.load_hf(llm.source)
    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    for c in configs:
        if not c.transformers:
            continue
        if c.drafter == "ngram":
            out[c.name] = (target, {"prompt_lookup_num_tokens": c.tau})
        elif c.drafter.startswith("draft:"):
            from verispec import hub

            assistant = baselines.load_hf(hub.resolve(c.drafter[len("draft:"):]))
            out[c.name] = (target, {"assistant_model": assistant, "num_assistant_tokens": c.tau,
                                    "num_assistant_tokens_schedule": "constant"})
        else:
            out[c.name] = (target, {})
    return out


def _check(llm: LLM, runs: list[Run], encoded: list[list[int]], prompts: list[BenchPrompt]) -> list[dict[str, Any]]:
    """Every greedy speculative output must equal plain decoding's; a difference is a correctness
    failure, reported with the first diverging position and the target's logit margin there."""
    plain = {_key(r): r for r in runs if r.config == PLAIN}
    ids_of = {(p.category, p.question_id): ids for p, ids in zip(prompts, encoded)}
    found = []
    for r in runs:
        if r.stats is None or r.config == PLAIN:
            continue
        reference = plain[_key(r)].output_ids
        if r.output_ids != reference:
            pos = next(i for i, (a, b) in enumerate(zip(r.output_ids + [-1], reference + [-1])) if a != b)
            found.append({"config": r.config, "category": r.category, "question_id": r.question_id,
                          "round": r.round, "position": pos, "logit_margin": _margin(llm, ids_of[(r.category, r.question_id)] + reference[:pos])})
    return found


def _margin(llm: LLM, ids: list[int]) -> float:
    """The target's top-1 minus top-2 logit after ids: how near a tie the diverging position was."""
    cache = llm.engine.cache
    cache.truncate(0)
    logits = llm.target.forward(torch.tensor(ids), torch.arange(len(ids)), cache, last_only=True)[0]
    cache.truncate(0)
    top = torch.topk(logits, 2).values
    return round(float(top[0] - top[1]), 6)


def _aggregate(configs: list[Config], runs: list[Run], traces: dict, divergences: list[dict[str, Any]],
               verify_ms: dict[int, float], max_tokens: int, taus: list[int | str], drafters: list[str]
               ) -> dict[str, Any]:
    """Per scope and config: median tok/s, and two speedups over plain decoding: `speedup`, per prompt
    the median over rounds of the ratio to plain decoding in the same round, then the median over
    prompts; `workload_speedup`, all tokens over all time against plain decoding's on the same runs
    (every run decodes max_tokens, so this is the ratio of harmonic means of tok/s)."""
    categories = sorted({r.category for r in runs})
    plain_rate = {(r.category, r.question_id, r.round): r.tok_s for r in runs if r.config == PLAIN}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for scope in categories + ["overall"]:
        table[scope] = {}
        for c in configs:
            mine = [r for r in runs if r.config == c.name and scope in (r.category, "overall")]
            if not mine:
                continue
            by_prompt: dict[tuple[str, str], list[float]] = {}
            for r in mine:
                by_prompt.setdefault((r.category, r.question_id), []).append(r.tok_s / plain_rate[_key(r)])
            row: dict[str, Any] = {
                "tok_s": round(statistics.median(r.tok_s for r in mine), 3),
                "speedup": round(statistics.median(statistics.median(x) for x in by_prompt.values()), 3),
                "workload_speedup": round(statistics.harmonic_mean([r.tok_s for r in mine])
                                          / statistics.harmonic_mean([plain_rate[_key(r)] for r in mine]), 3),
                "prompts": len(by_prompt),
                "runs": len(mine),
            }
            if c.tau != 0 and not c.transformers:
                plain_ms = statistics.median(1e3 / plain_rate[_key(r)] for r in mine)
                row.update(_speculation(mine, [traces[k] for k in traces if k[0] == c.name and scope in (k[1], "overall")],
                                        plain_ms, verify_ms))
                wrong = {(d["category"], d["question_id"], d["round"]) for d in divergences if d["config"] == c.name}
                row["identical"] = sum(1 for r in mine if _key(r) not in wrong)
            table[scope][c.name] = row
    return {"max_tokens": max_tokens, "drafters": drafters, "taus": taus, "verify_ms": verify_ms,
            "categories": table, "controller": _rate_controller(table, drafters, taus), "divergences": divergences,
            "traces": {f"{k[0]}|{k[1]}": buf.getvalue() for k, (buf, _) in traces.items()}}


def _key(run: Run) -> tuple[str, str, int]:
    return run.category, run.question_id, run.round


def _rate_controller(table: dict[str, dict[str, dict[str, Any]]], drafters: list[str], taus: list[int | str]
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    """Per scope and drafter, by both speedups: auto against the best fixed τ in hindsight, τ = 0
    (plain decoding, speedup 1) included, since that is what a useless drafter should fall back to."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for scope, rows in table.items():
        for d in drafters:
            auto = rows.get(f"{d}/{AUTO}")
            fixed = [t for t in taus if t != AUTO and f"{d}/{t}" in rows]
            if auto is None or not fixed:
                continue
            rating = {}
            for measure in ("speedup", "workload_speedup"):
                best, tau = max([(1.0, 0)] + [(rows[f"{d}/{t}"][measure], t) for t in fixed])
                rating[measure] = {"auto": auto[measure], "best_fixed_tau": tau, "best_fixed": best,
                                   "ratio": round(auto[measure] / best, 3)}
            out.setdefault(scope, {})[d] = rating
    return out


def _speculation(runs: list[Run], traces: list[tuple[io.StringIO, TraceWriter]], plain_ms: float,
                 verify_ms: dict[int, float]) -> dict[str, Any]:
    """Totals, and the cost model's prediction: T(1) is the same run's plain decoding time per token,
    T(k) that times the calibrated growth T(k)/T(1)."""
    total = Stats()
    for r in runs:
        s = r.stats
        for name in ("cycles", "drafts", "drafted", "accepted", "decode_s", "draft_s", "verify_s"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
    lines = [line for buf, _ in traces for line in buf.getvalue().splitlines()]
    curve = {str(k): plain_ms * verify_ms[k] / verify_ms[1] for k in sorted(verify_ms)}
    run_line = json.dumps({"type": "run", "schema": SCHEMA, "target_step_ms": plain_ms, "verify_ms": curve})
    report = diagnose(parse_trace([run_line] + [line for line in lines if '"type": "cycle"' in line]))
    return {
        "acceptance": round(total.acceptance_rate, 4),
        "mean_accepted_length": round(total.mean_accepted_length, 3),
        "tokens_per_cycle": round(total.tokens_per_cycle, 3),
        "conditional_acceptance": report.conditional_acceptance,
        "time_split": {"draft": round(total.draft_s / total.decode_s, 4), "verify": round(total.verify_s / total.decode_s, 4),
                       "other": round(1 - (total.draft_s + total.verify_s) / total.decode_s, 4)},
        "predicted_speedup": report.predicted_speedup,
    }
