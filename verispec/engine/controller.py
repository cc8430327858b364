"""Adaptive τ: before every cycle, the τ (0 = a plain step) that maximises expected committed tokens
per second under the cost model, from online estimates of the acceptance by position, the share of
cycles in which the drafter proposes, its cost per token and the verify curve T(k). For a tree
drafter τ is the node budget: once a cycle verified a tree (more nodes than depth), acceptance is
estimated per budget and depth (`TreeAcceptance`) and every cycle is priced by its node count.

Acceptance comes in runs: a cycle that kept every draft it verified is most often inside a passage
the drafter is copying, and the next cycle accepts far more than one after a rejection (n-gram on
Spec-Bench here: α_0 0.92 against 0.54). One estimate over both weighs them by the share of cycles
that start inside a run, and that share depends on τ (a short τ ends more cycles inside a run), so
acceptance measured at one τ misprices the others: from τ 8's cycles, τ 3 looked 11 % slower than it
is. A chain's acceptance is therefore estimated apart for the cycles that start in a run (`run`),
with the other estimates as its prior, and each cycle is priced by the state it starts in.

Speculation can only lose when the estimates are wrong, so they track the recent past (exponential
decay) and, while speculation is off, a probe every so often (a bounded share of cycles) measures
whether acceptance has come back. The verify curve is learned the same way on top of the
calibrated one (`VerifyTimes`), so a calibration taken in a busier or quieter hour does not steer τ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from verispec.engine.cost import CostModel, VerifyCurve, budget_tokens, drafted_rows, expected_tokens

# Without a calibration, the shape of the verify curve: T(k) = T(1) * (1 + GROWTH_GUESS * (k - 1))
GROWTH_GUESS = 0.1


class VerifyTimes:
    """T(k), k = 1..max_k, from the verify times seen, starting from a prior curve.

    Two estimates, both exponentially decayed:
    - the prior moved by a line: a line T(k) ≈ a + b·k is fitted (weighted least squares) to the
      timings seen and to the prior's points, which count as one observation in all and fade like
      the others (down to a floor that only anchors the slope while a single k is being timed);
      the prior shifted by (this line − the prior's own line) keeps the prior's steps (a CPU's curve
      jumps at some row counts) and takes the level and slope of today's timings, so a calibration
      off by a factor or too flat is corrected at k the controller never visits. 0 ≤ b ≤ mean T /
      mean k: more rows never cost less, nor more than proportionally;
    - per k, the mean of its own timings, against the moved prior counted as one observation: a k
      timed often is its own measurement; a k not timed for a while falls back to the moved prior.
    Without a prior, the first timing sets one: T(k) ∝ 1 + GROWTH_GUESS·(k − 1).
    """

    PRIOR_FLOOR = 0.01  # in observations

    def __init__(self, prior: VerifyCurve | None, max_k: int, decay: float) -> None:
        self._max_k = max_k
        self._decay = decay
        self._prior: list[float] = []
        self._prior_weight = 1.0
        self._data = [0.0] * 5  # decayed Σw, Σw·k, Σw·k², Σw·ms, Σw·k·ms of the timings seen
        self._sums = [0.0] * max_k  # decayed Σ ms seen at k
        self._weights = [0.0] * max_k
        if prior is not None:
            self._set_prior([prior(k) for k in range(1, max_k + 1)])

    def _set_prior(self, ms: list[float]) -> None:
        self._prior = ms
        self._prior_moments = line_moments([(1.0 / self._max_k, k, m) for k, m in enumerate(ms, 1)])
        self._prior_line = fit_line(self._prior_moments)

    def observe(self, k: int, ms: float) -> None:
        if not 1 <= k <= self._max_k:
            return
        if not self._prior:
            self._set_prior([ms * (1 + GROWTH_GUESS * (j - k)) for j in range(1, self._max_k + 1)])
        d = self._decay
        self._prior_weight = max(d * self._prior_weight, self.PRIOR_FLOOR)
        self._data = [d * x + y for x, y in zip(self._data, line_moments([(1.0, k, ms)]))]
        self._sums = [d * x for x in self._sums]
        self._weights = [d * x for x in self._weights]
        self._sums[k - 1] += ms
        self._weights[k - 1] += 1

    def curve(self) -> VerifyCurve | None:
        """None until something was timed (without a prior)."""
        if not self._prior:
            return None
        a, b = fit_line([self._prior_weight * p + x for p, x in zip(self._prior_moments, self._data)])
        a0, b0 = self._prior_line
        moved = [max(m + (a - a0) + (b - b0) * k, 1e-3) for k, m in enumerate(self._prior, 1)]
        return VerifyCurve(tuple((s + m) / (w + 1) for s, w, m in zip(self._sums, self._weights, moved)))


def line_moments(points: list[tuple[float, float, float]]) -> list[float]:
    """Σw, Σw·k, Σw·k², Σw·y, Σw·k·y of weighted points (w, k, y)."""
    return [sum(w * f for w, f in zip((p[0] for p in points), column)) for column in
            zip(*((1.0, k, k * k, y, k * y) for _, k, y in points))]


def fit_line(moments: list[float]) -> tuple[float, float]:
    """(a, b) of the weighted least-squares line y ≈ a + b·k, with 0 ≤ b ≤ mean y / mean k."""
    sw, sk, skk, sy, sky = moments
    spread = sw * skk - sk * sk
    b = (sw * sky - sk * sy) / spread if spread > 0 else 0.0
    b = min(max(b, 0.0), sy / sk)
    return (sy - b * sk) / sw, b


class DraftCosts:
    """The drafter's ms per draft (d) and per token it takes in before drafting (g: a draft model's
    cache catching up, the whole prompt first), from the draft times seen: decayed least squares of
    draft_ms ≈ d·drafted + g·fed. Priced together, a 700-token prompt fed once made d look 20× too
    dear and switched a paying draft model off. The prior's d and g (a calibration's) count as one
    observation each and fade, down to a floor that keeps the fit defined while drafted and fed move
    together."""

    FLOOR = 0.01  # in observations

    def __init__(self, prior_ms: float, prior_feed_ms: float, decay: float) -> None:
        self._prior_ms, self._prior_feed_ms = prior_ms, prior_feed_ms
        self._decay = decay
        self._prior_weight = 1.0
        self._sums = [0.0] * 5  # decayed Σn², Σn·f, Σf², Σn·ms, Σf·ms over (drafted n, fed f, ms)

    def observe(self, drafted: int, fed: int, ms: float) -> None:
        d = self._decay
        self._prior_weight = max(d * self._prior_weight, self.FLOOR)
        terms = (drafted * drafted, drafted * fed, fed * fed, drafted * ms, fed * ms)
        self._sums = [d * x + t for x, t in zip(self._sums, terms)]

    def estimate(self) -> tuple[float, float]:
        """(d, g) in ms, both ≥ 0."""
        w = self._prior_weight
        nn, nf, ff, ny, fy = self._sums
        nn, ny, ff, fy = nn + w, ny + w * self._prior_ms, ff + w, fy + w * self._prior_feed_ms
        det = nn * ff - nf * nf
        d, g = (ny * ff - fy * nf) / det, (fy * nn - ny * nf) / det
        if d < 0:
            return 0.0, fy / ff
        if g < 0:
            return ny / nn, 0.0
        return d, g


class ChainAcceptance:
    """α_i, P(draft i is accepted | drafts 0..i-1 were), and offered_i, P(the drafter proposes more than
    i tokens (a tree: nodes) | it was asked for more than i), for positions i < max_tau, from decayed
    counts; a position is counted only in the cycles that reached it. A prior counts as prior_weight
    early observations and fades like them, so a drafter never accepted is estimated at 0, not at a
    floor the prior holds up. Without a prior given, α's prior is prior_alpha at position 0 and at
    each later position the estimate before it (positions beyond those seen are believed to accept
    like the deepest one seen, so a longer τ gets tried), and offered's prior is 1."""

    def __init__(self, max_tau: int, prior_alpha: float, prior_weight: float, decay: float) -> None:
        self._prior_alpha, self._decay = prior_alpha, decay
        self._kept = [0.0] * max_tau  # decayed counts per position
        self._tried = [0.0] * max_tau
        self._longer = [0.0] * max_tau  # decayed: proposals longer than i / requests for more than i
        self._asked = [0.0] * max_tau
        self._weights = [prior_weight] * max_tau  # α's prior, in observations: it decays like one
        self._offered_weights = [prior_weight] * max_tau

    def observe(self, tau: int, drafted: int, accepted: int, nodes: int) -> None:
        """A cycle that asked for τ, got `nodes` draft tokens of `drafted` positions, kept `accepted`."""
        d, n = self._decay, len(self._kept)
        for i in range(min(tau, n)):
            self._asked[i] = d * self._asked[i] + 1
            self._longer[i] = d * self._longer[i] + (nodes > i)
            self._offered_weights[i] *= d
        for i in range(min(drafted, n, accepted + 1)):  # drafted positions that were reached
            self._tried[i] = d * self._tried[i] + 1
            self._kept[i] = d * self._kept[i] + (i < accepted)
            self._weights[i] *= d

    def alphas(self, prior: Sequence[float] | None = None) -> list[float]:
        out: list[float] = []
        for i, (kept, tried, w) in enumerate(zip(self._kept, self._tried, self._weights)):
            p = prior[i] if prior is not None else out[-1] if out else self._prior_alpha
            out.append((kept + w * p) / (tried + w))
        return out

    def offered(self, prior: Sequence[float] | None = None) -> list[float]:
        prior = prior or [1.0] * len(self._asked)
        return [(n + w * p) / (a + w) for n, a, w, p in zip(self._longer, self._asked, self._offered_weights, prior)]

    @property
    def guessing(self) -> bool:
        """Position 0 not seen yet: the estimates are still the prior's."""
        return self._weights[0] >= 0.5


