"""SuffixDecoding (Oliaro et al., NeurIPS 2025): propose what most often followed the context's
longest matching suffix, in this request (prompt + output) or in past responses of any request."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from verispec.drafters.base import DraftProposal
from verispec.drafters.suffix_tree import Speculation, SuffixTree
from verispec.errors import InvalidInputError
from verispec.sampling import Sampler

# Tree depth: a match of at most DEPTH // 2 tokens leaves as many below it to draft (tau <= 15).
DEPTH = 32
FACTOR = 2.0  # speculation size per matched token: a longer match earns a longer draft
# The shortest match that earns a draft (but a response's start, matched in the global tree): one
# token's continuation is weak evidence, and drafts on it lower the acceptance the controller
# sees at every match length (Spec-Bench replays under the controller: 1.11x plain with 1, 1.25x
# with 2, where n-gram lookup, which needs 2 too, makes 1.23x)
MIN_MATCH = 2
FLOOR = 0.1  # the least estimated path probability a drafted node may have
BUDGET = 20_000  # tokens of past responses the global tree keeps
# Where a response begins, in the global tree and in the query for it: so a response's first tokens
# can be drafted from how past responses began. Never a token id, and never proposed: nothing
# precedes it, so it is no node's child.
START = -1


class History:
    """The global tree over past responses, shared by every drafter forked from one (a server's
    slots, an LLM's engine); whole responses beyond `budget` tokens are evicted, oldest first.
    Drafters run on the engine thread; the lock covers an LLM used by two threads at once (its own
    engine and a scheduler's), for a few hundred nanoseconds a call."""

    def __init__(self, budget: int = BUDGET, depth: int = DEPTH) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise InvalidInputError(f"suffix budget={budget!r} is not allowed: it must be an integer >= 1 (tokens)")
        self.budget = budget
        self.tree = SuffixTree(depth)
        self.tokens = 0  # held now, at most budget
        self._responses: deque[list[int]] = deque()
        self._lock = threading.Lock()

    def add(self, output_ids: Sequence[int]) -> None:
        """Learn one finished response, START first (of a response longer than the budget, its last
        `budget` tokens without START), then evict whole responses down to the budget."""
        if not output_ids:
            return
        kept = [START, *output_ids] if len(output_ids) < self.budget else output_ids[len(output_ids) - self.budget:]
        response: list[int] = []
        with self._lock:
            for token in kept:
                response.append(int(token))
                self.tree.append(response)
            self.tree.close(response)
            self._responses.append(response)
            self.tokens += len(response)
            while self.tokens > self.budget:
                oldest = self._responses.popleft()
                self.tree.remove(oldest)
                self.tokens -= len(oldest)

    def speculate(self, context: Sequence[int], max_match: int, factor: float, floor: float, limit: int | None,
                  least: int) -> Speculation:
        with self._lock:
            return self.tree.speculate(context, max_match, factor, floor, limit, least=least)


class SuffixDrafter:
    """Two suffix trees: this request's (prompt + committed output, grown by each committed token)
    and the shared History (None: off for this drafter and its forks). Each proposes a speculation
    tree from its longest match; the one with the higher score (expected accepted tokens) wins.
    A request whose params say suffix_global=False neither reads nor feeds the History.
    tree: propose the speculation tree itself (its k most probable nodes), not its best path."""

    def __init__(self, history: History | None = None, depth: int = DEPTH, factor: float = FACTOR,
                 floor: float = FLOOR, tree: bool = False) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise InvalidInputError(f"suffix depth={depth!r} is not allowed: it must be an integer >= 2")
        if not (isinstance(factor, (int, float)) and factor > 0):
            raise InvalidInputError(f"suffix factor={factor!r} is not allowed: it must be a number > 0")
        if not (isinstance(floor, (int, float)) and 0 <= floor <= 1):
            raise InvalidInputError(f"suffix floor={floor!r} is not allowed: it must be a probability in [0, 1]")
        if history is not None and history.tree.depth != depth:
            raise InvalidInputError(f"suffix depth={depth} differs from the global tree's {history.tree.depth}")
        self.history, self.depth, self.factor, self.floor, self.tree = history, depth, factor, floor, tree
        self.reset()

    def fork(self) -> SuffixDrafter:
        return SuffixDrafter(self.history, self.depth, self.factor, self.floor, self.tree)

    def reset(self, sampler: Sampler | None = None) -> None:
        self._restart()
        self._shared = self.history is not None and (sampler is None or sampler.params.suffix_global)
        self._prompt_len = None if sampler is None else len(sampler.prompt_ids)  # None: output unknown

    def _restart(self) -> None:
        self._tree = SuffixTree(self.depth)
        self._context: list[int] = []  # the tokens the request's tree holds (its tails point into it)

    def backlog(self, context: Sequence[int]) -> int:
        return 0  # a token costs a few microseconds to add

    def observe(self, num_accepted: int) -> None:
        pass  # the trees hold committed tokens only: a rejection leaves nothing to roll back

    def finish(self, output_ids: Sequence[int]) -> None:
        """The request ended (stop or length): its output joins the global tree."""
        if self._shared:
            self.history.add(output_ids)

    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        """tree: the speculation tree's k most probable nodes; otherwise its best path, from a tree
        as large as the match allows, so that siblings above the floor do not shorten the chain."""
        if self.tree:
            s = self.speculate(context, k)
            return DraftProposal(s.token_ids, parents=s.parents)
        return DraftProposal(self.speculate(context).best_path()[:k])

    def speculate(self, context: Sequence[int], limit: int | None = None) -> Speculation:
        """The better speculation tree (at most `limit` nodes; None: as many as the match earns)
        of the request's and the global one."""
        self._extend(context)
        max_match = self.depth // 2
        mine = self._tree.speculate(self._context, max_match, self.factor, self.floor, limit, own=1, least=MIN_MATCH)
        if not self._shared:
            return mine
        query = self._query(max_match)
        # a query shorter than MIN_MATCH is START + the output's first token, or START: a response's start
        past = self.history.speculate(query, max_match, self.factor, self.floor, limit,
                                      least=min(MIN_MATCH, len(query)))
        return past if past.score > mine.score else mine

    def _query(self, max_match: int) -> list[int]:
        """What the global tree matches: the context's tail, or START + the output while the output is
        shorter than a match (the tree holds responses, not prompts)."""
        start = len(self._context) - max_match
        if self._prompt_len is not None and start < self._prompt_len:
            return [START, *self._context[self._prompt_len:]]
        return self._context[max(0, start):]

    def _extend(self, context: Sequence[int]) -> None:
        known = len(self._context)
        if len(context) < known or (known and context[known - 1] != self._context[-1]):
            self._restart()  # not a continuation of what the tree holds: start over
        for token in context[len(self._context):]:
            self._context.append(int(token))
            self._tree.append(self._context)
