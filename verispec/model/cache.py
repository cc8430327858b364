"""A static, position-indexed KV cache: allocated once, rolled back by a length change."""

from __future__ import annotations

import torch

from verispec.errors import ContextOverflowError, ModelLoadError

# Attention reads the cache in fixed blocks of this many positions (see kernels.attention), so the
# storage is a whole number of blocks; the capacity (the positions a sequence may use) is exactly the
# context asked for, the length of the RoPE tables.
BLOCK = 64


class KVCache:
    """Keys and values of one sequence for every layer.

    k, v: [num_layers, num_kv_heads, capacity rounded up to a multiple of BLOCK, head_dim]. Positions
    >= length hold stale values that the next forward overwrites; attention never reads them (it
    masks by position).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_kv_heads, -(-capacity // BLOCK) * BLOCK, head_dim)
        need = 2 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        _check_memory(need, capacity, device)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget every position >= length (a rollback): O(1), nothing is copied."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}) outside [0, {self.length}]")
        self.length = length

    def keep(self, start: int, rows: list[int]) -> None:
        """After a draft tree's forward, keep its path: the entries at slots start + rows[i] (rows
        increasing, rows[0] = 0 the root) move to start + i in every layer, and the cache ends there,
        so it holds what a chain of the kept tokens would have written and rollback stays a length change."""
        if rows != sorted(set(rows)) or not rows or rows[0] != 0 or start + rows[-1] >= self.length:
            raise ValueError(f"keep({start}, {rows}): rows must rise from 0 and lie below {self.length - start}")
        if rows[-1] != len(rows) - 1:  # a chain is already in place
            src = torch.tensor(rows, device=self.k.device) + start
            for t in (self.k, self.v):
                t[:, :, start: start + len(rows)] = t[:, :, src]  # the gather copies before the write
        self.truncate(start + len(rows))

    def copy_prefix(self, other: KVCache, length: int) -> None:
        """Hold other's first `length` positions (a prompt another sequence prefilled) and nothing after."""
        if not 0 <= length <= min(other.length, self.capacity) or other.k.shape[:2] != self.k.shape[:2]:
            raise ValueError(f"copy_prefix({length}) from a cache of {other.length} positions into one of {self.capacity}")
        self.k[:, :, :length] = other.k[:, :, :length]
        self.v[:, :, :length] = other.v[:, :, :length]
        self.length = length

    def reserve(self, num_new: int) -> None:
        if self.length + num_new > self.capacity:
            raise ContextOverflowError(
                f"{self.length} cached + {num_new} new tokens exceed the context capacity of {self.capacity} tokens"
            )

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _check_memory(need: int, capacity: int, device: torch.device) -> None:
    """Refuse a context that cannot fit now, rather than failing mid-generation."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            free = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return
    if need > free:
        raise ModelLoadError(
            f"a KV cache for {capacity} tokens needs {need / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is "
            f"free on {device}; choose a smaller max_context"
        )
