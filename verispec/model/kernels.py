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


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   masks: list[tuple[int, torch.Tensor]], scale: float, start: int, paths: list[list[int]]
                   ) -> torch.Tensor:
    """`attention` for the queries of a draft tree: query i sees the cache's positions < start, then the
    slots paths[i] (the root at `start`, the ancestors, itself) as if they lay at positions start,
    start + 1, ... So it reduces over the keys of the chain that ends at it, in that chain's blocks and
    order, and its output is the chain's bit for bit. masks: attention_masks of the queries' positions
    (start + depth); paths [n]: slots."""
    kv_heads, _, d = k_cache.shape
    outs = []
    for part, (blocks, hidden), group_paths in zip(q.split(ROWS), masks, _split(paths)):
        rows = _rows(part, kv_heads)
        head = start // BLOCK  # blocks wholly before the root: the same keys for every query
        stats = [_block_stats(rows, _blocks(k_cache, 0, head), _blocks(v_cache, 0, head), hidden[:head], scale)]
        # the later blocks, one copy per query with its path in place: [kv_heads, queries * tail, BLOCK, d]
        queries, tail = part.shape[0], blocks - head
        slots = torch.tensor([_tail_slots(path, head * BLOCK, tail * BLOCK, start) for path in group_paths],
                             device=k_cache.device).view(-1)
        keys = k_cache[:, slots].view(kv_heads, queries * tail, BLOCK, d)
        values = v_cache[:, slots].view(kv_heads, queries * tail, BLOCK, d)
        every = _block_stats(rows, keys, values, hidden[head:].repeat(queries, 1, 1), scale)
        # keep query i's rows of its own copy: [kv_heads, tail, group * queries, x]
        stats.append(tuple(_own_copy(t, queries, tail) for t in every))
        outs.append(_merge(*(torch.cat(parts, dim=1) for parts in zip(*stats)), part.shape))
    return torch.cat(outs)


def _split(paths: list[list[int]]) -> list[list[list[int]]]:
    return [paths[i: i + ROWS] for i in range(0, len(paths), ROWS)]


def _tail_slots(path: list[int], first: int, count: int, start: int) -> list[int]:
    """The slots that positions first..first + count - 1 read for a query whose keys from `start` on
    lie at `path`; positions past its path are masked (any slot will do: the root's)."""
    return [pos if pos < start else path[pos - start] if pos - start < len(path) else start
            for pos in range(first, first + count)]


def _own_copy(t: torch.Tensor, queries: int, tail: int) -> torch.Tensor:
    kv_heads, _, rows, x = t.shape
    t = t.view(kv_heads, queries, tail, rows // queries, queries, x)
    return t.diagonal(dim1=1, dim2=4).movedim(-1, 3).reshape(kv_heads, tail, rows, x)


def _attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: int, hidden: torch.Tensor,
                    scale: float) -> torch.Tensor:
    rows = _rows(q, k_cache.shape[0])
    stats = _block_stats(rows, _blocks(k_cache, 0, blocks), _blocks(v_cache, 0, blocks), hidden, scale)
    return _merge(*stats, q.shape)


def _blocks(cache: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """cache [kv_heads, capacity, d] -> its blocks first..last - 1, [kv_heads, last - first, BLOCK, d]."""
    return cache[:, first * BLOCK: last * BLOCK].view(cache.shape[0], last - first, BLOCK, cache.shape[-1])


def _rows(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [n, heads, d] -> rows (query head in its group, query): [kv_heads, group * n, d]."""
    n, heads, d = q.shape
    return q.view(n, kv_heads, heads // kv_heads, d).permute(1, 2, 0, 3).reshape(kv_heads, heads // kv_heads * n, d)


def _block_stats(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each block's softmax pieces: rows [kv_heads, r, d], k, v [kv_heads, blocks, BLOCK, d], hidden
    [blocks, r, BLOCK] -> block max, sum [kv_heads, blocks, r, 1] and weighted values [kv_heads, blocks, r, d]."""
    # keys @ queries^T keeps each query's scores independent of the other queries.
    scores = (k @ rows.transpose(1, 2).unsqueeze(1)).transpose(2, 3) * scale  # [kv_heads, blocks, r, BLOCK]
    scores = scores.masked_fill(hidden, float("-inf"))
    block_max = scores.amax(-1, keepdim=True)
    empty = torch.isinf(block_max)
    weights = torch.exp(scores - block_max.masked_fill(empty, 0.0))
    return block_max, weights.sum(-1, keepdim=True), weights @ v


def _merge(block_max: torch.Tensor, block_sum: torch.Tensor, block_out: torch.Tensor, shape: torch.Size
           ) -> torch.Tensor:
    """Merge blocks in position order; a block with nothing visible contributes exact zeros. -> [n, heads * d]."""
    n, heads, d = shape
    kv_heads = block_max.shape[0]
    top = block_max.amax(1, keepdim=True)
    rescale = torch.exp(block_max - top).masked_fill(torch.isinf(block_max), 0.0)
    out = (block_out * rescale).sum(1) / (block_sum * rescale).sum(1)  # [kv_heads, group*n, d]
    return out.view(kv_heads, heads // kv_heads, n, d).permute(2, 0, 1, 3).reshape(n, heads * d)
