"""The cost model: what a cycle commits and what it costs, hence the speedup over plain decoding.

With conditional acceptance α_i at draft position i (the chance that draft i is accepted given that
drafts 0..i-1 were), τ drafted tokens, the drafter's cost per token d and the verify curve T(k):

    E(τ)     = 1 + Σ_{i<τ} Π_{j≤i} α_j          tokens committed per cycle (bonus or recovered included)
    cycle(τ) = τ·d + T(τ + 1) + o                ms per cycle
    speedup  = E(τ)·(T(1) + o) / cycle(τ)        against plain decoding (one token per T(1) + o)

o is the engine's own time per cycle outside the forward and the drafter (verification, commit, the
step's Python): about 0.4 ms against a 6 ms step for SmolLM2 here. Plain decoding pays it once a
token and speculation once a cycle, so leaving it out underprices speculation's gain (by about 1 %
at n-gram τ 2 on rag prompts); it is 0 where it was not measured.

offered_i, the chance that the drafter proposes more than i tokens, scales both: E(τ) = 1 +
Σ_{i<τ} offered_i Π_{j≤i} α_j, and a cycle costs D·d + T(1 + D) with D the number of drafts
proposed, priced over D's law (P(D = j) = offered_{j−1} − offered_j): T is not linear (a CPU's
curve steps up at some row counts), so T at the mean D would underprice a drafter that proposes
τ tokens or none. A draft model also takes in, before drafting, what the last cycle committed
(E(τ) tokens at feed_ms each: its cache catching up); n-gram lookup has no such cost.
With one α, offered = 1, o = 0 and T(k) = T(1) this is Leviathan et al. 2023: E = (1 − α^(τ+1)) /
(1 − α) and speedup E / (τ·c + 1), with c = d / T(1). The controller, bench and diagnose all use this module.

A tree drafter (τ = its node budget n) verifies the nodes it proposes, not its depth: a cycle costs
N·d + T(1 + N) with N the nodes proposed, priced over N's law exactly as D above (offered_i =
P(more than i nodes | budget > i)), and commits 1 + the depth of the kept path. Per budget, with
α_j(n) = P(the kept path goes deeper than j | it reached j) at budget n (the tree's bottom and an
empty proposal count as stops there),

    E(n)     = 1 + Σ_j Π_{i≤j} α_i(n)            = 1 + the mean accepted depth at budget n

held non-decreasing in n (the first n nodes of a tree are a subtree of its first n + 1, so a bigger
budget never accepts less; a measured dip is noise). A 12-node tree of depth 4 costs T(13), not T(5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from verispec.types import Stats

MAX_TAU = 15


@dataclass(frozen=True)
class VerifyCurve:
    """T(k): ms of one target forward over k tokens, measured for k = 1..len(ms); linear between
    (an expected, fractional number of rows) and beyond."""

    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        # More rows never cost less; a measured dip is timing noise, and believing it would make
        # long drafts look free.
        object.__setattr__(self, "ms", tuple(accumulate(self.ms, max)))

    @classmethod
    def flat(cls, t1_ms: float) -> VerifyCurve:
        """'Verification is free': T(k) = T(1), the assumption of the classic analysis."""
        return cls((t1_ms,))

    def __call__(self, k: float) -> float:
        if len(self.ms) == 1:
            return self.ms[0]
        if k <= len(self.ms):
            lo = min(int(k), len(self.ms) - 1)
            return self.ms[lo - 1] + (k - lo) * (self.ms[lo] - self.ms[lo - 1])
        slope = (self.ms[-1] - self.ms[0]) / (len(self.ms) - 1)
        return self.ms[-1] + slope * (k - len(self.ms))

    def growth(self, k: float) -> float:
        """T(k) / T(1)."""
        return self(k) / self(1)


@dataclass(frozen=True)
class ContextCurve:
    """T(k) timed after two context lengths, linear in the context between and beyond them:
    attention reads every cached key for each of the k rows, so a long prompt's verify costs more,
    and a 16-row verify's grows faster than a one-row step's (SmolLM2 here: T(8) 12.6 ms after 128
    cached tokens, ~21 ms after 1536)."""

    short: VerifyCurve
    short_context: int
    long: VerifyCurve
    long_context: int
    _made: dict[int, VerifyCurve] = field(default_factory=dict, compare=False, repr=False)

    def at(self, context: int) -> VerifyCurve:
        """The curve after `context` cached tokens (to 16 below: each is made once)."""
        context = context // 16 * 16
        if context not in self._made:
            f = (context - self.short_context) / (self.long_context - self.short_context)
            self._made[context] = VerifyCurve(tuple(max(s + f * (long - s), 1e-3)
                                                    for s, long in zip(self.short.ms, self.long.ms)))
        return self._made[context]


# offered[i]: the chance that the drafter proposes more than i tokens when asked for more. A draft
# model always proposes τ (offered = [1]); n-gram lookup often proposes none or a short
# continuation, and then the cycle verifies fewer rows.
ALWAYS = (1.0,)


@dataclass(frozen=True)
class CostModel:
    curve: VerifyCurve
    draft_ms: float  # the drafter's cost per proposed token
    feed_ms: float = 0.0  # per token it takes in before drafting: the E(τ) tokens the last cycle committed
    overhead_ms: float = 0.0  # the engine's per cycle, outside the forward and the drafter (o above)

    def step_ms(self, rows: float) -> float:
        """A cycle's time verifying `rows` rows, drafting aside: T(rows) + o."""
        return self.curve(rows) + self.overhead_ms

    @property
    def t1(self) -> float:
        """Plain decoding's time per token."""
        return self.step_ms(1)

    @property
    def c(self) -> float:
        """The drafter's step cost relative to one target decode step."""
        return self.draft_ms / self.t1

    def cycle_ms(self, tau: int, offered: Sequence[float] = ALWAYS) -> float:
        law = drafts_law(offered, tau)
        return sum(p * (d * self.draft_ms + self.step_ms(1 + d)) for d, p in enumerate(law))

    def speedup(self, alphas: Sequence[float], tau: int, offered: Sequence[float] = ALWAYS) -> float:
        return self.speedups(alphas, tau, offered)[tau]

    def tree_speedup(self, alphas_by_budget: Sequence[Sequence[float]], budget: int,
                     offered: Sequence[float] = ALWAYS) -> float:
        """A tree drafter at node budget `budget`: alphas_by_budget[n - 1] is α_j(n) for n = 1..; offered
        counts nodes, so verification is priced by the nodes proposed."""
        tokens = budget_tokens(alphas_by_budget)[budget - 1] if budget > 0 else 1.0
        return self._speedup(tokens, budget, offered)

    def _speedup(self, tokens: float, tau: int, offered: Sequence[float]) -> float:
        feed = self.feed_ms * tokens if tau > 0 else 0.0  # speculating every cycle, a draft model takes these in
        return tokens * self.t1 / (self.cycle_ms(tau, offered) + feed)

    def speedups(self, alphas: Sequence[float], max_tau: int = MAX_TAU, offered: Sequence[float] = ALWAYS
                 ) -> list[float]:
        """speedup(alphas, τ, offered) for τ = 0..max_tau in one pass: each τ adds one term to E(τ),
        and one to the cycle's cost, Σ_d P(D = d)·c(d) = c(0) + Σ_{d=1..τ} P(D ≥ d)·(c(d) − c(d − 1)),
        c(d) = d·draft_ms + T(1 + d) + o."""
        out, tokens, reach, longer = [1.0], 1.0, 1.0, 1.0
        cycle = previous = self.t1
        for tau in range(1, max_tau + 1):
            reach *= at(alphas, tau - 1)
            tokens += at(offered, tau - 1) * reach
            longer = min(longer, at(offered, tau - 1))
            cost = tau * self.draft_ms + self.step_ms(1 + tau)
            cycle, previous = cycle + longer * (cost - previous), cost
            out.append(tokens * self.t1 / (cycle + self.feed_ms * tokens))
        return out

    def best_tau(self, alphas: Sequence[float], max_tau: int = MAX_TAU, offered: Sequence[float] = ALWAYS
                 ) -> tuple[int, float]:
        """(τ, speedup) maximising the speedup over τ = 0..max_tau (τ = 0 is plain decoding: 1.0)."""
        return max(enumerate(self.speedups(alphas, max_tau, offered)), key=lambda x: x[1])

    def best_budget(self, alphas_by_budget: Sequence[Sequence[float]], offered: Sequence[float] = ALWAYS
                    ) -> tuple[int, float]:
        """(node budget, speedup) maximising a tree drafter's speedup over budgets 0..len(alphas_by_budget)."""
        return max(((n, self.tree_speedup(alphas_by_budget, n, offered)) for n in range(len(alphas_by_budget) + 1)),
                   key=lambda x: x[1])

    def alpha_for(self, target_speedup: float, max_tau: int = MAX_TAU, offered: Sequence[float] = ALWAYS
                  ) -> float | None:
        """The least constant α at which some τ reaches target_speedup (None: no α ≤ 1 does)."""
        return _bisect(lambda a: self.best_tau([a], max_tau, offered)[1] >= target_speedup)

    def break_even_alpha(self, tau: int) -> float | None:
        """The constant α at which τ drafted tokens just pay for themselves (speedup 1)."""
        return _bisect(lambda a: self.speedup([a], tau) >= 1)


