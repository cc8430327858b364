"""Timing the two costs the cost model needs on this machine: the target's forward over k tokens,
T(k), and the drafter's cost per proposed token. Medians over repeats, after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from verispec.drafters.base import Drafter
from verispec.model.cache import KVCache
from verispec.model.transformer import Transformer
from verispec.sampling import Sampler


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def forward_ms(target: Transformer, cache: KVCache, k: int, context: int = 128, repeats: int = 5) -> float:
    """T(k) in ms: one forward over k tokens after `context` cached ones; the cache is left empty."""
    device = target.device
    cache.truncate(0)
    target.forward(torch.zeros(context, dtype=torch.long, device=device), torch.arange(context, device=device),
                   cache, last_only=True)

    def step() -> None:
        target.forward(torch.zeros(k, dtype=torch.long, device=device),
                       torch.arange(context, context + k, device=device), cache)
        cache.truncate(context)

    try:
        return median_ms(step, repeats)
    finally:
        cache.truncate(0)


def drafter_ms_per_token(drafter: Drafter, context_ids: Sequence[int], sampler: Sampler, k: int = 4,
                         repeats: int = 5) -> float:
    """The drafter's steady-state cost per proposed token in ms: proposing k tokens again after
    context_ids, with its state warm (a draft model then runs k one-token steps, as in a cycle)."""
    drafter.reset(sampler)
    proposed = max(1, len(drafter.propose(context_ids, k).token_ids))
    return median_ms(lambda: drafter.propose(context_ids, k), repeats) / proposed
