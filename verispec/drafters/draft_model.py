"""A smaller model with the target's tokenizer drafts autoregressively from its own KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verispec.drafters.base import DraftProposal
from verispec.model.transformer import Segment, Transformer
from verispec.sampling import Sampler


class DraftModelDrafter:
    """The cache holds a prefix of the context. A proposal keeps the longest prefix it shares with
    the context (rolling back rejected drafts is a truncate), feeds the rest in one forward (the
    recovered or bonus token, and after a full acceptance the last draft: both enter the cache
    here, RELIABILITY.md F2), then draws k tokens one step each from the request's sampler.

    Drafters over the same model draft together (`propose_many`): each step is one forward for all.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.cache = model.new_cache()
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds
        self._context_len = 0  # the length of the context the last proposal drafted after
        self._sampler: Sampler | None = None

    @property
    def batch_key(self) -> int:
        return id(self.model)

    def fork(self) -> DraftModelDrafter:
        return DraftModelDrafter(self.model)

    def reset(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._cached, self._context_len = [], 0
        self.cache.truncate(0)

    def backlog(self, context: Sequence[int]) -> int:
        return len(context) - self._shared(context)

    def observe(self, num_accepted: int) -> None:
        pass  # the next proposal finds the shared prefix itself

    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        return self.propose_many([(self, context, k)])[0]

    @staticmethod
    def propose_many(jobs: Sequence[tuple[DraftModelDrafter, Sequence[int], int]]) -> list[DraftProposal]:
        """Proposals for drafters that share one model: every drafting step is one batched forward."""
        model = jobs[0][0].model
        # never past a drafter's own context (RELIABILITY.md D9)
        limits = [min(k, drafter.cache.capacity - len(context)) for drafter, context, k in jobs]
        drafts: list[list[int]] = [[] for _ in jobs]
        rows: list[list[torch.Tensor]] = [[] for _ in jobs]
        feeds: dict[int, Segment] = {}  # job index -> what its cache takes next
        for idx, (drafter, context, _) in enumerate(jobs):
            if drafter._sampler is None:
                raise RuntimeError("DraftModelDrafter.propose before reset(sampler)")
            if limits[idx] > 0:
                feeds[idx] = drafter._catch_up(context)
        fed = {idx: len(segment.token_ids) for idx, segment in feeds.items()}
        while feeds:
            logits = model.forward_many(list(feeds.values()))
            for idx, row in zip(list(feeds), logits):
                drafter, context, _ = jobs[idx]
                sampler = drafter._sampler
                history = list(context[len(sampler.prompt_ids):]) + drafts[idx]
                probs = sampler.probs(row, history)  # [1, V]
                drafts[idx].append(int(sampler.sample(probs)[0]))
                rows[idx].append(probs[0])
                del feeds[idx]
                if len(drafts[idx]) < limits[idx] and drafts[idx][-1] not in sampler.stop_ids:  # a drafted stop id
                    feeds[idx] = Segment(torch.tensor(drafts[idx][-1:], device=model.device),  # ends the draft
                                         drafter.cache, "last")
        for (drafter, context, _), tokens in zip(jobs, drafts):
            if tokens:
                drafter._cached = list(context) + tokens[:-1]
                drafter._context_len = len(context)
        return [DraftProposal(tokens, torch.stack(r) if r else None, fed.get(idx, 0))
                for idx, (tokens, r) in enumerate(zip(drafts, rows))]

    def _shared(self, context: Sequence[int]) -> int:
        """The cached prefix shared with context, short of its last token (whose logits are needed).
        The context a proposal drafted after is normally still a prefix (a request only grows): then
        the scan starts at its end instead of at token 0."""
        limit = min(len(self._cached), len(context) - 1)
        start = min(self._context_len, limit)
        if start and self._cached[start - 1] != context[start - 1]:
            start = 0  # another context: compare from the start
        shared = start
        while shared < limit and self._cached[shared] == context[shared]:
            shared += 1
        return shared

    def _catch_up(self, context: Sequence[int]) -> Segment:
        """Keep the cached prefix shared with context; the rest is what the cache takes next."""
        shared = self._shared(context)
        self.cache.truncate(shared)
        return Segment(torch.tensor(list(context[shared:]), device=self.model.device), self.cache, "last")
