"""Prompt lookup: propose what followed the most recent earlier occurrence of the context's suffix."""

from __future__ import annotations

from collections.abc import Sequence

from verispec.drafters.base import DraftProposal
from verispec.errors import InvalidInputError
from verispec.sampling import Sampler


class NgramDrafter:
    """Matches the last n tokens (n from max_n down to min_n) against the earlier context.

    The index maps each n-gram to the position after its latest occurrence and grows with the
    context (each position is indexed once), so a proposal costs O(max_n), not a rescan.
    """

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise InvalidInputError(f"ngram sizes min_n={min_n}, max_n={max_n} are not allowed: need 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n
        self.reset()

    def fork(self) -> NgramDrafter:
        return NgramDrafter(self.min_n, self.max_n)

    def reset(self, sampler: Sampler | None = None) -> None:
        self._index: dict[tuple[int, ...], int] = {}
        self._context: list[int] = []

    def backlog(self, context: Sequence[int]) -> int:
        return 0  # indexing new tokens costs next to nothing

    def observe(self, num_accepted: int) -> None:
        pass  # the index holds committed tokens only, so a rejection leaves nothing to roll back

    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        self._extend(context)
        ctx = self._context
        for n in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            follow = self._index.get(tuple(ctx[-n:]))
            if follow is not None:
                return DraftProposal(ctx[follow: follow + k])
        return DraftProposal([])

    def _extend(self, context: Sequence[int]) -> None:
        """Index every n-gram whose continuation is known: those ending before the last token."""
        known = len(self._context)
        if len(context) < known or (known and context[known - 1] != self._context[-1]):
            self.reset()  # not a continuation of what was indexed: start over
        start = max(len(self._context) - 1, 0)
        self._context.extend(context[len(self._context):])
        for end in range(start, len(self._context) - 1):  # n-gram ends at `end`, continues at end + 1
            for n in range(self.min_n, self.max_n + 1):
                if end + 1 - n >= 0:
                    self._index[tuple(self._context[end + 1 - n: end + 1])] = end + 1
