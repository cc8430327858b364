"""One sequence's part of a batched forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from verispec.model.cache import KVCache


@dataclass
class Segment:
    """New tokens that continue `cache` (from cache.length on).

    logits: which rows to return, "all" (verify), "last" (the end of a draft model's feed) or
    "none" (a prefill chunk).
    """

    token_ids: torch.Tensor  # [n]
    cache: KVCache
    logits: Literal["all", "last", "none"] = "all"
