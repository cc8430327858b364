"""The generation loop. Every step is a speculative cycle; plain decoding is the cycle with τ = 0.

A sequence's cache holds every committed token but the last one (`pending`). A step, for all the
sequences of a batch at once:
1. prompts not yet in their cache take a chunk of it (prefill joins the batch, within a budget);
2. each decoding sequence's drafter proposes up to τ tokens after its committed sequence;
3. the target runs each sequence's [pending] + drafts in ONE forward (`forward_many`): row i is the
   sequence's distribution after draft i;
4. per sequence, the verifier keeps the longest accepted prefix and adds the recovered or bonus
   token; the request commits them (stop rules apply inside the chunk); the cache rolls back to
   pending + accepted drafts; the emitted token becomes the new pending.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field

import torch

from verispec.drafters.base import Drafter, finish, propose_all
from verispec.engine.controller import Controller
from verispec.engine.request import Request
from verispec.engine.trace import TraceWriter
from verispec.model.cache import KVCache
from verispec.model.transformer import Segment, Transformer
from verispec.sampling.rejection import verify, verify_greedy
from verispec.types import Stats


@dataclass
class Sequence:
    """A request being generated, with its own cache, drafter and τ (fixed, or a controller's)."""

    request: Request
    cache: KVCache
    drafter: Drafter | None = None
    num_draft_tokens: int = 0
    controller: Controller | None = None
    trace: TraceWriter | None = None
    _decode_start: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.drafter is None:
            self.num_draft_tokens, self.controller = 0, None
        else:
            self.drafter.reset(self.request.sampler)
        self.cache.truncate(0)

    @property
    def to_prefill(self) -> int:
        """Prompt tokens still to enter the cache (all but the last, which is the first pending)."""
        return len(self.request.prompt_ids) - 1 - self.cache.length if self._decode_start is None else 0

    def choose_tau(self, context: list[int]) -> int:
        """τ for the next cycle; context is the request's prompt + committed output."""
        if self.controller is None:
            return self.num_draft_tokens
        request = self.request
        return self.controller.choose(self.drafter.backlog(context),
                                      request.params.max_tokens - len(request.output_ids))


@dataclass
class Cycle:
    """What one step did for one decoding sequence; `tokens` are those the request kept."""

    sequence: Sequence
    tau: int
    drafted: int
    accepted: int
    tokens: list[int]


def step(target: Transformer, sequences: Seq[Sequence], prefill_budget: int | None = None) -> list[Cycle]:
    """One target forward for every unfinished sequence; prefill chunks share at most
    `prefill_budget` rows (None: whole prompts at once). Returns the decoding sequences' cycles."""
    device = target.device
    t0 = time.perf_counter()
    # 1. prefill chunks
    prefill: list[Segment] = []
    filling: list[Sequence] = []
    budget = prefill_budget
    for seq in sequences:
        n = seq.to_prefill if budget is None else min(seq.to_prefill, budget)
        if n > 0:
            start = seq.cache.length
            prefill.append(Segment(torch.tensor(seq.request.prompt_ids[start: start + n], device=device),
                                   seq.cache, "none"))
            filling.append(seq)
            budget = None if budget is None else budget - n
    decoding = [s for s in sequences if not s.request.finished and s.to_prefill == 0 and s not in filling]
    # 2. drafts
    contexts = [seq.request.all_ids for seq in decoding]  # built once: the controller and drafter both read it
    taus = [seq.choose_tau(context) for seq, context in zip(decoding, contexts)]
    drafts, draft_probs, fed = _draft(decoding, taus, contexts)
    t1 = time.perf_counter()
    # 3. one forward: prefill chunks and [pending] + drafts of every decoding sequence
    verifying = [Segment(torch.tensor([seq.request.last_id] + d, device=device), seq.cache)
                 for seq, d in zip(decoding, drafts)]
    bases = [seq.cache.length for seq in decoding]
    logits = target.forward_many(prefill + verifying)[len(prefill):]
    # 4. accept, roll back, commit
    results = []
    for seq, d, q, rows, base in zip(decoding, drafts, draft_probs, logits, bases):
        sampler = seq.request.sampler
        if sampler.params.greedy:  # point masses: no [k + 1, V] rows to build (a tenth of a plain step)
            accepted, tokens = verify_greedy(d, sampler.greedy(rows, seq.request.output_ids, d))
        else:
            target_probs = sampler.probs(rows, seq.request.output_ids, d)  # [k + 1, V]
            accepted, tokens = verify(torch.tensor(d, dtype=torch.long), q, target_probs, sampler.generator)
        seq.cache.truncate(base + 1 + accepted)
        results.append((accepted, tokens))
    t2 = time.perf_counter()
    for seq in filling:
        seq.request.stats.prefill_s += t2 - t0
        seq.request.stats.target_forwards += 1
    return [_commit(seq, tau, d, n, accepted, tokens, t0, t1, t2)
            for seq, tau, d, n, (accepted, tokens) in zip(decoding, taus, drafts, fed, results)]


def _draft(sequences: list[Sequence], taus: list[int], contexts: list[list[int]]
           ) -> tuple[list[list[int]], list[torch.Tensor | None], list[int]]:
    """Drafts, their distributions and the tokens each drafter took in first. Never draft past
    max_tokens or the context: a cycle commits at most k + 1 tokens and the forward writes k + 1
    cache positions."""
    jobs, owners = [], []
    for idx, (seq, tau, context) in enumerate(zip(sequences, taus, contexts)):
        request = seq.request
        room = min(request.params.max_tokens - len(request.output_ids), seq.cache.capacity - request.length) - 1
        k = min(tau, room)
        if k > 0 and seq.drafter is not None:
            jobs.append((seq.drafter, context, k))
            owners.append(idx)
    drafts: list[list[int]] = [[] for _ in sequences]
    probs: list[torch.Tensor | None] = [None] * len(sequences)
    fed = [0] * len(sequences)
    for idx, (_, _, k), proposal in zip(owners, jobs, propose_all(jobs)):
        drafts[idx] = proposal.token_ids[:k]
        probs[idx] = None if proposal.probs is None else proposal.probs[: len(drafts[idx])]
        fed[idx] = proposal.fed
    return drafts, probs, fed


def _commit(seq: Sequence, tau: int, drafts: list[int], fed: int, accepted: int, tokens: list[int],
            t0: float, t1: float, t2: float) -> Cycle:
    request, stats = seq.request, seq.request.stats
    if seq._decode_start is None:
        seq._decode_start = t0
    if drafts:
        seq.drafter.observe(accepted)
    kept = tokens[: request.commit(tokens)]
    if request.finished and seq.drafter is not None:
        finish(seq.drafter, request.output_ids)
    stats.draft_s += t1 - t0
    stats.verify_s += t2 - t1
    stats.target_forwards += 1
    stats.record_cycle(len(drafts), accepted)
    if seq.controller is not None:
        seq.controller.observe(tau, len(drafts), accepted, (t1 - t0) * 1e3, (t2 - t1) * 1e3, fed)
    if seq.trace is not None:
        extra = {"controller": seq.controller.last} if seq.controller is not None else {}
        seq.trace.cycle(tau=tau, drafted=len(drafts), accepted=accepted, fed=fed, draft_ms_per_cycle=(t1 - t0) * 1e3,
                        verify_ms_per_cycle=(t2 - t1) * 1e3, tokens=kept, **extra)
    stats.decode_s = time.perf_counter() - seq._decode_start
    stats.completion_tokens = len(request.output_ids)
    return Cycle(seq, tau, len(drafts), accepted, kept)


class Engine:
    """Owns a target model, its KV cache and an optional drafter; runs one request at a time."""

    def __init__(self, target: Transformer, drafter: Drafter | None = None, num_draft_tokens: int = 0,
                 controller: Controller | None = None) -> None:
        self.target = target
        self.cache = target.new_cache()
        self.use(drafter, num_draft_tokens, controller)

    def use(self, drafter: Drafter | None, num_draft_tokens: int, controller: Controller | None = None) -> None:
        """Switch the drafter and τ between requests (bench compares several on one cache). With a
        controller, it chooses τ before every cycle and num_draft_tokens is ignored."""
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens if drafter is not None else 0
        self.controller = controller if drafter is not None else None

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def run(self, request: Request, speculative: bool = True, trace: TraceWriter | None = None) -> Stats:
        """speculative=False decodes plainly (τ = 0) with the same target and cache, for comparisons."""
        for _ in self.steps(request, speculative, trace):
            pass
        return request.stats

    def steps(self, request: Request, speculative: bool = True, trace: TraceWriter | None = None
              ) -> Iterator[list[int]]:
        """Run the request, yielding the tokens each cycle commits (for streaming)."""
        seq = Sequence(request, self.cache, self.drafter if speculative else None, self.num_draft_tokens,
                       self.controller, trace)
        while not request.finished:
            for cycle in step(self.target, [seq]):
                yield cycle.tokens
