"""Run every prompt through plain decoding and each (drafter, τ), interleaved so drift hits all alike,
in as many rounds as asked; check greedy outputs against plain; aggregate medians per category; price
the runs with the cost model; rate the controller (`auto`) against the best fixed τ in hindsight."""

from __future__ import annotations

import io
import json
import statistics
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from verispec.benchmark import baselines
from verispec.benchmark.llamacpp import LlamaCpp
from verispec.benchmark.prompts import BenchPrompt
from verispec.config import SamplingParams
from verispec.drafters.base import Drafter, learns_across_requests
from verispec.engine.calibrate import verify_curve_ms
from verispec.engine.controller import Controller, ControllerConfig
from verispec.engine.cost import CostModel, VerifyCurve
from verispec.engine.diagnose import diagnose
from verispec.engine.request import Request
from verispec.errors import InvalidInputError
from verispec.engine.score import logit_margin
from verispec.engine.trace import SCHEMA, TraceWriter, parse_trace
from verispec.llm import AUTO, LLM
from verispec.types import Stats

PLAIN = "plain"
LLAMACPP = "llamacpp"
BASELINES = (PLAIN, "transformers", LLAMACPP)  # what --baselines may name
# another system's decoding on (prompt ids, new tokens) -> (decode tok/s, output ids or None)
ExternalDecode = Callable[[list[int], int], tuple[float, list[int] | None]]


@dataclass(frozen=True)
class Config:
    name: str  # "plain", "ngram/4", "transformers", "transformers/prompt-lookup/4", "llamacpp", ...
    drafter: str = "none"
    tau: int | str = 0  # or "auto"
    external: bool = False  # run by another system (transformers, llama.cpp), not by our engine


@dataclass
class Run:
    config: str
    category: str
    question_id: str
    tok_s: float
    round: int = 0
    stats: Stats | None = None
    output_ids: list[int] = field(default_factory=list)


