"""`verispec advise`: will speculation pay on this traffic, with which drafter and τ?

1. The target decodes every prompt once, greedy and batched: its outputs fix what every drafter and
   τ policy would commit (greedy speculation gives the target's own tokens).
2. Every (drafter, τ), and each drafter's controller (`auto`), is replayed over those outputs
   (benchmark/replay.py) and priced by this machine's verify curve, timed after a short and a long
   context, and the drafter's own cost: no target forward per configuration.
3. The two best configurations and plain decoding are measured for real on a sample of the prompts,
   interleaved, so the report shows the prediction beside the measurement: the cost model's error.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm import tqdm

from verispec.benchmark.prompts import BenchPrompt
from verispec.benchmark.replay import Replayed, replay
from verispec.config import SamplingParams
from verispec.drafters.base import Drafter, feature_layers, finish
from verispec.engine.calibrate import forward_timer, paired_times_ms, warm_up
from verispec.engine.controller import Controller
from verispec.engine.cost import (
    ContextCurve,
    CostModel,
    VerifyCurve,
    conditional_acceptance,
    offered_by_position,
)
from verispec.engine.generate import Sequence as Running
from verispec.engine.generate import step
from verispec.engine.request import Request
from verispec.llm import AUTO, LLM, MAX_DRAFT_TOKENS

TAUS: tuple[int | str, ...] = (1, 2, 3, 4, 6, 8, 10, 12, 15, AUTO)
PAYS = 1.05  # a predicted speedup below this is not worth the drafter's memory and complexity
AIM = 1.5  # the speedup each drafter's needed acceptance is quoted for
SHORT_CONTEXT = 128


@dataclass
class Priced:
    """One configuration replayed over every prompt."""

    drafter: str
    tau: int | str
    replays: list[Replayed] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.drafter}/{self.tau}"

    def speedup(self, among: Sequence[int] | None = None) -> float:
        """Plain decoding's priced time over this configuration's, on the prompts `among` (all by default)."""
        done = self.replays if among is None else [self.replays[i] for i in among]
        return sum(r.plain_ms for r in done) / sum(r.ms for r in done)

    @property
    def acceptance(self) -> float:
        drafted = sum(r.drafted for r in self.replays)
        return sum(r.accepted for r in self.replays) / drafted if drafted else 0.0


def decode_all(llm: LLM, prompt_ids: list[list[int]], params: SamplingParams | list[SamplingParams],
               batch: int = 8, progress: bool = True) -> list[list[int]]:
    """Every prompt's plain output (params: one for all, or one per prompt, e.g. seeds), `batch`
    sequences per forward (rows are invariant, so batching does not change a token); caches as
    long as the longest prompt needs."""
    each = params if isinstance(params, list) else [params] * len(prompt_ids)
    capacity = max(map(len, prompt_ids)) + max(p.max_tokens for p in each) + 1
    caches = [llm.target.new_cache(capacity) for _ in range(min(batch, len(prompt_ids)))]
    todo = deque(enumerate(prompt_ids))
    running: dict[int, tuple[int, Running]] = {}  # cache index -> (prompt index, its sequence)
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    with tqdm(total=len(prompt_ids), desc="target", disable=not progress) as bar:
        while todo or running:
            for c, cache in enumerate(caches):
                if c not in running and todo:
                    i, ids = todo.popleft()
                    running[c] = (i, Running(Request(ids, each[i], llm.eos_ids, cache.capacity), cache))
            step(llm.target, [s for _, s in running.values()])
            for c, (i, s) in list(running.items()):
                if s.request.finished:
                    outputs[i] = list(s.request.output_ids)
                    del running[c]
                    bar.update()
    return outputs


def context_curve(llm: LLM, longest: int, repeats: int = 7) -> ContextCurve:
    """T(k), k = 1..16, after SHORT_CONTEXT cached tokens and after `longest` (the traffic's longest
    prompt and output, within the context), the two timed in the same rounds (paired_times_ms), each
    in a cache of its own: a slow spell of a shared machine timed apart once read a long context as
    no dearer than a short one."""
    warm_up(llm.target, llm.engine.cache)
    ks = range(1, MAX_DRAFT_TOKENS + 2)
    long_context = min(max(longest, 2 * SHORT_CONTEXT), llm.engine.capacity - len(ks))
    short_context = min(SHORT_CONTEXT, long_context // 2)  # a small model's context may hold less
    short_cache, long_cache = llm.target.new_cache(short_context + len(ks)), llm.engine.cache
    try:
        short, long = (VerifyCurve(tuple(ms)) for ms in paired_times_ms(
            [forward_timer(llm.target, short_cache, short_context), forward_timer(llm.target, long_cache, long_context)],
            ks, repeats))
    finally:
        long_cache.truncate(0)
    return ContextCurve(short, short_context, long, long_context)


class Drafters:
    """Fresh drafters by name for one LLM: a draft model or an EAGLE head is loaded once and forked
    (its weights shared); the others are made anew (a suffix drafter's fork would share its global
    tree)."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._loaded: dict[str, Drafter | None] = {}

    def __call__(self, name: str) -> Drafter | None:
        if not name.startswith(("draft:", "eagle")):
            return self.llm.make_drafter(name)
        if name not in self._loaded:
            self._loaded[name] = self.llm.make_drafter(name)
        return self._loaded[name].fork()