def _bisect(enough: Callable[[float], bool]) -> float | None:
    """The least α in [0, 1] for which enough(α) holds (monotone), or None."""
    if not enough(1.0):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def at(values: Sequence[float], i: int) -> float:
    """values[i]; beyond the measured positions the last one holds (0 when nothing was measured)."""
    if not values:
        return 0.0
    return values[min(i, len(values) - 1)]


def drafted_rows(offered: Sequence[float], tau: int) -> float:
    """Expected drafts verified when asking for τ: Σ_{i<τ} P(proposal longer than i)."""
    return sum(at(offered, i) for i in range(tau))


def drafts_law(offered: Sequence[float], tau: int) -> list[float]:
    """P(D = d) for d = 0..τ, D the drafts proposed when asking for τ; P(D > i) = offered_i, held
    non-increasing (positions are estimated from different numbers of cycles)."""
    longer = [1.0] + list(accumulate((at(offered, i) for i in range(tau)), min))  # P(D > i - 1), i = 0..τ
    return [a - b for a, b in zip(longer, longer[1:])] + [longer[-1]]


def expected_tokens(alphas: Sequence[float], tau: int, offered: Sequence[float] = ALWAYS) -> float:
    """E(τ) = 1 + Σ_{i<τ} offered_i · Π_{j≤i} α_j; alphas may be one constant α or per position."""
    total, reach = 1.0, 1.0
    for i in range(tau):
        reach *= at(alphas, i)
        total += at(offered, i) * reach
    return total


