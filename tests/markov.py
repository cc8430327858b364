"""A Markov toy 'model' for statistical end-to-end tests: the logits after a token at position pos
depend on (token, pos) only, so the exact law of a whole output is a product of table rows.

It speaks the model contract the engine and the draft-model drafter use (forward_many, new_cache,
device, max_context), at a fraction of a real forward's cost.
"""

from __future__ import annotations

import torch

from verispec.model.transformer import Segment


class ToyCache:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.length = capacity, 0

    def truncate(self, length: int) -> None:
        assert 0 <= length <= self.length
        self.length = length


class MarkovModel:
    device = torch.device("cpu")

    def __init__(self, table: torch.Tensor, max_context: int = 64) -> None:
        self.table = table  # [positions, vocab, vocab]: logits after token t at position pos
        self.max_context = max_context

    def new_cache(self) -> ToyCache:
        return ToyCache(self.max_context)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: ToyCache, *,
                last_only: bool = False) -> torch.Tensor:
        assert int(positions[0]) == cache.length, "the caller lost track of the cache"
        return self.forward_many([Segment(token_ids, cache, "last" if last_only else "all")])[0]

    def forward_many(self, segments: list[Segment]) -> list[torch.Tensor | None]:
        out = []
        for seg in segments:
            positions = torch.arange(seg.cache.length, seg.cache.length + len(seg.token_ids))
            seg.cache.length += len(seg.token_ids)
            logits = self.table[positions % self.table.shape[0], seg.token_ids]  # [n, vocab]
            out.append(None if seg.logits == "none" else logits[-1:] if seg.logits == "last" else logits)
        return out

    def law(self, prompt_last: int, start: int, length: int, temperature: float) -> torch.Tensor:
        """The exact law of the next `length` tokens after token prompt_last at position start -> [V]*length."""
        vocab = self.table.shape[-1]
        prev = torch.tensor([prompt_last])
        joint = torch.ones(1)
        for i in range(length):
            rows = torch.softmax(self.table[(start + i) % self.table.shape[0]][prev] / temperature, -1)  # [n, V]
            joint = (joint[:, None] * rows).reshape(-1)
            prev = torch.arange(vocab).repeat(vocab ** i)  # the last token of each joint cell, in order
        return joint.reshape([vocab] * length)