class TreeAcceptance:
    """α_j(n) for node budgets n = 1..max_budget and depths j < n: P(the kept path goes deeper than j |
    it reached j) among the cycles of budget n (a tree's bottom and an empty proposal count as stops at
    their depth; the cost model's E(n) = 1 + Σ_j Π_{i≤j} α_i(n)).

    A cycle of budget τ also tells what every budget m < τ would have kept: the engine cuts a tree to
    its first τ nodes, which contain the first m, and the kept path's prefix among nodes 1..m is what a
    tree of those m nodes keeps (siblings are tried in node order, under the same uniforms); so one
    cycle with its kept path updates every budget up to its own. This takes a drafter's tree at budget
    m to be the first m nodes of its tree at τ (true of best-first trees); without the path only τ is
    updated. Counts are decayed per budget as it is updated. A prior counts as prior_weight
    observations and fades like them: at budget 1 prior_alpha; at budget n the estimate at n − 1 (a
    bigger tree accepts at least as deep), and at its new depth n − 1 the estimate at depth n − 2 (as
    for chains), so a budget never run is believed a little better than the one below and gets tried."""

    def __init__(self, max_budget: int, prior_alpha: float, prior_weight: float, decay: float) -> None:
        self._prior_alpha, self._decay = prior_alpha, decay
        self._kept = [[0.0] * n for n in range(1, max_budget + 1)]  # [budget - 1][depth]
        self._tried = [[0.0] * n for n in range(1, max_budget + 1)]
        self._prior_weight = [[prior_weight] * n for n in range(1, max_budget + 1)]

    def observe(self, budget: int, accepted: int, path: Sequence[int] | None = None) -> None:
        """A cycle of `budget` nodes kept a path of depth `accepted`; path: its nodes (1..budget)."""
        budget = min(budget, len(self._kept))
        for m in range(1 if path is not None else max(budget, 1), budget + 1):
            depth = accepted if path is None else sum(node <= m for node in path)
            kept, tried, w, d = self._kept[m - 1], self._tried[m - 1], self._prior_weight[m - 1], self._decay
            for j in range(min(depth + 1, m)):  # the depths the kept path reached
                tried[j] = d * tried[j] + 1
                kept[j] = d * kept[j] + (j < depth)
                w[j] *= d

    def by_budget(self) -> list[list[float]]:
        """[max_budget]: α_j(n) for n = 1..max_budget, j < n, as CostModel.best_budget reads them."""
        out: list[list[float]] = []
        for kept, tried, weights in zip(self._kept, self._tried, self._prior_weight):
            alphas: list[float] = []
            for j, (k, t, w) in enumerate(zip(kept, tried, weights)):
                prior = out[-1][j] if out and j < len(out[-1]) else alphas[-1] if alphas else self._prior_alpha
                alphas.append((k + w * prior) / (t + w))
            out.append(alphas)
        return out

    @property
    def guessing(self) -> bool:
        """Nothing seen yet at depth 0 of any budget: the estimates are still the prior's."""
        return all(w[0] >= 0.5 for w in self._prior_weight)


