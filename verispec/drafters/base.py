"""The drafter contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from verispec import tree
from verispec.errors import DraftProposalError
from verispec.sampling import Sampler


@dataclass(frozen=True)
class DraftProposal:
    """token_ids [k]; probs [k, vocab], the distributions the drafts were drawn from, or None
    (a point mass: the verifier treats each draft as proposed with probability 1); fed, the tokens
    the drafter had to take in before drafting (a draft model's cache catching up on the context:
    the whole prompt first, then the tokens committed since its last proposal), whose cost the
    controller learns apart from the cost per draft.

    parents [k] or None (a chain): a tree (verispec/tree.py), parents[i] the parent of draft node
    i + 1, 0 the root (the last committed token). In a sampled tree probs row i is the q node i + 1
    was drawn from, the same for siblings; deterministic children (n-gram, suffix, top-k) come with
    probs None."""

    token_ids: list[int]
    probs: torch.Tensor | None = None
    fed: int = 0
    parents: list[int] | None = None

    def __post_init__(self) -> None:
        k = len(self.token_ids)
        if isinstance(self.fed, bool) or not isinstance(self.fed, int) or self.fed < 0:
            raise DraftProposalError(f"fed={self.fed!r}: the tokens taken in before drafting, an integer >= 0")
        if self.parents is not None:
            tree.check(self.parents, k)
        if self.probs is not None and (self.probs.dim() != 2 or self.probs.shape[0] != k):
            raise DraftProposalError(f"probs of shape {tuple(self.probs.shape)} for {k} drafts: one row of "
                                     f"[{k}, vocab] per draft")

    def head(self, k: int) -> DraftProposal:
        """The first k nodes (a tree stays a tree: parents precede their children)."""
        return self.subset(range(1, min(k, len(self.token_ids)) + 1))

    def subset(self, nodes: Sequence[int]) -> DraftProposal:
        """The draft nodes `nodes` (1-based, ascending, each node's parent among them or the root),
        renumbered in that order; a chain cut this way stays a chain."""
        nodes = list(nodes)
        if nodes == list(range(1, len(self.token_ids) + 1)):
            return self
        index = {0: 0, **{node: i for i, node in enumerate(nodes, start=1)}}
        parents = None if self.parents is None else [index[self.parents[node - 1]] for node in nodes]
        probs = None if self.probs is None else self.probs[[node - 1 for node in nodes]]
        return DraftProposal([self.token_ids[node - 1] for node in nodes], probs, self.fed, parents)


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        """Up to k tokens to follow `context` (prompt + committed output); fewer, or none, is fine."""

    def backlog(self, context: Sequence[int]) -> int:
        """The tokens this drafter would take in before its next proposal after `context` (its
        DraftProposal.fed): the whole context for a cold draft model, 0 for n-gram lookup."""

    def observe(self, num_accepted: int) -> None:
        """How many of the last proposal's tokens the target kept (a drafter rolls back its own state);
        for a tree, the depth of the kept path (its tokens are those committed next)."""

    def fork(self) -> Drafter:
        """A fresh drafter of the same kind and settings for another sequence (weights shared)."""

    def reset(self, sampler: Sampler) -> None:
        """Forget everything: a new request starts; a drafter that samples uses its sampler (params,
        random stream), so that q is shaped like the target's p."""


def feature_layers(drafter: Drafter | None) -> tuple[int, ...]:
    """The target layers whose hidden states the drafter reads (EAGLE-3: its optional
    `feature_layers`, with `features(rows)` to hear them), () for the others."""
    return tuple(getattr(drafter, "feature_layers", ()))


def learns_across_requests(drafter: Drafter | None) -> bool:
    return hasattr(drafter, "finish")


def finish(drafter: Drafter, output_ids: Sequence[int]) -> None:
    """A request ended with these outputs (stop or length; not when cancelled or failed). The
    optional `finish(output_ids)` of a cross-request drafter (suffix) hears it; others have none."""
    if learns_across_requests(drafter):
        drafter.finish(output_ids)  # type: ignore[attr-defined]


def propose_all(jobs: Sequence[tuple[Drafter, Sequence[int], int]]) -> list[DraftProposal]:
    """Proposals for several sequences: (drafter, context, k) each. Drafters with the same
    `batch_key` (draft models sharing weights) draft together through their class's propose_many."""
    groups: dict[object, list[int]] = {}
    for idx, (drafter, _, _) in enumerate(jobs):
        key = getattr(drafter, "batch_key", None)
        groups.setdefault(("alone", idx) if key is None else key, []).append(idx)
    proposals: list[DraftProposal | None] = [None] * len(jobs)
    for members in groups.values():
        first = jobs[members[0]][0]
        if len(members) == 1:
            found = [first.propose(*jobs[members[0]][1:])]
        else:
            found = type(first).propose_many([jobs[idx] for idx in members])
        for idx, proposal in zip(members, found):
            proposals[idx] = proposal
    return proposals  # type: ignore[return-value]
