"""Timing the costs the cost model needs on this machine: the target's forward over k tokens, T(k),
the engine's own time per cycle besides it, and the drafter's cost per proposed token. Medians over
repeats, after a warm-up."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from verispec.config import SamplingParams
from verispec.drafters.base import Drafter
from verispec.engine.cost import CostModel, VerifyCurve
from verispec.engine.generate import Engine
from verispec.engine.request import Request
from verispec.model.cache import KVCache
from verispec.model.transformer import Transformer
from verispec.sampling import Sampler


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1,
              before: Callable[[], object] | None = None) -> float:
    """The median time of fn in ms; `before` runs untimed ahead of each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def warm_up(target: Transformer, cache: KVCache, seconds: float = 2.0) -> None:
    """Run forwards until `seconds` have passed: a fresh process's first forwards run several times
    slower (page faults on fresh weights, thread pools starting), which would poison T(k)."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward_ms(target, cache, 4, context=64, repeats=1)


def forward_ms(target: Transformer, cache: KVCache, k: int, context: int = 128, repeats: int = 5) -> float:
    """T(k) in ms: one forward over k tokens after `context` cached ones; the cache is left empty."""
    return forward_times_ms(target, cache, [k], context, repeats)[0]


def paired_times_ms(timers: Sequence[Callable[[int], float]], ks: Sequence[int], repeats: int = 5
                    ) -> list[list[float]]:
    """T(k) in ms for each k in ks, by each timer (timer(k): the ms of one forward over k tokens). Each
    round times every k once per timer, in alternating order, each right after a one-token forward;
    one warm-up round comes first, and the timers take turns within every round (so a slow spell of
    a shared machine raises every timer's curve a little, not one a lot). T(k) is the median of
    those T(1) times the median over the rounds of T(k) / the T(1) just before it: a ratio timed in
    one breath moves much less than T(k) timed apart. The speedups priced from one curve to the
    next, for n-gram τ 2 on rag, moved over 1.18-1.27× with medians of T(k), over 1.19-1.22× with
    the ratios."""
    ks = list(ks)
    ones: list[list[float]] = [[] for _ in timers]
    ratios: list[dict[int, list[float]]] = [{k: [] for k in ks} for _ in timers]
    for r in range(repeats + 1):
        for timer, mine, theirs in zip(timers, ones, ratios):
            for k in (ks if r % 2 == 0 else ks[::-1]):
                one, ms = timer(1), timer(k)
                if r > 0:
                    mine.append(one)
                    theirs[k].append(ms / one)
    curves = []
    for mine, theirs in zip(ones, ratios):
        t1 = statistics.median(mine)
        curves.append([t1 if k == 1 else t1 * statistics.median(theirs[k]) for k in ks])
    return curves


def forward_timer(target: Transformer, cache: KVCache, context: int) -> Callable[[int], float]:
    """Fills the cache with `context` positions (of token 0); the timer runs k more tokens after
    them, rolls the cache back to `context` and returns the forward's ms. The caller empties the
    cache when done."""
    device = target.device
    cache.truncate(0)
    target.forward(torch.zeros(context, dtype=torch.long, device=device), torch.arange(context, device=device),
                   cache, last_only=True)

    def timed(k: int) -> float:
        start = time.perf_counter()
        target.forward(torch.zeros(k, dtype=torch.long, device=device),
                       torch.arange(context, context + k, device=device), cache)
        ms = (time.perf_counter() - start) * 1e3
        cache.truncate(context)
        return ms
    return timed


def forward_times_ms(target: Transformer, cache: KVCache, ks: Sequence[int], context: int = 128,
                     repeats: int = 5) -> list[float]:
    """T(k) in ms for each k in ks, after `context` cached tokens (paired_times_ms). The cache is left
    empty."""
    try:
        return paired_times_ms([forward_timer(target, cache, context)], ks, repeats)[0]
    finally:
        cache.truncate(0)


def after_a_forward(target: Transformer, cache: KVCache, context: int = 128) -> Callable[[], float]:
    """A one-token forward after `context` cached tokens, to run before each timing of a drafter: in
    a cycle the drafter runs right after the target's forward has filled the caches with weights,
    where its Python takes 4-10x as long as in a loop of its own (n-gram lookup 0.05 against
    0.005 ms). The caller empties the cache when done."""
    return partial(forward_timer(target, cache, context), 1)


def overhead_ms(engine: Engine, prompt_ids: Sequence[int], tokens: int = 32, repeats: int = 3) -> float:
    """The engine's own time per cycle in ms, outside the target's forward (verification, commit, the
    step's Python): plain greedy decoding of `tokens` tokens after prompt_ids (none stops early),
    the median over `repeats` runs after one to warm up."""
    def once() -> float:
        request = Request(list(prompt_ids), SamplingParams(max_tokens=tokens, temperature=0.0), frozenset(),
                          engine.capacity)
        stats = engine.run(request, speculative=False)
        return (stats.decode_s - stats.forward_s) * 1e3 / stats.cycles

    once()
    return statistics.median(once() for _ in range(repeats))


def verify_curve_ms(target: Transformer, cache: KVCache, max_k: int, repeats: int = 5) -> tuple[float, ...]:
    """(T(1), ..., T(max_k)) in ms, after a warm-up."""
    warm_up(target, cache)
    return tuple(forward_times_ms(target, cache, range(1, max_k + 1), repeats=repeats))


def drafter_costs_ms(drafter: Drafter, context_ids: Sequence[int], sampler: Sampler, k: int = 4,
                     repeats: int = 5, features: torch.Tensor | None = None,
                     between: Callable[[], object] | None = None) -> tuple[float, float]:
    """The drafter's costs in ms: per proposed token in steady state (proposing k tokens again after
    context_ids with its state warm: a draft model runs k one-token steps, as in a cycle), and per
    token it takes in before drafting (a cold proposal feeds the whole context first). A drafter
    that reads the target's features (EAGLE) hears `features` of context_ids[:-1] after each reset.
    `between` runs untimed before each timed call (after_a_forward: as in a cycle)."""
    def reset() -> None:
        drafter.reset(sampler)
        if features is not None:
            drafter.features(features)  # type: ignore[attr-defined]

    reset()
    proposed = max(1, len(drafter.propose(context_ids, k).token_ids))
    per_draft = median_ms(lambda: drafter.propose(context_ids, k), repeats, before=between) / proposed

    def cold() -> None:
        reset()
        drafter.propose(context_ids, k)

    per_fed = max(0.0, median_ms(cold, repeats, before=between) - per_draft * proposed) / len(context_ids)
    return per_draft, per_fed


@dataclass(frozen=True)
class Calibration:
    """T(k) for k = 1..len(verify_ms) and the drafter's costs per token (drafted, and taken in before
    drafting), on one machine and setting."""

    verify_ms: tuple[float, ...]
    draft_ms_per_token: float
    feed_ms_per_token: float = 0.0
    overhead_ms: float = 0.0  # the engine's per cycle, outside the forward (overhead_ms)

    def cost_model(self) -> CostModel:
        return CostModel(VerifyCurve(self.verify_ms), self.draft_ms_per_token, self.feed_ms_per_token,
                         self.overhead_ms)


def calibration_path(cache_root: Path, model_key: str, drafter: str) -> Path:
    """Beside the model cache; the key names the weights, the drafter and this runtime (threads, torch)."""
    ident = f"{model_key}|{drafter}|{torch.get_num_threads()}|{torch.__version__}"
    return cache_root / "calibration" / (hashlib.sha256(ident.encode()).hexdigest()[:16] + ".json")


def save_calibration(path: Path, calibration: Calibration) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(calibration)))


def load_calibration(path: Path) -> Calibration | None:
    """The stored calibration, or None when there is none (or it is unreadable: calibrate again)."""
    try:
        raw = json.loads(path.read_text())
        return Calibration(tuple(float(x) for x in raw["verify_ms"]), float(raw["draft_ms_per_token"]),
                           float(raw.get("feed_ms_per_token", 0.0)), float(raw.get("overhead_ms", 0.0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