def configs_for(drafters: list[str], taus: list[int | str], baselines: Collection[str] = (PLAIN,)) -> list[Config]:
    configs = [Config(PLAIN)] + [Config(f"{d}/{t}", d, t) for d in drafters for t in taus]
    if "transformers" in baselines:
        fixed = [t for t in taus if t != AUTO] or [4]
        tau = fixed[len(fixed) // 2]
        configs.append(Config("transformers", external=True))
        configs += [Config(f"transformers/prompt-lookup/{tau}", "ngram", tau, True) for d in drafters if d == "ngram"]
        configs += [Config(f"transformers/assisted/{tau}", d, tau, True) for d in drafters if d.startswith("draft:")]
    if LLAMACPP in baselines:
        configs.append(Config(LLAMACPP, external=True))
    return configs


def run_bench(llm: LLM, prompts: list[BenchPrompt], drafters: list[str], taus: list[int | str], max_tokens: int,
              baselines: Collection[str] = (PLAIN,), progress: bool = True, rounds: int = 1,
              temperature: float = 0.0) -> dict[str, Any]:
    """1. calibrate T(k); 2. warm up; 3. run all configs per prompt, interleaved, `rounds` times;
    4. check; 5. aggregate. baselines: besides plain decoding, "transformers" (its generate: plain,
    prompt lookup, assisted) and "llamacpp" (llama.cpp's plain decoding on the same GGUF), both
    greedy. temperature > 0 samples (a seed per prompt and round, the same for every config): the
    outputs then differ by design and are not compared token by token."""
    if temperature > 0 and set(baselines) - {PLAIN}:
        raise InvalidInputError(f"temperature={temperature} compares sampled decoding with our plain decoding only; "
                                f"the baselines {sorted(set(baselines) - {PLAIN})} decode greedily", param="temperature")
    configs = configs_for(drafters, taus, baselines)
    encoded = [llm.encode(p.text, chat=p.chat and bool(llm.tokenizer.chat_template)) for p in prompts]
    # llama.cpp on the same GGUF and threads, with room for the longest prompt (loaded first: a model
    # it cannot open fails before any timing)
    llamacpp = (LlamaCpp(llm.source, torch.get_num_threads(), n_ctx=max(2048, max(map(len, encoded)) + max_tokens))
                if LLAMACPP in baselines else None)
    made: dict[str, Drafter | None] = {d: llm.make_drafter(d) for d in drafters}
    max_tau = max([t for t in taus if t != AUTO] + ([ControllerConfig().max_tau] if AUTO in taus else []))
    curve = verify_curve_ms(llm.target, llm.engine.cache, max_tau + 1)
    verify_ms = {k: round(ms, 4) for k, ms in enumerate(curve, 1)}
    # one controller per drafter, learning across prompts as a server's would, from this calibration
    overhead = llm.overhead_ms()
    controllers = {d: Controller(CostModel(VerifyCurve(curve), *llm.drafter_costs(made[d]), overhead))
                   for d in drafters}
    llamacpp_verify_ms = {} if llamacpp is None else {
        k: round(ms, 4) for k, ms in enumerate(llamacpp.verify_curve_ms(max_tau + 1), 1)}
    external = _external_decoders(llm, configs, llamacpp)
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens)
    traces: dict[tuple[str, str], tuple[io.StringIO, TraceWriter]] = {}
    learning: dict[tuple[str, int], Drafter | None] = {}

    def drafter_of(config: Config, round_: int) -> Drafter | None:
        """A drafter that learns from past outputs (suffix) learns once per config and round, from
        the prompts before this one in file order: no config reads the answer another config, an
        earlier round or the warm-up (round -1) gave to the same prompt."""
        drafter = made.get(config.drafter)
        if not learns_across_requests(drafter):
            return drafter
        if (config.name, round_) not in learning:
            learning[config.name, round_] = llm.make_drafter(config.drafter)
        return learning[config.name, round_]

    def one(config: Config, prompt: BenchPrompt, ids: list[int], tokens: int, record: bool, round_: int) -> Run:
        if config.external:
            tok_s, output_ids = external[config.name](ids, tokens)
            return Run(config.name, prompt.category, prompt.question_id, tok_s, round_, None, output_ids or [])
        drafter = drafter_of(config, round_)
        if config.tau == AUTO:
            llm.engine.use(drafter, 0, controllers[config.drafter])
        else:
            llm.engine.use(drafter, int(config.tau))
        seed = zlib.crc32(f"{prompt.category}|{prompt.question_id}|{round_}".encode())
        request = Request(ids, SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=temperature, seed=seed),
                          llm.eos_ids, llm.engine.capacity)
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
        one(config, prompts[0], encoded[0], 8, False, -1)
    runs: list[Run] = []
    jobs = [(r, prompt, ids) for r in range(rounds) for prompt, ids in zip(prompts, encoded)]
    for n, (r, prompt, ids) in enumerate(tqdm(jobs, desc="bench", disable=not progress)):
        # every config takes every place in the order in turn, so a slow spell hits all alike
        order = configs[n % len(configs):] + configs[: n % len(configs)]
        runs += [one(c, prompt, ids, params.max_tokens, True, r) for c in (order if n % 2 == 0 else order[::-1])]
    divergences = _check(llm, runs, encoded, prompts) if temperature == 0 else []
    result = _aggregate(configs, runs, traces, divergences, verify_ms, max_tokens, taus, drafters, temperature == 0)
    result["temperature"] = temperature
    if llamacpp is not None:
        result["llamacpp_verify_ms"] = llamacpp_verify_ms
        llamacpp.close()
    return result


def _external_decoders(llm: LLM, configs: list[Config], llamacpp: LlamaCpp | None) -> dict[str, ExternalDecode]:
    """Per external config, its decoding on the same prompt ids (models loaded once, here)."""
    out: dict[str, ExternalDecode] = {}
    if llamacpp is not None:
        out[LLAMACPP] = llamacpp.decode
    hf_configs = [c for c in configs if c.external and c.name != LLAMACPP]
    target = baselines.load_hf(llm.source) if hf_configs else None
    for c in hf_configs:
        kwargs: dict[str, Any] = {}
        if c.drafter == "ngram":
            kwargs = {"prompt_lookup_num_tokens": c.tau}
        elif c.drafter.startswith("draft:"):
            from verispec import hub

            kwargs = {"assistant_model": baselines.load_hf(hub.resolve(c.drafter[len("draft:"):])),
                      "num_assistant_tokens": c.tau, "num_assistant_tokens_schedule": "constant"}
        out[c.name] = lambda ids, tokens, kwargs=kwargs: (baselines.decode_tok_s(target, ids, tokens, **kwargs), None)
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
            pos = first_difference(r.output_ids, reference)
            found.append({"config": r.config, "category": r.category, "question_id": r.question_id,
                          "round": r.round, "position": pos, "logit_margin": logit_margin(llm.target, ids_of[(r.category, r.question_id)] + reference[:pos])})
    return found


