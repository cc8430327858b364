"""The cost model: what a cycle commits and what it costs, hence the speedup over plain decoding.

With conditional acceptance α_i at draft position i (the chance that draft i is accepted given that
drafts 0..i-1 were), τ drafted tokens, the drafter's cost per token d and the verify curve T(k):

    E(τ)     = 1 + Σ_{i<τ} Π_{j≤i} α_j          tokens committed per cycle (bonus or recovered included)
    cycle(τ) = τ·d + T(τ + 1)                    ms per cycle
    speedup  = E(τ)·T(1) / cycle(τ)              against plain decoding (one token per T(1))

With one α and T(k) = T(1) this is Leviathan et al. 2023: E = (1 − α^(τ+1)) / (1 − α) and speedup
E / (τ·c + 1), with c = d / T(1). The controller, bench and diagnose all use this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from verispec.types import Stats

MAX_TAU = 15


@dataclass(frozen=True)
class VerifyCurve:
    """T(k): ms of one target forward over k tokens, measured for k = 1..len(ms); linear beyond."""

    ms: tuple[float, ...]

    @classmethod
    def flat(cls, t1_ms: float) -> VerifyCurve:
        """'Verification is free': T(k) = T(1), the assumption of the classic analysis."""
        return cls((t1_ms,))

    def __call__(self, k: int) -> float:
        if k <= len(self.ms):
            return self.ms[k - 1]
        slope = (self.ms[-1] - self.ms[0]) / (len(self.ms) - 1) if len(self.ms) > 1 else 0.0
        return self.ms[-1] + slope * (k - len(self.ms))

    def growth(self, k: int) -> float:
        """T(k) / T(1)."""
        return self(k) / self(1)


@dataclass(frozen=True)
class CostModel:
    curve: VerifyCurve
    draft_ms: float  # the drafter's cost per proposed token

    @property
    def t1(self) -> float:
        return self.curve(1)

    @property
    def c(self) -> float:
        """The drafter's step cost relative to one target decode step."""
        return self.draft_ms / self.t1

    def cycle_ms(self, tau: int) -> float:
        return tau * self.draft_ms + self.curve(tau + 1)

    def speedup(self, alphas: Sequence[float], tau: int, coverage: float = 1.0) -> float:
        """coverage: the share of cycles in which the drafter proposes at all (an n-gram drafter finds
        no match in the others, and those cycles are plain steps)."""
        tokens = coverage * expected_tokens(alphas, tau) + (1 - coverage)
        return tokens * self.t1 / (coverage * self.cycle_ms(tau) + (1 - coverage) * self.t1)

    def best_tau(self, alphas: Sequence[float], max_tau: int = MAX_TAU, coverage: float = 1.0) -> tuple[int, float]:
        """(τ, speedup) maximising the speedup over τ = 0..max_tau (τ = 0 is plain decoding: 1.0)."""
        return max(((tau, self.speedup(alphas, tau, coverage)) for tau in range(max_tau + 1)), key=lambda x: x[1])

    def alpha_for(self, target_speedup: float, max_tau: int = MAX_TAU, coverage: float = 1.0) -> float | None:
        """The least constant α at which some τ reaches target_speedup (None: no α ≤ 1 does)."""
        if self.best_tau([1.0], max_tau, coverage)[1] < target_speedup:
            return None
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.best_tau([mid], max_tau, coverage)[1] >= target_speedup else (mid, hi)
        return hi

    def break_even_alpha(self, tau: int) -> float | None:
        """The constant α at which τ drafted tokens just pay for themselves (speedup 1)."""
        if self.speedup([1.0], tau) < 1:
            return None
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.speedup([mid], tau) >= 1 else (mid, hi)
        return hi


def alpha_at(alphas: Sequence[float], i: int) -> float:
    """α_i; beyond the measured positions the last one holds (0 when nothing was measured)."""
    if not alphas:
        return 0.0
    return alphas[min(i, len(alphas) - 1)]


def expected_tokens(alphas: Sequence[float], tau: int) -> float:
    """E(τ) = 1 + Σ_{i<τ} Π_{j≤i} α_j; alphas may be one constant α or per position."""
    total, reach = 1.0, 1.0
    for i in range(tau):
        reach *= alpha_at(alphas, i)
        total += reach
    return total


def position_acceptance(cycles: Iterable[tuple[int, int]]) -> list[float]:
    """α_i from (drafted, accepted) per cycle."""
    stats = Stats()
    for drafted, accepted in cycles:
        stats.record_cycle(drafted, accepted)
    return stats.position_acceptance