def tree_tokens(alphas: Sequence[float]) -> float:
    """E at one node budget: 1 + Σ_j Π_{i≤j} α_i over the depths given (none is believed beyond them)."""
    total, reach = 1.0, 1.0
    for alpha in alphas:
        reach *= alpha
        total += reach
    return total


def budget_tokens(alphas_by_budget: Sequence[Sequence[float]]) -> list[float]:
    """[budgets]: E(n) for n = 1.., held non-decreasing in n."""
    return list(accumulate((tree_tokens(a) for a in alphas_by_budget), max))


def offered_by_position(cycles: Iterable[tuple[int, int]]) -> list[float]:
    """From (τ, drafted) per cycle -> P(drafted > i | τ > i)."""
    asked: list[int] = []
    longer: list[int] = []
    for tau, drafted in cycles:
        for i in range(tau):
            if i == len(asked):
                asked.append(0)
                longer.append(0)
            asked[i] += 1
            longer[i] += drafted > i
    return [n / a for n, a in zip(longer, asked)]


def conditional_acceptance(cycles: Iterable[tuple[int, int]]) -> list[float]:
    """α_i from (drafted, accepted) per cycle."""
    stats = Stats()
    for drafted, accepted in cycles:
        stats.record_cycle(drafted, accepted)
    return stats.conditional_acceptance
