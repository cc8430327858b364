"""Prompt lookup: propose what followed earlier occurrences of the context's suffix: the most recent
one's continuation (a chain), or several merged into a tree (siblings where they part)."""

from __future__ import annotations

from collections.abc import Sequence

from verispec.drafters.base import DraftProposal
from verispec.errors import InvalidInputError
from verispec.sampling import Sampler

MATCHES = 8  # earlier occurrences a tree merges, the most recent ones


class NgramDrafter:
    """Matches the last n tokens (n from max_n down to min_n) against the earlier context.

    The index maps each n-gram to the positions after its latest occurrences and grows with the
    context (each position is indexed once), so a proposal costs O(max_n), not a rescan. A chain is
    what followed the latest occurrence. A tree (tree=True) merges what followed the latest MATCHES
    occurrences into a trie and keeps its k most frequent nodes (a node's weight: the occurrences
    whose continuation passes through it; of equals, the shallower, then the more recent first).
    """

    def __init__(self, min_n: int = 2, max_n: int = 4, tree: bool = False) -> None:
        if not 1 <= min_n <= max_n:
            raise InvalidInputError(f"ngram sizes min_n={min_n}, max_n={max_n} are not allowed: need 1 <= min_n <= max_n")
        self.min_n, self.max_n, self.tree = min_n, max_n, tree
        self.reset()

    def fork(self) -> NgramDrafter:
        return NgramDrafter(self.min_n, self.max_n, self.tree)

    def reset(self, sampler: Sampler | None = None) -> None:
        self._index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions after it, oldest first
        self._context: list[int] = []

    def backlog(self, context: Sequence[int]) -> int:
        return 0  # indexing new tokens costs next to nothing

    def observe(self, num_accepted: int) -> None:
        pass  # the index holds committed tokens only, so a rejection leaves nothing to roll back

    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        self._extend(context)
        ctx = self._context
        for n in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            follows = self._index.get(tuple(ctx[-n:]))
            if follows is not None:
                if not self.tree:
                    return DraftProposal(ctx[follows[-1]: follows[-1] + k])
                return merge([ctx[f: f + k] for f in reversed(follows[-MATCHES:])], k)
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
                    self._index.setdefault(tuple(self._context[end + 1 - n: end + 1]), []).append(end + 1)


def merge(continuations: list[list[int]], k: int) -> DraftProposal:
    """The continuations (most recent first) as a trie, cut to its k heaviest nodes (weight: how many
    continuations pass through; of equals the shallower, then the earlier made, first). A parent is
    at least as heavy and shallower than its child, so the nodes kept form a tree, in that order."""
    trie: dict[tuple[int, int], int] = {}  # (trie parent, token) -> trie node (1-based)
    parent_of, token_of, weight, depth = [0], [0], [0], [0]  # per trie node; node 0 is the root
    for tokens in continuations:
        node = 0
        for token in tokens:
            child = trie.get((node, token))
            if child is None:
                child = trie[node, token] = len(token_of)
                parent_of.append(node), token_of.append(token), weight.append(0), depth.append(depth[node] + 1)
            weight[child] += 1
            node = child
    kept = sorted(range(1, len(token_of)), key=lambda v: (-weight[v], depth[v], v))[:k]
    place = {0: 0} | {v: i for i, v in enumerate(kept, 1)}  # trie node -> proposal node
    return DraftProposal([token_of[v] for v in kept], parents=[place[parent_of[v]] for v in kept])
