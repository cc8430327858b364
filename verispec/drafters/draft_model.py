"""A smaller model with the target's tokenizer drafts autoregressively from its own KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verispec.drafters.base import DraftProposal
from verispec.model.transformer import Transformer
from verispec.sampling import Sampler


class DraftModelDrafter:
    """The cache holds a prefix of the context. A proposal keeps the longest prefix it shares with
    the context (rolling back rejected drafts is a truncate), feeds the rest in one forward (the
    recovered or bonus token, and after a full acceptance the last draft: both enter the cache
    here, RELIABILITY.md F2), then draws k tokens one step each from the request's sampler.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.cache = model.new_cache()
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds
        self._sampler: Sampler | None = None

    def reset(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._cached = []
        self.cache.truncate(0)

    def observe(self, num_accepted: int) -> None:
        pass  # the next proposal finds the shared prefix itself

    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        sampler = self._sampler
        if sampler is None:
            raise RuntimeError("DraftModelDrafter.propose before reset(sampler)")
        k = min(k, self.cache.capacity - len(context))  # never past its own context (RELIABILITY.md D9)
        if k <= 0:
            return DraftProposal([])
        shared = 0
        limit = min(len(self._cached), len(context) - 1)  # feed at least one token: its logits are needed
        while shared < limit and self._cached[shared] == context[shared]:
            shared += 1
        self.cache.truncate(shared)
        logits = self._forward(context[shared:], shared)
        history = list(context[len(sampler.prompt_ids):])
        drafts: list[int] = []
        rows: list[torch.Tensor] = []
        while True:
            probs = sampler.probs(logits, history + drafts)  # [1, V]
            drafts.append(int(sampler.sample(probs)[0]))
            rows.append(probs[0])
            if len(drafts) == k or drafts[-1] in sampler.stop_ids:
                break  # a drafted stop id ends the draft: nothing after it could be kept
            logits = self._forward(drafts[-1:], len(context) + len(drafts) - 1)
        self._cached = list(context) + drafts[:-1]
        return DraftProposal(drafts, torch.stack(rows))  # probs [k, V]

    def _forward(self, token_ids: Sequence[int], start: int) -> torch.Tensor:
        device = self.model.device
        positions = torch.arange(start, start + len(token_ids), device=device)
        return self.model.forward(torch.tensor(list(token_ids), device=device), positions, self.cache, last_only=True)
