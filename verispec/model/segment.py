"""One sequence's part of a batched forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from verispec import tree
from verispec.model.cache import KVCache


@dataclass
class Segment:
    """New tokens that continue `cache` (from cache.length on).

    logits: which rows to return, "all" (verify), "last" (the end of a draft model's feed) or
    "none" (a prefill chunk).

    parents: None (a chain: row j at position cache.length + j) or a tree over the rows (verispec/tree.py,
    row 0 the root, parents[j - 1] row j's parent): row j sees the cache, its ancestors and itself, at
    position cache.length + its depth, so its logits are those of its path verified as a chain. Its key
    and value still go to slot cache.length + j; the caller moves the kept path into place.

    capture: layer indices whose input (the residual stream entering layer i; the number of layers:
    leaving the last, before the final norm) the forward hands back in `features` [n, len(capture),
    hidden], every row's (a drafter that reads the target's hidden states: EAGLE-3). Segments of one
    forward that capture ask for the same layers.
    """

    token_ids: torch.Tensor  # [n]
    cache: KVCache
    logits: Literal["all", "last", "none"] = "all"
    parents: list[int] | None = None  # [n - 1]
    capture: tuple[int, ...] = ()
    features: torch.Tensor | None = None  # [n, len(capture), hidden], set by the forward

    def positions(self) -> list[int]:
        """[n]: each row's position (its RoPE angle; the length of the chain it ends)."""
        start, n = self.cache.length, self.token_ids.shape[0]
        return list(range(start, start + n)) if self.parents is None else [start + d for d in tree.depths(self.parents)]
