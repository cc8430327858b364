"""A live check that sampled output still follows the target: a randomized probability integral
transform of every token a sampled request commits.

A token x committed at a row whose processed target distribution is p (after temperature, top-k,
top-p and penalties) gives u = P(X < x) + V p(x), token ids in their order and V uniform on [0, 1).
Under a lossless verifier x is distributed as p given everything before it, whatever was drafted, so
the u are independent and uniform on [0, 1); a verifier, sampler or kernel change that drifts skews
them (accepting too much, a bonus token from the wrong row, a residual left unnormalised, q at the
wrong temperature). The monitor bins the u per drafter, over everything and over a sliding window,
and gives each a chi-square p-value; a window below ALARM logs a warning once until it recovers.
V comes from the monitor's own generator, so requests' random streams, and their outputs, are
untouched. Greedy requests have point-mass rows and are not observed here.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

BINS = 16
WINDOW = 4096  # tokens in the sliding window
ALARM = 1e-6  # a window's p-value below this is reported
LEAST = 5 * BINS  # fewer tokens give no p-value (the chi-square law wants about 5 a bin)


def uniforms(probs: torch.Tensor, tokens: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """probs [n, V] rows, tokens [n] committed at them -> u [n] = P(X < x) + V p(x)."""
    below = torch.stack([probs[i, :x].sum() for i, x in enumerate(tokens)]).double().cpu()
    p_x = probs[torch.arange(len(tokens)), list(tokens)].double().cpu()
    return (below + torch.rand(len(tokens), generator=generator, dtype=torch.float64) * p_x).clamp(0.0, 1.0)


def bin_of(u: float) -> int:
    """Which of the BINS equal bins of [0, 1] u falls in (1 itself in the last)."""
    return min(int(u * BINS), BINS - 1)


def counts(u: Sequence[float]) -> list[int]:
    """How many of the u fall in each bin."""
    bins = [0] * BINS
    for x in u:
        bins[bin_of(x)] += 1
    return bins


def chi_square_p(counts: Sequence[int]) -> float | None:
    """The p-value of counts [BINS] under the uniform law; None below LEAST tokens."""
    n = sum(counts)
    if n < LEAST:
        return None
    expected = n / len(counts)
    statistic = sum((c - expected) ** 2 for c in counts) / expected
    dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))


@dataclass
class Fit:
    """One drafter's u, binned: over everything, and over the last WINDOW tokens."""

    total: list[int] = field(default_factory=lambda: [0] * BINS)
    window: list[int] = field(default_factory=lambda: [0] * BINS)
    recent: deque[int] = field(default_factory=deque)
    unchecked: int = 0  # tokens since the window's p-value was last looked at
    alarmed: bool = False

    def add(self, bins: list[int]) -> None:
        for b in bins:
            self.total[b] += 1
            self.window[b] += 1
            self.recent.append(b)
            if len(self.recent) > WINDOW:
                self.window[self.recent.popleft()] -= 1

    def report(self) -> dict[str, float | int | None]:
        return {"tokens": sum(self.total), "p_value": chi_square_p(self.total),
                "window_tokens": len(self.recent), "window_p_value": chi_square_p(self.window)}


class Monitor:
    """The u of every observed token, per drafter name ("none" for plain decoding)."""

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)
        self._fits: dict[str, Fit] = {}
        self._lock = threading.Lock()  # the engine thread observes; a metrics scrape reads

    def observe(self, drafter: str, probs: torch.Tensor, tokens: Sequence[int]) -> list[float]:
        """probs [n, V]: the processed target rows the tokens [n] were committed at -> their u [n]."""
        if not tokens:
            return []
        u = uniforms(probs, tokens, self._generator).tolist()
        with self._lock:
            fit = self._fits.setdefault(drafter, Fit())
            fit.add([bin_of(x) for x in u])
            fit.unchecked += len(u)
            if len(fit.recent) < WINDOW or fit.unchecked < WINDOW // 8:
                return u  # a full window's p-value is looked at every WINDOW / 8 tokens
            fit.unchecked = 0
            p = chi_square_p(fit.window)
            if p is not None and p < ALARM and not fit.alarmed:
                log.warning("sampled output with drafter %s does not follow the target: the last %d tokens' "
                            "u-values give p = %.1e (bins %s); a verifier, sampler or kernel is not lossless",
                            drafter, len(fit.recent), p, fit.window)
            fit.alarmed = p is not None and p < ALARM
        return u

    def report(self, drafter: str | None = None) -> dict:
        """{drafter: {tokens, p_value, window_tokens, window_p_value}}, or one drafter's entry."""
        with self._lock:
            if drafter is not None:
                return self._fits[drafter].report() if drafter in self._fits else Fit().report()
            return {name: fit.report() for name, fit in self._fits.items()}