def price(llm: LLM, make: Drafters, drafter: str, policies: Sequence[int | str], model: CostModel,
          curves: ContextCurve, prompt_ids: list[list[int]], outputs: list[list[int]]) -> list[Priced]:
    """Each policy replayed over the prompts in order, with a drafter of its own that learns across
    them as a server's would (suffix: each output joins its global tree), and for `auto` one
    controller throughout."""
    samplers = [Request(ids, SamplingParams(), llm.eos_ids, llm.engine.capacity).sampler for ids in prompt_ids]
    features: list[torch.Tensor | None] | None = None  # the target's, for a drafter that reads them
    priced = []
    for tau in policies:
        made = make(drafter)
        if features is None:
            layers = feature_layers(made)
            features = [llm.target.features(ids + out, layers) if layers else None
                        for ids, out in zip(prompt_ids, outputs)]
        policy: int | Controller = Controller(model) if tau == AUTO else int(tau)
        one = Priced(drafter, tau)
        for ids, out, sampler, seen in zip(prompt_ids, outputs, samplers, features):
            one.replays.append(replay(made, sampler, ids, out, policy, model, curves=curves, features=seen))
            finish(made, out)
        priced.append(one)
    return priced


def sample_of(prompts: list[BenchPrompt], n: int) -> list[int]:
    """n prompt indices, the categories taken in turn (each from its first prompts on)."""
    by_category: dict[str, deque[int]] = {}
    for i, p in enumerate(prompts):
        by_category.setdefault(p.category, deque()).append(i)
    chosen: list[int] = []
    while len(chosen) < n and any(by_category.values()):
        for queue in by_category.values():
            if queue and len(chosen) < n:
                chosen.append(queue.popleft())
    return sorted(chosen)


def measure(llm: LLM, make: Drafters, configs: list[Priced], models: dict[str, CostModel], prompt_ids: list[list[int]],
            outputs: list[list[int]], sample: list[int], params: SamplingParams, rounds: int,
            progress: bool = True) -> dict[str, Any]:
    """Plain decoding and `configs` run for real on the sample prompts, `rounds` times, every config
    taking every place in the order in turn. A drafter that learns across requests first hears the
    outputs of the prompts before this one, as it did in the replay. -> per config the speedup (all
    plain decoding time over all its time) and how many outputs equal plain decoding's."""
    controllers = {c.name: Controller(models[c.drafter]) for c in configs if c.tau == AUTO}

    def drafter_for(config: Priced, i: int) -> Drafter | None:
        made = make(config.drafter)
        for out in outputs[:i]:
            finish(made, out)
        return made

    def run(config: Priced | None, i: int, tokens: int) -> tuple[float, list[int]]:
        if config is None:
            llm.engine.use(None, 0)
        elif config.tau == AUTO:
            llm.engine.use(drafter_for(config, i), 0, controllers[config.name])
        else:
            llm.engine.use(drafter_for(config, i), int(config.tau))
        request = Request(prompt_ids[i], SamplingParams(max_tokens=tokens, temperature=0.0), llm.eos_ids,
                          llm.engine.capacity)
        stats = llm.engine.run(request, config is not None)
        return stats.decode_s, list(request.output_ids)

    everyone: list[Priced | None] = [None, *configs]
    for config in everyone:  # warm-up: first calls allocate and fill caches
        run(config, sample[0], 8)
    seconds = {id(c): 0.0 for c in everyone}
    identical = {id(c): 0 for c in configs}
    jobs = [(r, i) for r in range(rounds) for i in sample]
    for n, (_, i) in enumerate(tqdm(jobs, desc="measure", disable=not progress)):
        order = everyone[n % len(everyone):] + everyone[: n % len(everyone)]
        for config in order if n % 2 == 0 else order[::-1]:
            s, out = run(config, i, params.max_tokens)
            seconds[id(config)] += s
            if config is not None:
                identical[id(config)] += out == outputs[i]
    plain_s = seconds[id(None)]
    return {c.name: {"predicted": round(c.speedup(sample), 3), "measured": round(plain_s / seconds[id(c)], 3),
                     "identical": identical[id(c)], "runs": len(jobs)} for c in configs}


