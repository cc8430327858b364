"""An EAGLE-3 head drafts from the target's hidden states (verispec/eagle/head.py).

The engine hands the drafter the target's features of every token it commits (`features`, for the
layers in `feature_layers`); the context's last token (pending) has none yet. A proposal first takes
in the pairs it has not seen (pair t: the features at t and the token at t + 1; the last pair ends
at the pending token), then drafts one token per head step on its own features. Its head cache
keeps the pairs built from the target's features; the drafted ones are dropped at the next proposal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verispec.drafters.base import DraftProposal
from verispec.eagle.head import Head
from verispec.sampling import Sampler


def _argmax_is_greedy(sampler: Sampler, history: int) -> bool:
    """Whether the request's greedy choice over the head's q is its plain argmax (no bias, penalty,
    min_tokens mask or format after `history` output tokens): then a draft is a point mass."""
    p = sampler.params
    return (p.greedy and not p.penalized and not p.logit_bias and sampler.grammar is None
            and history >= p.min_tokens)


class EagleDrafter:
    def __init__(self, head: Head, capacity: int) -> None:
        self.head = head  # drafting runs on the native kernels where they run (Head.use_native)
        self.capacity = capacity
        self.cache = head.new_cache(capacity)
        self._unseen: list[torch.Tensor] = []  # target features [m, layers, H] not yet in the head cache
        self._seen = 0  # pairs in the head cache built from the target's features
        self._last: torch.Tensor | None = None  # h [1, H] of the last of them: its logits give draft 1
        self._sampler: Sampler | None = None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.head.config.layers

    @property
    def batch_key(self) -> int:
        return id(self.head)

    def fork(self) -> EagleDrafter:
        return EagleDrafter(self.head, self.capacity)

    def reset(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._unseen, self._seen, self._last = [], 0, None
        self.cache.truncate(0)

    def features(self, rows: torch.Tensor) -> None:
        """The target's features [m, layers, H] of the next m committed tokens."""
        self._unseen.append(rows)

    def backlog(self, context: Sequence[int]) -> int:
        return sum(len(rows) for rows in self._unseen)

    def observe(self, num_accepted: int) -> None:
        pass  # drafted pairs are dropped from the head cache at the next proposal

    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        return self.propose_many([(self, context, k)])[0]

    @staticmethod
    def propose_many(jobs: Sequence[tuple[EagleDrafter, Sequence[int], int]]) -> list[DraftProposal]:
        """Proposals for drafters that share one head: every head step is one pass for all."""
        head = jobs[0][0].head
        drafts: list[list[int]] = [[] for _ in jobs]
        rows: list[list[torch.Tensor]] = [[] for _ in jobs]
        fed = [0] * len(jobs)
        # never past the head's context, nor the target's (RELIABILITY.md D9)
        limits = [min(k, drafter.cache.capacity - len(context)) for drafter, context, k in jobs]
        feeds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # job -> (tokens [n], g [n, H]) to take in
        ready: dict[int, torch.Tensor] = {}  # job -> the h [1, H] whose logits give its next draft
        for idx, (drafter, context, _) in enumerate(jobs):
            if drafter._sampler is None:
                raise RuntimeError("EagleDrafter.propose before reset(sampler)")
            feed = drafter._catch_up(context)
            if feed is not None:
                feeds[idx], fed[idx] = feed, len(feed[0])
            elif drafter._last is not None and drafter._seen == len(context) - 1:
                ready[idx] = drafter._last  # the same context again: no pair to take in
        catching_up = set(feeds)
        while feeds or ready:
            if feeds:
                found = head.step([(tokens, g, jobs[idx][0].cache) for idx, (tokens, g) in feeds.items()])
                for idx, h in zip(list(feeds), found):
                    ready[idx] = h[-1:]
                    if idx in catching_up:
                        jobs[idx][0]._last = h[-1:]
                feeds, catching_up = {}, set()
            for idx, h in ready.items():
                drafter, context, _ = jobs[idx]
                sampler = drafter._sampler
                if limits[idx] <= 0:
                    continue
                history = list(context[len(sampler.prompt_ids):]) + drafts[idx]
                with torch.inference_mode():
                    if _argmax_is_greedy(sampler, len(history)):  # no [V] row to build
                        drafts[idx].append(int(head.draft_ids[int(head.logits(h)[0].argmax())]))
                    else:
                        probs = sampler.probs(head.full_logits(h), history)  # [1, V], zero outside the draft vocabulary
                        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
                            continue  # the request's rules leave no draft-vocabulary token: stop drafting here
                        drafts[idx].append(int(sampler.sample(probs)[0]))
                        rows[idx].append(probs[0])
                if len(drafts[idx]) < limits[idx] and drafts[idx][-1] not in sampler.stop_ids:
                    feeds[idx] = (torch.tensor(drafts[idx][-1:]), h)
            ready = {}
        return [DraftProposal(tokens, torch.stack(r) if r else None, fed[idx])
                for idx, (tokens, r) in enumerate(zip(drafts, rows))]

    def _catch_up(self, context: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Drop the drafted pairs; the unseen pairs (tokens [n], fused g [n, H]) to take in next, or
        None: none is new (the same context again), or the features do not cover the context (the
        drafter joined a sequence late: it drafts nothing for this request)."""
        self.cache.truncate(self._seen)
        n = sum(len(rows) for rows in self._unseen)
        if n == 0:
            return None
        if self._seen + n != len(context) - 1:
            self._unseen, self._last = [], None
            return None
        with torch.inference_mode():
            g = self.head.fuse(torch.cat(self._unseen))
        tokens = torch.tensor(list(context[self._seen + 1:]))
        self._unseen, self._seen = [], self._seen + n
        return tokens, g
