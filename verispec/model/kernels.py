"""The torch backend's row-invariant fp32 ops.

Greedy speculation is exact only if the logits of a position do not depend on how many positions
one forward carries: a k-row verify must round exactly like a one-row decode. CPU GEMM kernels do not
promise this (MKL takes a GEMV path for one row and re-blocks the reduction as rows grow, differently
on every instruction set), so the torch backend runs every row-mixing op on groups of exactly ROWS
rows (its callers pad) and attention reduces over fixed blocks of positions. tests/test_invariance.py
holds this property on the machine that runs the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from verispec.model.cache import BLOCK

ROWS = 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d] normalised over d, times weight [d] (gemma's 1 + w is folded in at load)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [n, heads, d]; cos, sin [n, 1, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


def attention_masks(positions: torch.Tensor, group: int, window: int | None) -> list[tuple[int, torch.Tensor]]:
    """What `attention` hides from queries at `positions` [n, a multiple of ROWS]: per group of ROWS queries,
    (blocks, hidden [blocks, group * n_rows, BLOCK]), True where a key is in the future or out of the
    window. The same for every layer of a forward, so computed once per forward."""
    masks = []
    for pos in positions.split(ROWS):
        blocks = int(pos[-1]) // BLOCK + 1
        key_pos = torch.arange(blocks * BLOCK, device=pos.device).view(blocks, 1, BLOCK)
        query_pos = pos.repeat(group).view(1, group * pos.shape[0], 1)
        hidden = key_pos > query_pos
        if window is not None:
            hidden |= key_pos <= query_pos - window
        masks.append((blocks, hidden))
    return masks


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, masks: list[tuple[int, torch.Tensor]],
              scale: float) -> torch.Tensor:
    """Causal attention of n queries over the cache, reduced over fixed blocks of BLOCK positions.

    q [n, heads, d]; k_cache, v_cache [kv_heads, capacity, d], already holding the keys and values of
    every position a query sees; masks from attention_masks for these queries. Returns [n, heads * d].
    """
    return torch.cat([_attention_rows(part, k_cache, v_cache, blocks, hidden, scale)
                      for part, (blocks, hidden) in zip(q.split(ROWS), masks)])


def _attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: int, hidden: torch.Tensor,
                    scale: float) -> torch.Tensor:
    n, heads, d = q.shape
    kv_heads = k_cache.shape[0]
    group = heads // kv_heads
    k = k_cache[:, : blocks * BLOCK].view(kv_heads, blocks, BLOCK, d)
    v = v_cache[:, : blocks * BLOCK].view(kv_heads, blocks, BLOCK, d)
    # Rows are (query head in its group, query): [kv_heads, group * n, d]
    rows = q.view(n, kv_heads, group, d).permute(1, 2, 0, 3).reshape(kv_heads, group * n, d)
    # keys @ queries^T keeps each query's scores independent of the other queries.
    scores = (k @ rows.transpose(1, 2).unsqueeze(1)).transpose(2, 3) * scale  # [kv_heads, blocks, group*n, BLOCK]
    scores = scores.masked_fill(hidden, float("-inf"))
    block_max = scores.amax(-1, keepdim=True)  # [kv_heads, blocks, group*n, 1]
    empty = torch.isinf(block_max)
    weights = torch.exp(scores - block_max.masked_fill(empty, 0.0))
    block_sum = weights.sum(-1, keepdim=True)
    block_out = weights @ v  # [kv_heads, blocks, group*n, d]
    # Merge blocks in position order; a block with nothing visible contributes exact zeros.
    top = block_max.amax(1, keepdim=True)
    rescale = torch.exp(block_max - top).masked_fill(empty, 0.0)
    out = (block_out * rescale).sum(1) / (block_sum * rescale).sum(1)  # [kv_heads, group*n, d]
    return out.view(kv_heads, group, n, d).permute(2, 0, 1, 3).reshape(n, heads * d)
