"""Timing the two costs the cost model needs on this machine: the target's forward over k tokens,
T(k), and the drafter's cost per proposed token. Medians over repeats, after a warm-up."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from verispec.drafters.base import Drafter
from verispec.engine.cost import CostModel, VerifyCurve
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


def warm_up(target: Transformer, cache: KVCache, seconds: float = 2.0) -> None:
    """Run forwards until `seconds` have passed: a fresh process's first forwards run several times
    slower (page faults on fresh weights, thread pools starting), which would poison T(k)."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward_ms(target, cache, 4, context=64, repeats=1)


def forward_ms(target: Transformer, cache: KVCache, k: int, context: int = 128, repeats: int = 5) -> float:
    """T(k) in ms: one forward over k tokens after `context` cached ones; the cache is left empty."""
    return forward_times_ms(target, cache, [k], context, repeats)[0]


def forward_times_ms(target: Transformer, cache: KVCache, ks: Sequence[int], context: int = 128,
                     repeats: int = 5) -> list[float]:
    """T(k) in ms for each k in ks. Each round times every k once, in alternating order, after one
    warm-up round; T(k) is its median over the rounds, so a slow spell of a shared machine raises
    every k a little instead of one k a lot (a spike at one k once made T(6) twice T(5)). The cache
    is left empty."""
    device = target.device
    cache.truncate(0)
    target.forward(torch.zeros(context, dtype=torch.long, device=device), torch.arange(context, device=device),
                   cache, last_only=True)
    times: dict[int, list[float]] = {k: [] for k in ks}
    try:
        for r in range(repeats + 1):
            for k in (ks if r % 2 == 0 else list(ks)[::-1]):
                start = time.perf_counter()
                target.forward(torch.zeros(k, dtype=torch.long, device=device),
                               torch.arange(context, context + k, device=device), cache)
                if r > 0:
                    times[k].append((time.perf_counter() - start) * 1e3)
                cache.truncate(context)
    finally:
        cache.truncate(0)
    return [statistics.median(times[k]) for k in ks]


def verify_curve_ms(target: Transformer, cache: KVCache, max_k: int, repeats: int = 5) -> tuple[float, ...]:
    """(T(1), ..., T(max_k)) in ms, after a warm-up."""
    warm_up(target, cache)
    return tuple(forward_times_ms(target, cache, range(1, max_k + 1), repeats=repeats))


def drafter_costs_ms(drafter: Drafter, context_ids: Sequence[int], sampler: Sampler, k: int = 4,
                     repeats: int = 5, features: torch.Tensor | None = None) -> tuple[float, float]:
    """The drafter's costs in ms: per proposed token in steady state (proposing k tokens again after
    context_ids with its state warm: a draft model runs k one-token steps, as in a cycle), and per
    token it takes in before drafting (a cold proposal feeds the whole context first). A drafter
    that reads the target's features (EAGLE) hears `features` of context_ids[:-1] after each reset."""
    def reset() -> None:
        drafter.reset(sampler)
        if features is not None:
            drafter.features(features)  # type: ignore[attr-defined]

    reset()
    proposed = max(1, len(drafter.propose(context_ids, k).token_ids))
    per_draft = median_ms(lambda: drafter.propose(context_ids, k), repeats) / proposed

    def cold() -> None:
        reset()
        drafter.propose(context_ids, k)

    per_fed = max(0.0, median_ms(cold, repeats) - per_draft * proposed) / len(context_ids)
    return per_draft, per_fed


@dataclass(frozen=True)
class Calibration:
    """T(k) for k = 1..len(verify_ms) and the drafter's costs per token (drafted, and taken in before
    drafting), on one machine and setting."""

    verify_ms: tuple[float, ...]
    draft_ms_per_token: float
    feed_ms_per_token: float = 0.0

    def cost_model(self) -> CostModel:
        return CostModel(VerifyCurve(self.verify_ms), self.draft_ms_per_token, self.feed_ms_per_token)


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
                           float(raw.get("feed_ms_per_token", 0.0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
