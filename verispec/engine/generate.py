"""The generation loop. Every step is a speculative cycle; plain decoding is the cycle with τ = 0.

The cache holds every committed token but the last one (`pending`). A cycle:
1. the drafter proposes up to τ tokens after the committed sequence;
2. the target runs [pending] + drafts in ONE forward: row i is its distribution after draft i;
3. the verifier keeps the longest accepted prefix and adds the recovered or bonus token;
4. the request commits them (stop rules apply inside the chunk) and the cache rolls back to
   pending + accepted drafts; the emitted token becomes the new pending.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from verispec.drafters.base import Drafter
from verispec.engine.controller import Controller
from verispec.engine.request import Request
from verispec.engine.trace import TraceWriter
from verispec.model.transformer import Transformer
from verispec.sampling.rejection import verify
from verispec.types import Stats


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
        device, cache, stats, sampler = self.target.device, self.cache, request.stats, request.sampler
        controller = self.controller if speculative else None
        fixed_tau = self.num_draft_tokens if speculative else 0
        if self.drafter is not None:
            self.drafter.reset(sampler)
        cache.truncate(0)
        start = time.perf_counter()
        if len(request.prompt_ids) > 1:
            prefix = torch.tensor(request.prompt_ids[:-1], device=device)
            self.target.forward(prefix, torch.arange(len(prefix), device=device), cache, last_only=True)
            stats.target_forwards += 1
        stats.prefill_s = time.perf_counter() - start
        pending = request.prompt_ids[-1]
        start = time.perf_counter()
        while not request.finished:
            tau = controller.choose() if controller is not None else fixed_tau
            t0 = time.perf_counter()
            drafts, draft_probs = self._draft(request, tau)
            t1 = time.perf_counter()
            base = cache.length
            inputs = torch.tensor([pending] + drafts, device=device)
            logits = self.target.forward(inputs, torch.arange(base, base + len(inputs), device=device), cache)
            target_probs = sampler.probs(logits, request.output_ids, drafts)  # [k + 1, V]
            accepted, tokens = verify(torch.tensor(drafts, dtype=torch.long), draft_probs, target_probs,
                                      sampler.generator)
            cache.truncate(base + 1 + accepted)
            t2 = time.perf_counter()
            if drafts:
                self.drafter.observe(accepted)
            kept = tokens[: request.commit(tokens)]
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            stats.target_forwards += 1
            stats.record_cycle(len(drafts), accepted)
            if controller is not None:
                controller.observe(tau, len(drafts), accepted, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
            if trace is not None:
                extra = {"controller": controller.last} if controller is not None else {}
                trace.cycle(tau=tau, drafted=len(drafts), accepted=accepted, draft_ms=(t1 - t0) * 1e3,
                            verify_ms=(t2 - t1) * 1e3, tokens=kept, **extra)
            pending = tokens[-1]
            stats.decode_s = time.perf_counter() - start
            stats.completion_tokens = len(request.output_ids)
            yield kept

    def _draft(self, request: Request, num_draft_tokens: int) -> tuple[list[int], torch.Tensor | None]:
        # Never draft past max_tokens or the context: a cycle commits at most k + 1 tokens and the
        # forward writes k + 1 cache positions.
        room = min(request.params.max_tokens - len(request.output_ids), self.capacity - request.length) - 1
        k = min(num_draft_tokens, room)
        if k <= 0:
            return [], None
        proposal = self.drafter.propose(request.prompt_ids + request.output_ids, k)
        drafts = proposal.token_ids[:k]
        return drafts, None if proposal.probs is None else proposal.probs[: len(drafts)]