def _aggregate(configs: list[Config], runs: list[Run], traces: dict, divergences: list[dict[str, Any]],
               verify_ms: dict[int, float], max_tokens: int, taus: list[int | str], drafters: list[str],
               greedy: bool = True) -> dict[str, Any]:
    """Per scope and config: median tok/s, and two speedups over plain decoding: `speedup`, per prompt
    the median over rounds of the ratio to plain decoding in the same round, then the median over
    prompts; `workload_speedup`, all tokens over all time against plain decoding's on the same runs
    (every run decodes max_tokens, so this is the ratio of harmonic means of tok/s). With llama.cpp
    among the configs, `vs_llamacpp` is the first ratio against its plain decoding instead."""
    categories = sorted({r.category for r in runs})
    plain_rate = {_key(r): r.tok_s for r in runs if r.config == PLAIN}
    llamacpp_rate = {_key(r): r.tok_s for r in runs if r.config == LLAMACPP}
    plain_ids = {_key(r): r.output_ids for r in runs if r.config == PLAIN}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for scope in categories + ["overall"]:
        table[scope] = {}
        for c in configs:
            mine = [r for r in runs if r.config == c.name and scope in (r.category, "overall")]
            if not mine:
                continue
            row: dict[str, Any] = {
                "tok_s": round(statistics.median(r.tok_s for r in mine), 3),
                "speedup": _median_ratio(mine, plain_rate),
                "workload_speedup": round(statistics.harmonic_mean([r.tok_s for r in mine])
                                          / statistics.harmonic_mean([plain_rate[_key(r)] for r in mine]), 3),
                "prompts": len({(r.category, r.question_id) for r in mine}),
                "runs": len(mine),
            }
            if llamacpp_rate:
                row["vs_llamacpp"] = _median_ratio(mine, llamacpp_rate)
            if c.name == LLAMACPP:
                row["parts_from_plain_at"] = statistics.median(first_difference(r.output_ids, plain_ids[_key(r)])
                                                               for r in mine)
            if c.tau != 0 and not c.external:
                plain_ms = statistics.median(1e3 / plain_rate[_key(r)] for r in mine)
                row.update(_speculation(mine, [traces[k] for k in traces if k[0] == c.name and scope in (k[1], "overall")],
                                        plain_ms, verify_ms))
                wrong = {(d["category"], d["question_id"], d["round"]) for d in divergences if d["config"] == c.name}
                row["identical"] = sum(1 for r in mine if _key(r) not in wrong) if greedy else None
            table[scope][c.name] = row
    return {"max_tokens": max_tokens, "drafters": drafters, "taus": taus, "verify_ms": verify_ms,
            "categories": table, "controller": _rate_controller(table, drafters, taus), "divergences": divergences,
            "traces": {f"{k[0]}|{k[1]}": buf.getvalue() for k, (buf, _) in traces.items()}}


def _key(run: Run) -> tuple[str, str, int]:
    return run.category, run.question_id, run.round


def _median_ratio(runs: list[Run], reference_rate: dict[tuple[str, str, int], float]) -> float:
    """Per prompt the median over rounds of tok/s over the reference's in the same round, then the
    median over prompts."""
    by_prompt: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        by_prompt.setdefault((r.category, r.question_id), []).append(r.tok_s / reference_rate[_key(r)])
    return round(statistics.median(statistics.median(x) for x in by_prompt.values()), 3)


def first_difference(a: list[int], b: list[int]) -> int:
    """The first position where two outputs differ (the shorter length when one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
        for name in ("cycles", "drafts", "drafted", "accepted", "nodes", "decode_s", "draft_s", "verify_s",
                     "forward_s"):
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
        "mean_nodes": round(total.mean_nodes, 3),
        **({"tokens_by_budget": report.tokens_by_budget} if report.tree else {}),
        "time_split": {"draft": round(total.draft_s / total.decode_s, 4), "verify": round(total.verify_s / total.decode_s, 4),
                       "forward": round(total.forward_s / total.decode_s, 4),  # the target's, inside verify
                       "other": round(1 - (total.draft_s + total.verify_s) / total.decode_s, 4)},
        "predicted_speedup": report.predicted_speedup,
    }
