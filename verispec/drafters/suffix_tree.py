"""A depth-bounded suffix tree with occurrence counts over token sequences, grown one token at a time.

The tree holds every substring of at most `depth` tokens of its sequences; a node's count is the
number of occurrences of its string. A string seen once is not spelled out node by node: it is a
`Tail`, a pointer into its sequence (path compression), so unique text costs one object per
position instead of `depth`, and appending a token costs O(depth) pointer checks, nothing more for
the suffixes that are still unique. A second occurrence walking into a tail makes the shared token
an explicit `Node` (count 2) and moves the tail one token down.

Each sequence keeps its active suffixes (those shorter than `depth` that end at its last token):
an explicit node, or the tail it is the only occurrence of. Tails are moved, never replaced, so a
pointer to one stays right after another suffix splits it. Sequences can be removed whole (the
global tree evicts its oldest responses): every count on their paths drops by one.

A speculation tree (SuffixDecoding, Oliaro et al. 2025) grows from the place matching the
context's longest suffix, best first by estimated path probability, the product of count(child) /
count(parent) along the path; nodes below `floor` are never added. Of equally probable nodes the
most recently seen comes first (prompt lookup's rule: the latest occurrence).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class Node:
    """An explicit node: a string with `count` occurrences, `depth` tokens long, last seen at
    append number `last` (eviction does not lower it: it only breaks ties)."""

    __slots__ = ("count", "depth", "last", "children")

    def __init__(self, count: int, depth: int, last: int) -> None:
        self.count, self.depth, self.last = count, depth, last
        self.children: dict[int, Node | Tail] = {}


class Tail:
    """The one occurrence of the strings below `parent` that go on as tokens[pos:]: count 1, seen
    at append number `last`."""

    __slots__ = ("tokens", "pos", "parent", "last")

    def __init__(self, tokens: list[int], pos: int, parent: Node, last: int) -> None:
        self.tokens, self.pos, self.parent, self.last = tokens, pos, parent, last


# A place in the tree: an explicit node, or `offset` (>= 1) tokens into a tail.
Place = Node | tuple[Tail, int]


@dataclass(frozen=True)
class Speculation:
    """A speculation tree: token_ids [n]; parents [n], parents[i] the parent of node i + 1 (0: the
    root, the pending token; j >= 1: node j), parents before children; scores [n], each node's
    estimated path probability. `match` is the length of the context suffix it grew from."""

    token_ids: list[int]
    parents: list[int]
    scores: list[float]
    match: int = 0

    @property
    def score(self) -> float:
        """The expected number of accepted tokens if each node's estimate were right."""
        return sum(self.scores)

    def best_path(self) -> list[int]:
        """From the root, the most probable child at each step (the first of equals)."""
        best: dict[int, int] = {}  # parent -> its most probable child (node index, 1-based)
        for node, parent in enumerate(self.parents, 1):
            if parent not in best or self.scores[node - 1] > self.scores[best[parent] - 1]:
                best[parent] = node
        path, node = [], 0
        while node in best:
            node = best[node]
            path.append(self.token_ids[node - 1])
        return path


EMPTY = Speculation([], [], [])


