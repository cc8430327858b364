"""Draft trees. Node 0 is the root (the pending token: the last committed one); parents[j - 1] is the
parent of node j >= 1, always an earlier node, so a node's ancestors precede it and a path read from
the root down is in node order. A chain is the tree whose parents are 0, 1, 2, ... (`chain(n)`)."""

from __future__ import annotations

from collections.abc import Sequence

from verispec.errors import DraftProposalError


def chain(n: int) -> list[int]:
    """The parents of a chain of n nodes after the root."""
    return list(range(n))


def check(parents: Sequence[int], nodes: int) -> None:
    """Refuse parents that do not describe a tree of `nodes` nodes after the root."""
    if len(parents) != nodes:
        raise DraftProposalError(f"{len(parents)} parents for {nodes} draft nodes: one parent per node")
    for j, parent in enumerate(parents, start=1):
        if not isinstance(parent, int) or not 0 <= parent < j:
            raise DraftProposalError(f"parents[{j - 1}] = {parent!r}: node {j}'s parent must be an earlier node "
                                     f"(0 the root, 1..{j - 1} a draft node)")


def depths(parents: Sequence[int]) -> list[int]:
    """[n + 1]: the depth of every node, the root's 0."""
    out = [0]
    for parent in parents:
        out.append(out[parent] + 1)
    return out


def children(parents: Sequence[int]) -> list[list[int]]:
    """[n + 1]: each node's children in node order (the order they are tried in)."""
    out: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for j, parent in enumerate(parents, start=1):
        out[parent].append(j)
    return out


def path(parents: Sequence[int], node: int) -> list[int]:
    """The nodes from the root's child down to `node` (empty for the root), in depth order."""
    out = []
    while node > 0:
        out.append(node)
        node = parents[node - 1]
    return out[::-1]


def is_chain(parents: Sequence[int] | None) -> bool:
    return parents is None or all(parent == j for j, parent in enumerate(parents))
