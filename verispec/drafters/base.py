"""The drafter contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from verispec.sampling import Sampler


@dataclass(frozen=True)
class DraftProposal:
    """token_ids [k]; probs [k, vocab], the distributions the drafts were drawn from, or None
    (a point mass: the verifier treats each draft as proposed with probability 1)."""

    token_ids: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        """Up to k tokens to follow `context` (prompt + committed output); fewer, or none, is fine."""

    def observe(self, num_accepted: int) -> None:
        """How many of the last proposal's tokens the target kept (a drafter rolls back its own state)."""

    def reset(self, sampler: Sampler) -> None:
        """Forget everything: a new request starts; a drafter that samples uses its sampler (params,
        random stream), so that q is shaped like the target's p."""