class SuffixTree:
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.root = Node(0, 0, 0)
        self._clock = 0  # appends so far: when a node was last seen
        self._active: dict[int, deque[Node | Tail]] = {}  # sequence id -> its active suffixes, oldest first

    # --- growing and shrinking --------------------------------------------------------------------
    def append(self, tokens: list[int]) -> None:
        """tokens (a sequence's own list, already holding the new token) gained one token at its end."""
        active = self._active.setdefault(id(tokens), deque())
        self._clock += 1
        pos = len(tokens) - 1
        token = tokens[pos]
        active.append(self.root)  # the suffix that starts at the new token
        for idx, place in enumerate(active):
            if type(place) is Node:  # a suffix inside its own tail grows with the sequence: nothing to do
                active[idx] = self._descend(place, token, tokens, pos)
        if len(active) == self.depth:  # the oldest suffix is `depth` long: it stops here
            active.popleft()

    def close(self, tokens: list[int]) -> None:
        """tokens will not grow any more: forget its active suffixes."""
        self._active.pop(id(tokens), None)

    def remove(self, tokens: list[int]) -> None:
        """Take a whole, closed sequence out: one occurrence fewer on every path it made."""
        self.close(tokens)
        for start in range(len(tokens)):
            node = self.root
            for pos in range(start, min(start + self.depth, len(tokens))):
                child = node.children[tokens[pos]]
                if type(child) is Tail:  # this occurrence was the only one from here down
                    del node.children[tokens[pos]]
                    break
                child.count -= 1
                if child.count == 0:
                    del node.children[tokens[pos]]
                    break
                node = child

    def _descend(self, node: Node, token: int, tokens: list[int], pos: int) -> Node | Tail:
        """One more occurrence of node's string followed by `token` (at tokens[pos])."""
        child = node.children.get(token)
        if child is None:
            tail = Tail(tokens, pos, node, self._clock)
            node.children[token] = tail
            return tail
        if type(child) is Node:
            child.count += 1
            child.last = self._clock
            return child
        # the one earlier occurrence goes on with `token` too: that token becomes a shared node
        shared = Node(2, node.depth + 1, self._clock)
        node.children[token] = shared
        child.pos += 1
        child.parent = shared
        if child.pos < len(child.tokens) and shared.depth < self.depth:
            shared.children[child.tokens[child.pos]] = child
        return shared

    # --- reading ----------------------------------------------------------------------------------
    def count(self, place: Place) -> int:
        return place.count if type(place) is Node else 1

    @staticmethod
    def last(place: Place) -> int:
        return place.last if type(place) is Node else place[0].last

    def children(self, place: Place) -> Iterator[tuple[int, Place]]:
        if type(place) is Node:
            for token, child in place.children.items():
                yield token, (child if type(child) is Node else (child, 1))
            return
        tail, offset = place
        if offset < self._length(tail):
            yield tail.tokens[tail.pos + offset], (tail, offset + 1)

    def _length(self, tail: Tail) -> int:
        return min(len(tail.tokens) - tail.pos, self.depth - tail.parent.depth)

    def find(self, query: Sequence[int]) -> Place | None:
        """The place of the string `query`, or None when it does not occur."""
        place: Place | None = self.root
        for token in query:
            if type(place) is Node:
                child = place.children.get(token)
                place = child if child is None or type(child) is Node else (child, 1)
            else:
                tail, offset = place
                inside = offset < self._length(tail) and tail.tokens[tail.pos + offset] == token
                place = (tail, offset + 1) if inside else None
            if place is None:
                return None
        return place

    def match(self, context: Sequence[int], max_len: int, own: int) -> tuple[int, Place | None]:
        """The longest suffix of context (at most max_len) with a continuation: more than `own`
        occurrences (own = 1 when context's own end is in the tree) and a child. Whether a suffix
        has one only gets less likely as it grows, so the length is found by binary search."""
        def place_of(m: int) -> Place | None:
            place = self.find(context[len(context) - m:])
            if place is None or self.count(place) <= own or next(self.children(place), None) is None:
                return None
            return place

        low, high, found = 0, min(max_len, len(context), self.depth - 1), None
        while low < high:  # invariant: a suffix of length `low` qualifies (0: the empty one)
            mid = (low + high + 1) // 2
            place = place_of(mid)
            if place is None:
                high = mid - 1
            else:
                low, found = mid, place
        return low, found

    def speculate(self, context: Sequence[int], max_match: int, factor: float, floor: float, limit: int | None,
                  own: int = 0, least: int = 1) -> Speculation:
        """The speculation tree after context: at most ceil(factor * match length) nodes (and at
        most limit, unless None), best first by path probability, none below floor; none from a
        match shorter than `least`."""
        match, place = self.match(context, max_match, own)
        size = math.ceil(factor * match) if limit is None else min(limit, math.ceil(factor * match))
        if place is None or size <= 0 or match < least:
            return EMPTY
        token_ids: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        # (-probability, -last seen, order, parent, token, place): the most probable, then the most recent
        heap: list[tuple[float, int, int, int, int, Place]] = []
        order = itertools.count()

        def grow(parent: int, place: Place, probability: float, denominator: int) -> None:
            for token, child in self.children(place):
                p = probability * self.count(child) / denominator
                if p >= floor:
                    heapq.heappush(heap, (-p, -self.last(child), next(order), parent, token, child))

        grow(0, place, 1.0, self.count(place) - own)  # the context's own occurrence has no continuation
        while heap and len(token_ids) < size:
            negative, _, _, parent, token, child = heapq.heappop(heap)
            token_ids.append(token)
            parents.append(parent)
            scores.append(-negative)
            grow(len(token_ids), child, -negative, self.count(child))
        return Speculation(token_ids, parents, scores, match)