@dataclass(frozen=True)
class ControllerConfig:
    max_tau: int = 8  # for a tree drafter, the largest node budget
    decay: float = 0.95  # weight of the past per observation (a window of ~20 observations)
    time_decay: float = 0.95  # the same for verify times, noisier per cycle and slower to change
    prior_alpha: float = 0.5  # what position 0 is believed to accept before anything was seen
    prior_weight: float = 1.0  # in observations
    probe_interval: int = 16  # while off: one probe cycle in this many, at most
    probe_interval_max: int = 64  # probes that find nothing space out up to this
    probe_tau: int = 2
    explore_interval: int = 32  # while on: one cycle in this many times a τ half or twice the best


class Controller:
    def __init__(self, prior: CostModel | None = None, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        c = self.config
        # acceptance by the state a cycle starts in: after one that kept every draft it verified (run)
        self._chains = {run: ChainAcceptance(c.max_tau, c.prior_alpha, c.prior_weight, c.decay) for run in (False, True)}
        self.run = False  # the next cycle's state
        self._times = VerifyTimes(prior.curve if prior is not None else None, c.max_tau + 1, c.time_decay)
        self._draft = DraftCosts(prior.draft_ms if prior is not None else 0.0,
                                 prior.feed_ms if prior is not None else 0.0, c.decay)
        self._overhead_ms = prior.overhead_ms if prior is not None else 0.0  # not observed: the prior's
        self._trees = TreeAcceptance(c.max_tau, c.prior_alpha, c.prior_weight, c.decay)
        self.tree = False  # has a cycle verified a tree? then τ is a node budget, chosen by the tree model
        self._since_probe = 0
        self._interval = c.probe_interval
        self._since_explore = 0
        self._explored = 0  # explorations so far: even ones go down, odd ones up
        self.last: dict[str, Any] = {}

    # --- estimates --------------------------------------------------------------------------------
    @property
    def alphas(self) -> list[float]:
        """α_i for the next cycle. In a run, the run's estimates, whose prior is the others'."""
        cold = self._chains[False].alphas()
        return self._chains[True].alphas(cold) if self.run else cold

    @property
    def offered(self) -> list[float]:
        """P(the drafter proposes more than i tokens (a tree: nodes) | asked for more than i), likewise."""
        cold = self._chains[False].offered()
        return self._chains[True].offered(cold) if self.run else cold

    def outlooks(self, tau: int) -> list[tuple[float, float, float]]:
        """For τ' = 0..τ: (tokens a cycle at τ' is expected to commit, draft rows it is expected to
        verify, the drafter's ms per draft), by the current estimates (a tree drafter: τ' is the
        node budget)."""
        offered, draft_ms = self.offered, self.draft_ms
        tokens = ([1.0] + budget_tokens(self._trees.by_budget())[:tau] if self.tree else
                  [expected_tokens(self.alphas, t, offered) for t in range(tau + 1)])
        return [(e, drafted_rows(offered, t), draft_ms) for t, e in enumerate(tokens)]

    @property
    def draft_ms(self) -> float:
        """The drafter's estimated cost per proposed token."""
        return self._draft.estimate()[0]

    def cost_model(self) -> CostModel | None:
        curve = self._times.curve()
        return None if curve is None else CostModel(curve, *self._draft.estimate(), self._overhead_ms)

    def new_request(self) -> None:
        """A request starts: its first cycle is in no run (what it learnt stays)."""
        self.run = False

    # --- decisions --------------------------------------------------------------------------------
    def choose(self, backlog: int = 0, remaining: int | None = None) -> int:
        """1. no T(1) yet: a plain step measures it; 2. the cost model's best τ, now and then another one
        to time its verify (an estimate never tested is never corrected); 3. off: probe now and then.

        backlog: the tokens the drafter must take in before it can draft (a cold draft model: the
        whole context); remaining: the tokens the request may still generate. Drafting starts only
        where what it is expected to save over those tokens pays for taking in the backlog."""
        c = self.config
        model = self.cost_model()
        if model is None:
            return self._decide(0, "measuring T(1)")
        tau, speedup = self._best(model)
        if tau > 0 and not self._guessing and not self._repays(model, speedup, backlog, remaining):
            # (while acceptance is still the prior's guess, only the probe rule below holds it back)
            return self._decide(0, "backlog", model, speedup)
        if tau > 0:
            self._interval = c.probe_interval
            self._since_probe = 0
            self._since_explore += 1
            if self._since_explore >= c.explore_interval:
                self._since_explore = 0
                self._explored += 1
                return self._decide(tau // 2 if self._explored % 2 else min(2 * tau, c.max_tau), "explore", model,
                                    speedup)
            return self._decide(tau, "best", model, speedup)
        self._since_probe += 1
        # a probe is due; none when drafts that are always accepted would not pay either (a drafter
        # as dear as the target, or one whose backlog the rest of the request cannot repay)
        if self._since_probe >= self._interval:
            self._since_probe = 0
            if self._could_pay(model, backlog, remaining):
                return self._decide(c.probe_tau, "probe", model, speedup)
        return self._decide(0, "off", model, speedup)

    def _best(self, model: CostModel) -> tuple[int, float]:
        if self.tree:
            return model.best_budget(self._trees.by_budget(), self.offered)
        best = model.best_tau(self.alphas, self.config.max_tau, self.offered)
        if best[0] == 0 and self.run:
            # a run only adds drafts: turning speculation off (and probing) is the other state's call,
            # and a run whose estimates do not pay is taken for no run
            self.run = False
            best = model.best_tau(self.alphas, self.config.max_tau, self.offered)
        return best

    @property
    def _guessing(self) -> bool:
        # (the run's estimates have the others' for prior: those tell whether anything was seen)
        return self._trees.guessing if self.tree else self._chains[False].guessing

    @staticmethod
    def _repays(model: CostModel, speedup: float, backlog: int, remaining: int | None) -> bool:
        """Would speculating at `speedup` over the remaining tokens save more than the backlog costs?"""
        if backlog == 0 or remaining is None:
            return True
        return (1 - 1 / speedup) * model.t1 * remaining > model.feed_ms * backlog

    def observe(self, tau: int, drafted: int, accepted: int, draft_ms: float, verify_ms: float, fed: int = 0,
                nodes: int | None = None, path: Sequence[int] | None = None) -> None:
        """One cycle: τ asked, drafts proposed and accepted, its draft and verify times, and the tokens
        the drafter took in before drafting. For a tree, drafted and accepted are depths, nodes its node
        count (None: a chain, nodes = drafted: the forward verified nodes + 1 rows and the drafter made
        nodes tokens) and path the kept path's nodes (None: a chain's, 1..accepted)."""
        nodes = drafted if nodes is None else nodes
        self.tree = self.tree or nodes > drafted
        self._times.observe(nodes + 1, verify_ms)
        if tau == 0:
            self.run = False
            return
        self._trees.observe(tau, accepted, range(1, accepted + 1) if path is None else path)
        if self.last.get("why") == "probe":
            self._probed(drafted, accepted)
        self._chains[self.run].observe(tau, drafted, accepted, nodes)
        self.run = 0 < drafted == accepted
        if drafted > 0:
            self._draft.observe(nodes, fed, draft_ms)

    def _probed(self, drafted: int, accepted: int) -> None:
        """After a probe: one that found acceptance back (where acceptance is what keeps speculation
        off) looks again at once; one whose drafter proposed nothing learnt nothing and is due again at
        the next cycle (n-gram lookup often has no match); one rejected spaces the next out."""
        c = self.config
        if accepted > 0 and self._could_pay(self.cost_model()):
            self._since_probe, self._interval = c.probe_interval, c.probe_interval
        elif drafted == 0:
            self._since_probe = self._interval
        else:
            self._interval = min(2 * self._interval, c.probe_interval_max)

    def _could_pay(self, model: CostModel | None, backlog: int = 0, remaining: int | None = None) -> bool:
        """Would speculation pay if every draft were accepted? Only then is acceptance what keeps it
        off, and a probe (an accepted one calling the next at once) can find it back."""
        if model is None:
            return False
        best = model.best_tau([1.0], self.config.max_tau, self.offered)[1]
        return best > 1 and self._repays(model, best, backlog, remaining)

    def _decide(self, tau: int, why: str, model: CostModel | None = None, speedup: float | None = None) -> int:
        self.last = {"tau": tau, "why": why, "run": self.run, "alphas": [round(a, 3) for a in self.alphas[:4]],
                     "offered": [round(o, 3) for o in self.offered[:4]]}
        if self.tree:  # the per-depth acceptance at the budget chosen, and E(n) at every budget
            by_budget = self._trees.by_budget()
            self.last["alphas"] = [round(a, 3) for a in by_budget[tau - 1][:4]] if tau > 0 else []
            self.last["tokens_by_budget"] = [round(e, 3) for e in budget_tokens(by_budget)]
        if model is not None:
            self.last.update(draft_ms_per_token=round(model.draft_ms, 4), feed_ms_per_token=round(model.feed_ms, 4),
                             target_step_ms=round(model.t1, 3))
        if speedup is not None:
            self.last["predicted_speedup"] = round(speedup, 3)
        return tau
