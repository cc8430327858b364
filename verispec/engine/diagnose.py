"""Explain a trace: where a cycle's time goes, what it commits, what holds the speedup back, and the
changes worth trying, each with the speedup the cost model predicts for it. A run of a tree drafter
(a cycle with more nodes than depth) is priced as one: τ is the node budget, verification costs
T(nodes + 1), and what a cycle commits is estimated per budget from the kept paths' depths."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from verispec.engine import monitor
from verispec.engine.controller import DraftCosts, TreeAcceptance
from verispec.engine.cost import (MAX_TAU, CostModel, VerifyCurve, at, budget_tokens, conditional_acceptance,
                                  drafted_rows, expected_tokens, offered_by_position)
from verispec.engine.trace import Trace
from verispec.errors import InvalidInputError

SHOWN_TAUS = range(0, 9)


@dataclass
class Recommendation:
    action: str
    predicted_speedup: float


@dataclass(frozen=True)
class Pricing:
    """The cost model read with a run's acceptance: a chain's α_i, or for a tree drafter α_j(n) per node
    budget (by_budget[n - 1]); offered counts the tokens (a tree's nodes) proposed."""

    alphas: list[float]
    offered: list[float]
    by_budget: list[list[float]] | None = None

    def tokens(self, tau: int) -> float:
        if self.by_budget is None:
            return expected_tokens(self.alphas, tau, self.offered)
        return budget_tokens(self.by_budget)[tau - 1] if tau > 0 else 1.0

    def speedup(self, model: CostModel, tau: int) -> float:
        if self.by_budget is None:
            return model.speedup(self.alphas, tau, self.offered)
        return model.tree_speedup(self.by_budget, tau, self.offered)

    def best(self, model: CostModel) -> tuple[int, float]:
        if self.by_budget is None:
            return model.best_tau(self.alphas, offered=self.offered)
        return model.best_budget(self.by_budget, self.offered)


@dataclass
class Report:
    cycles: int
    drafting_cycles: int
    tau: int
    accepted_histogram: dict[int, int]  # accepted drafts per drafting cycle -> number of cycles
    conditional_acceptance: list[float]  # α_i: draft i (a tree: depth i) accepted given 0..i-1 were
    mean_accepted_length: float  # vLLM's: 1 + accepted / drafts, over the cycles that drafted
    tokens_per_cycle: float  # 1 + accepted / cycles, over every cycle
    target_step_ms: float  # T(1)
    verify_growth: float  # T(τ + 1) / T(1)
    draft_ms_per_token: float  # per draft token, the drafter's intake (`fed`) priced apart
    feed_ms_per_token: float  # per token the drafter took in before drafting
    c: float
    draft_share: float  # of the cycle time
    offered: list[float]  # P(the drafter proposed more than i tokens | asked for more than i)
    measured_speedup: float
    predicted_speedup: float
    predicted_by_tau: dict[int, float]
    tree: bool = False  # a tree drafter: tau is the node budget
    mean_nodes: float = 0.0  # draft tokens verified per drafting cycle (a chain's: its mean length)
    tokens_by_budget: dict[int, float] = field(default_factory=dict)  # a tree drafter's E(n), budgets seen
    sampled_tokens: int = 0  # tokens whose u-value the monitor wrote (engine/monitor.py): sampled requests
    exactness_p_value: float | None = None  # chi-square p of those u-values against the uniform law
    verdicts: list[str] = field(default_factory=list)
    why: str = ""
    recommendations: list[Recommendation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(trace: Trace) -> Report:
    """1. acceptance; 2. costs (T(1), the verify curve, the drafter); 3. measured vs predicted speedup;
    4. verdicts, each a bottleneck whose removal the cost model predicts to pay; 5. recommendations."""
    cycles = trace.cycles
    if not cycles:
        raise InvalidInputError("the trace has no cycle lines: nothing to diagnose")
    drafting = [c for c in cycles if c["drafted"] > 0]
    tau = Counter(int(c["tau"]) for c in cycles).most_common(1)[0][0]
    nodes = [int(c.get("nodes", c["drafted"])) for c in cycles]  # a chain's nodes are its drafts
    offered = offered_by_position((int(c["tau"]), n) for c, n in zip(cycles, nodes))
    alphas = conditional_acceptance((int(c["drafted"]), int(c["accepted"])) for c in drafting)
    tree = any(n > c["drafted"] for c, n in zip(cycles, nodes))
    largest = max([int(c["tau"]) for c in cycles] + [SHOWN_TAUS[-1]])
    by_budget = _tree_acceptance(cycles, largest).by_budget() if tree else None
    pricing = Pricing(alphas, offered, by_budget)

    # 2. costs; a draft model's intake of the prompt is priced per token fed, not per draft
    t1 = _t1(trace)
    curve = _curve(trace, t1)
    costs = DraftCosts(0.0, 0.0, decay=1.0)
    for c, n in zip(cycles, nodes):
        if c["drafted"] > 0:
            costs.observe(n, int(c["fed"]), c["draft_ms_per_cycle"])
    model = CostModel(curve, *costs.estimate())
    total_ms = sum(c["draft_ms_per_cycle"] + c["verify_ms_per_cycle"] for c in cycles)
    accepted = sum(c["accepted"] for c in cycles)
    committed = sum(len(c["tokens"]) if "tokens" in c else c["accepted"] + 1 for c in cycles)

    # 3. measured: committed tokens per ms against one token per T(1)
    measured = committed / total_ms * t1
    predicted = pricing.speedup(model, tau)
    by_tau = {t: round(pricing.speedup(model, t), 3) for t in SHOWN_TAUS}
    report = Report(
        cycles=len(cycles), drafting_cycles=len(drafting), tau=tau,
        accepted_histogram=dict(sorted(Counter(int(c["accepted"]) for c in drafting).items())),
        conditional_acceptance=[round(a, 4) for a in alphas],
        mean_accepted_length=round(1 + accepted / len(drafting), 3) if drafting else 0.0,
        tokens_per_cycle=round(1 + accepted / len(cycles), 3), target_step_ms=round(t1, 3),
        verify_growth=round(curve.growth(tau + 1), 3), draft_ms_per_token=round(model.draft_ms, 4),
        feed_ms_per_token=round(model.feed_ms, 4), c=round(model.c, 4),
        draft_share=round(sum(c["draft_ms_per_cycle"] for c in cycles) / total_ms, 4),
        offered=[round(o, 4) for o in offered],
        measured_speedup=round(measured, 3), predicted_speedup=round(predicted, 3), predicted_by_tau=by_tau,
        tree=tree, mean_nodes=round(sum(nodes) / len(drafting), 3) if drafting else 0.0,
        tokens_by_budget={n: round(pricing.tokens(n), 3) for n in sorted({int(c["tau"]) for c in cycles}) if n > 0}
        if tree else {})
    u = [x for c in cycles for x in c.get("u", ())]
    report.sampled_tokens, report.exactness_p_value = len(u), monitor.chi_square_p(monitor.counts(u))
    _verdicts(report, model, pricing, tau, predicted)
    return report


def _tree_acceptance(cycles: list[dict[str, Any]], max_budget: int) -> TreeAcceptance:
    """α_j(n) from every cycle, undecayed; a cycle whose line carries its kept path counts for every
    budget up to its own (TreeAcceptance). A budget no cycle tells about is read off the one below it,
    and a depth no kept path reached at any budget is believed at 0."""
    acceptance = TreeAcceptance(max_budget, prior_alpha=0.0, prior_weight=1e-9, decay=1.0)
    for c in cycles:
        path = c.get("path")
        if path is None and c.get("nodes", c["drafted"]) == c["drafted"]:  # a chain's kept path
            path = list(range(1, int(c["accepted"]) + 1))
        acceptance.observe(int(c["tau"]), int(c["accepted"]), path)
    return acceptance


def _t1(trace: Trace) -> float:
    if isinstance(trace.run.get("target_step_ms"), (int, float)) and trace.run["target_step_ms"] > 0:
        return float(trace.run["target_step_ms"])
    plain = [c["verify_ms_per_cycle"] for c in trace.cycles if c["drafted"] == 0]
    if not plain:
        raise InvalidInputError("the trace gives no target step time: add target_step_ms to its run line "
                                "(docs/trace.md) or include cycles that drafted nothing")
    return statistics.median(plain)


def _curve(trace: Trace, t1: float) -> VerifyCurve:
    """The calibrated curve when the run line has one; else T(1) and a line through the medians of
    the verify times seen per number of rows."""
    calibrated = trace.run.get("verify_ms")
    if isinstance(calibrated, dict) and calibrated:
        return VerifyCurve(tuple(float(calibrated[k]) for k in sorted(calibrated, key=int)))
    rows: dict[int, list[float]] = {}
    for c in trace.cycles:
        if c["drafted"] > 0:
            rows.setdefault(int(c.get("nodes", c["drafted"])) + 1, []).append(c["verify_ms_per_cycle"])
    if not rows:
        return VerifyCurve.flat(t1)
    # least-squares slope through (1, T(1)) of the per-row medians
    points = [(k - 1, statistics.median(v) - t1) for k, v in rows.items()]
    slope = max(0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points))
    return VerifyCurve(tuple(t1 + slope * (k - 1) for k in range(1, MAX_TAU + 2)))


def _verdicts(r: Report, model: CostModel, pricing: Pricing, tau: int, predicted: float) -> None:
    cov, alphas = r.offered, pricing.alphas
    best_tau, best = pricing.best(model)
    a0 = alphas[0] if alphas else 0.0
    cycle = model.cycle_ms(tau)
    r.why = _why_tree(r, model, pricing, tau) if r.tree else (f"A cycle with tau={tau} costs {tau} x {model.draft_ms:.2f} ms of drafting + T({tau + 1}) = "
             f"{model.curve(tau + 1):.1f} ms of verification = {cycle:.1f} ms, that is {cycle / model.t1:.2f} plain "
             f"steps of {model.t1:.1f} ms, and commits {expected_tokens(alphas, tau):.2f} tokens on average "
             f"(accepted drafts plus the target's own token): {cycle / expected_tokens(alphas, tau):.1f} ms per token "
             f"against {model.t1:.1f} ms for plain decoding -> {model.speedup(alphas, tau):.2f}x.")
    if not r.tree and tau > 0 and (at(cov, 0) < 0.95 or at(cov, tau - 1) < 0.9):
        r.why += (f" But the drafter proposed something in only {at(cov, 0):.0%} of the cycles (the others were plain "
                  f"steps) and all {tau} tokens in {at(cov, tau - 1):.0%}, so a cycle verifies "
                  f"{drafted_rows(cov, tau):.2f} drafts on average and the run gets {model.speedup(alphas, tau, cov):.2f}x.")
    if predicted < 1:
        r.why += (f" Verifying {tau + 1} tokens in one pass costs {r.verify_growth:.2f}x one step, not 1x, and the "
                  f"drafts must also be made; with only {r.tokens_per_cycle:.2f} tokens committed per cycle the "
                  "parallel verification cannot pay for itself, so the run is slower than plain decoding.")
    if r.drafting_cycles >= 10 and a0 < 0.05:
        r.verdicts.append(f"acceptance is near 0 from the first position (alpha_0 = {a0:.3f} over "
                          f"{r.drafting_cycles} drafting cycles): the signature of a tokenizer or chat-template "
                          "mismatch between drafter and target, or a drafter of another model family")
    elif a0 < 0.5:
        r.verdicts.append(f"low consecutive acceptance: alpha_0 = {a0:.2f}, mean accepted length "
                          f"{r.mean_accepted_length:.2f}; most cycles keep 0-1 drafts")
    fast_drafter = pricing.best(CostModel(model.curve, 0.0))[1]
    if r.draft_share > 0.25 and fast_drafter > 1.15 * max(predicted, 1.0):
        r.verdicts.append(f"the drafter is too slow for its acceptance: drafting takes {r.draft_share:.0%} of the "
                          f"time (c = {model.c:.2f}); a free drafter with the same acceptance would give {fast_drafter:.2f}x")
    if best_tau < tau and best > 1.05 * pricing.speedup(model, tau):
        r.verdicts.append(f"tau={tau} is too large for this acceptance: the best tau is {best_tau}")
    flat = pricing.speedup(replace(model, curve=VerifyCurve.flat(model.t1)), tau)
    if r.verify_growth > 1 + 0.1 * tau and flat > 1.15 * max(predicted, 1.0):
        r.verdicts.append(f"verification is not parallel enough on this hardware: T({tau + 1}) = "
                          f"{r.verify_growth:.2f} x T(1); with free verification the speedup would be {flat:.2f}x")
    if not r.verdicts:
        r.verdicts.append(f"no bottleneck stands out: speedup {predicted:.2f}x predicted, {r.measured_speedup:.2f}x measured")

    recs: list[Recommendation] = []
    if best_tau != tau and best_tau > 0:
        recs.append(Recommendation(f"tau {tau} -> {best_tau}: predicted {predicted:.2f}x -> {best:.2f}x", round(best, 3)))
    if predicted < 1:
        recs.append(Recommendation(f"turn speculation off for this workload (tau 0, or tau auto, which falls back "
                                   f"to plain steps): predicted {predicted:.2f}x -> 1.00x", 1.0))
    if model.c > 0.02:
        cheaper = replace(model, draft_ms=model.draft_ms / 4, feed_ms=model.feed_ms / 4)
        t, s = pricing.best(cheaper)
        recs.append(Recommendation(f"a cheaper drafter (c {model.c:.2f} -> {cheaper.c:.2f}, same acceptance): "
                                   f"predicted {s:.2f}x at tau {t}", round(s, 3)))
    recs.sort(key=lambda x: -x.predicted_speedup)
    need = model.alpha_for(1.5, offered=cov)
    if best < 1.5:  # what it would take, after the changes one can make now
        recs.append(Recommendation(
            f"for 1.5x, a drafter must reach alpha >= {need:.2f} at every position at c = {model.c:.2f} "
            f"(now alpha = {' '.join(f'{a:.2f}' for a in alphas[:4])})" if need is not None else
            f"for 1.5x, a drafter that proposes more often: at {at(cov, 0):.0%} of the cycles no acceptance reaches it", 1.5))
    r.recommendations = recs


def _why_tree(r: Report, model: CostModel, pricing: Pricing, tau: int) -> str:
    """A tree drafter's cycle, priced by the nodes it verifies."""
    nodes = drafted_rows(r.offered, tau)
    cycle = model.cycle_ms(tau, r.offered)
    verify = cycle - nodes * model.draft_ms
    tokens = pricing.tokens(tau)
    return (f"A cycle with a budget of {tau} nodes verifies {nodes:.2f} draft nodes on average ({r.mean_nodes:.2f} "
            f"when it drafts), and verification is priced by that count, not by the tree's depth: {nodes:.2f} x "
            f"{model.draft_ms:.2f} ms of drafting + T(1 + nodes) = {verify:.1f} ms of verification = {cycle:.1f} ms, "
            f"that is {cycle / model.t1:.2f} plain steps of {model.t1:.1f} ms, and commits {tokens:.2f} tokens on "
            f"average (the kept path's depth plus the target's own token): {cycle / tokens:.1f} ms per token against "
            f"{model.t1:.1f} ms for plain decoding -> {pricing.speedup(model, tau):.2f}x.")


def _exactness(r: Report) -> str:
    if r.exactness_p_value is None:
        return ("no sampled tokens to judge" if r.sampled_tokens == 0 else
                f"{r.sampled_tokens} sampled tokens are too few to judge")
    if r.exactness_p_value < monitor.ALARM:
        return (f"NO. The {r.sampled_tokens} sampled tokens do not follow the target's distribution (their u-values "
                f"give p = {r.exactness_p_value:.1e}): a verifier, sampler, kernel or drafter's q is not lossless.")
    return (f"consistent with it: the {r.sampled_tokens} sampled tokens' u-values fit the uniform law "
            f"(p = {r.exactness_p_value:.3g}; below {monitor.ALARM:g} would say not).")


def explain(r: Report) -> str:
    """The report in plain words."""
    lines = [f"{r.cycles} cycles ({r.drafting_cycles} drafting), tau {r.tau}"
             + (f" (a node budget: draft trees of {r.mean_nodes:.2f} nodes on average)" if r.tree else ""),
             "accepted drafts per drafting cycle: " + ", ".join(f"{k}: {v}" for k, v in r.accepted_histogram.items()),
             "acceptance by position (given the earlier ones accepted): "
             + " ".join(f"{a:.2f}" for a in r.conditional_acceptance),
             f"mean accepted length {r.mean_accepted_length:.2f} (1 + accepted / drafts, vLLM's); "
             f"{r.tokens_per_cycle:.2f} tokens per cycle over all cycles",
             f"target step T(1) {r.target_step_ms:.2f} ms; verify T(tau+1)/T(1) {r.verify_growth:.2f}; drafter "
             f"{r.draft_ms_per_token:.3f} ms per draft token (c = {r.c:.3f}) and {r.feed_ms_per_token:.3f} ms per "
             f"token taken in; drafting is {r.draft_share:.0%} of the time",
             f"speedup over plain decoding: measured {r.measured_speedup:.2f}x, cost model {r.predicted_speedup:.2f}x",
             "predicted by tau: " + "  ".join(f"{t}:{s:.2f}x" for t, s in r.predicted_by_tau.items()),
             *(["tokens per cycle by node budget (1 + the kept path's mean depth): "
                + "  ".join(f"{n}:{e:.2f}" for n, e in r.tokens_by_budget.items())] if r.tree else []),
             "", "Why: " + r.why, "", "Verdict:"]
    lines += [f"  - {v}" for v in r.verdicts]
    lines += ["", "Exact? " + _exactness(r)]
    lines += ["", "Worth trying, by predicted effect:"]
    lines += [f"  {i}. {rec.action}" for i, rec in enumerate(r.recommendations, 1)] or ["  nothing"]
    return "\n".join(lines)