def advise(llm: LLM, prompts: list[BenchPrompt], drafters: list[str], max_tokens: int, measure_prompts: int = 4,
           rounds: int = 2, taus: Sequence[int | str] = TAUS, progress: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    prompt_ids = [llm.encode(p.text, chat=p.chat and bool(llm.tokenizer.chat_template)) for p in prompts]
    for ids in prompt_ids:  # a prompt the context cannot hold fails here, before any work
        Request(ids, params, llm.eos_ids, llm.engine.capacity)
    t0 = time.perf_counter()
    outputs = decode_all(llm, prompt_ids, params, progress=progress)
    target_s = time.perf_counter() - t0
    curves = context_curve(llm, max(len(a) + len(b) for a, b in zip(prompt_ids, outputs)))
    make = Drafters(llm)
    overhead = llm.overhead_ms()
    models = {d: CostModel(curves.short, *llm.drafter_costs(make(d)), overhead) for d in drafters}
    priced = [p for d in tqdm(drafters, desc="replay", disable=not progress)
              for p in price(llm, make, d, taus, models[d], curves, prompt_ids, outputs)]
    priced.sort(key=lambda p: -p.speedup())
    sample = sample_of(prompts, measure_prompts)
    measured = (measure(llm, make, priced[:2], models, prompt_ids, outputs, sample, params, rounds, progress)
                if sample else {})
    # the alphas each drafter would need, priced at the traffic's mean context as its replays were
    mean_context = round(sum(len(a) + len(b) / 2 for a, b in zip(prompt_ids, outputs)) / len(prompts))
    at_mean = {d: replace(m, curve=curves.at(mean_context)) for d, m in models.items()}
    categories = sorted({p.category for p in prompts})
    in_category = {c: [i for i, p in enumerate(prompts) if p.category == c] for c in categories}
    tokens = sum(map(len, outputs))
    return {
        "prompts": len(prompts), "tokens": tokens, "max_tokens": max_tokens, "drafters": drafters,
        "verify_ms": {str(c): [round(x, 3) for x in curve.ms] for c, curve in
                      ((curves.short_context, curves.short), (curves.long_context, curves.long))},
        "draft_ms": {d: round(m.draft_ms, 4) for d, m in models.items()}, "overhead_ms": round(overhead, 4),
        "configs": [{"config": p.name, "drafter": p.drafter, "tau": p.tau, "predicted": round(p.speedup(), 3),
                     "acceptance": round(p.acceptance, 4),
                     "by_category": {c: round(p.speedup(in_category[c]), 3) for c in categories}} for p in priced],
        "drafter_facts": {d: facts([p for p in priced if p.drafter == d], at_mean[d], priced[0]) for d in drafters},
        "measured": measured, "sample": [prompts[i].question_id for i in sample],
        "seconds": round(time.perf_counter() - start, 1), "target_seconds": round(target_s, 1),
    }


def facts(priced: list[Priced], model: CostModel, leader: Priced) -> dict[str, Any]:
    """A drafter at its best fixed τ: acceptance by position, the share of cycles it drafted in, and
    the constant α it would need to break even there, to reach AIM and to match the leader (the
    best configuration of all, when it is another drafter's)."""
    best = max((p for p in priced if p.tau != AUTO), key=lambda p: p.speedup())
    lead = leader.drafter != best.drafter
    cycles = [c for r in best.replays for c in r.cycles]
    offered = offered_by_position((int(best.tau), d) for d, _ in cycles)
    return {"best_tau": best.tau, "predicted": round(best.speedup(), 3), "acceptance": round(best.acceptance, 4),
            "alpha_by_position": [round(a, 3) for a in conditional_acceptance(c for c in cycles if c[0] > 0)][:8],
            "drafting_cycles": round(sum(d > 0 for d, _ in cycles) / max(1, len(cycles)), 3),
            "break_even_alpha": _round(model.break_even_alpha(int(best.tau))),
            "alpha_for_aim": _round(model.alpha_for(AIM, MAX_DRAFT_TOKENS, offered)),
            "leader": leader.name if lead else None,
            "alpha_to_lead": _round(model.alpha_for(leader.speedup(), MAX_DRAFT_TOKENS, offered)) if lead else None}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def verdict(result: dict[str, Any]) -> list[str]:
    """The answers in words: speculate or not, with which drafter and τ, how sure, and what would
    change the answer."""
    best = result["configs"][0]
    m = result["measured"].get(best["config"])
    lines = []
    if best["predicted"] < PAYS:
        lines.append(f"Do not speculate on this traffic: the best configuration, {best['config']}, is predicted "
                     f"{best['predicted']:.2f}x plain decoding.")
    elif m and m["measured"] < 1.0:
        lines.append(f"Do not speculate on this traffic: {best['config']} is predicted {best['predicted']:.2f}x, "
                     f"but measured {m['measured']:.2f}x on the sample; a gain this small is within the "
                     "cost model's error.")
    else:
        lines.append(f"Speculate with {best['drafter']}, tau {best['tau']}: predicted {best['predicted']:.2f}x "
                     f"plain decoding over {result['prompts']} prompts.")
        worst = min(best["by_category"].items(), key=lambda kv: kv[1])
        if len(best["by_category"]) > 1 and worst[1] < PAYS:
            lines.append(f"  It does not pay on '{worst[0]}' ({worst[1]:.2f}x): route those requests to plain decoding.")
    if m:
        error = m["predicted"] / m["measured"] - 1
        lines.append(f"Measured on {len(result['sample'])} of the prompts: {m['measured']:.2f}x against "
                     f"{m['predicted']:.2f}x predicted for them (the cost model {error:+.0%}); "
                     f"{m['identical']}/{m['runs']} outputs identical to plain decoding.")
        name, other = max(result["measured"].items(), key=lambda kv: kv[1]["measured"])
        if name != best["config"] and other["measured"] > 1.05 * m["measured"]:
            lines.append(f"  {name} measured faster ({other['measured']:.2f}x, predicted {other['predicted']:.2f}x): "
                         "the two are within the model's error; try both.")
    for drafter, f in result["drafter_facts"].items():
        alphas = " ".join(f"{a:.2f}" for a in f["alpha_by_position"]) or "none drafted"
        need = (f"needs alpha >= {f['alpha_for_aim']:.2f} for {AIM}x" if f["alpha_for_aim"] is not None
                else f"cannot reach {AIM}x at any alpha on this machine")
        if f["leader"]:
            need += (f"; to match {f['leader']} it would need alpha >= {f['alpha_to_lead']:.2f}"
                     if f["alpha_to_lead"] is not None else f"; no alpha makes it match {f['leader']}")
        lines.append(f"{drafter}: best at tau {f['best_tau']} ({f['predicted']:.2f}x), drafts in "
                     f"{f['drafting_cycles']:.0%} of cycles, accepts {f['acceptance']:.0%} of drafts (alpha by "
                     f"position {alphas}); " + (f"breaks even at alpha {f['break_even_alpha']:.2f}"
                                                if f["break_even_alpha"] is not None else "never breaks even")
                     + f", {need}.")
    return lines


def table(result: dict[str, Any], top: int = 12) -> str:
    categories = list(result["configs"][0]["by_category"])
    lines = [f"{'config':24} {'predicted':>9} {'accept':>7} " + " ".join(f"{c[:12]:>12}" for c in categories)]
    for c in result["configs"][:top]:
        lines.append(f"{c['config']:24} {c['predicted']:8.2f}x {c['acceptance']:7.0%} "
                     + " ".join(f"{c['by_category'][k]:11.2f}x" for k in categories))
    return "\n".join(lines)

