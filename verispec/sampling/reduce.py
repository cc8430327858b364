"""Per-row reductions over the vocabulary that every decoding step pays for: the greedy argmax,
and the log-probabilities of emitted tokens with the likeliest alternatives (logprobs).

On the CPU torch spends 25-45 µs on each over one row of 49 152 logits (its argmax, logsumexp and
topk kernels), and more once a forward has flushed the caches. Here the argmax is numpy's (5 µs),
and the logsumexp and top k of a cycle's rows (of logits, or the top k of probabilities) are one
call of csrc/rows.c (AVX2), or, where it was not built, numpy's exp over a private buffer and a
grouped search for the top k. Either way a row reduces the
same wherever it lies in memory (numpy's SIMD sums start at the first aligned element, hence the
buffer; the kernel sums from the row's first entry), so a row verified at any position of a
forward gives exactly what the same row gives alone, and speculation reports plain decoding's
numbers. Other devices use torch's kernels.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import torch

GROUPS = 64  # the top-k search lays a row out [GROUPS, V // GROUPS]

# per emitted token: (its log-probability, the k likeliest (id, log-probability), best first, less
# those that cannot be drawn: log-probability -inf)
Entry = tuple[float, tuple[tuple[int, float], ...]]


def argmax(x: torch.Tensor) -> tuple[list[int], bool]:
    """x [rows, V] -> (each row's first maximal id, as x.argmax(-1); whether every row's maximum is
    finite: NaN propagates into a maximum, and +inf or an all -inf row shows there too)."""
    if x.device.type != "cpu":
        best = x.max(-1)
        return best.indices.tolist(), bool(torch.isfinite(best.values).all())
    a = x.detach().numpy()
    ids = a.argmax(-1)
    return ids.tolist(), bool(np.isfinite(a[np.arange(len(a)), ids]).all())


def log_softmax_entries(x: torch.Tensor, at: Sequence[int], ids: Sequence[int], k: int) -> list[Entry]:
    """x [R, V] logits (float32; -inf where masked) -> for each j, log_softmax(x[at[j]]) at ids[j]
    and at the k likeliest ids, read without making the whole log-softmax."""
    if x.device.type != "cpu":
        rows = x[torch.tensor(list(at), device=x.device)]
        lse = torch.logsumexp(rows, -1, keepdim=True)
        chosen = (rows.gather(1, torch.tensor(list(ids), device=x.device)[:, None]) - lse)[:, 0].tolist()
        values, top_ids = torch.topk(rows, k, -1)
        return list(zip(chosen, map(_drawable, top_ids.tolist(), (values - lse).tolist())))
    a = x.detach().numpy()
    if (kernel := _kernel()) is not None and a.dtype == np.float32 and a.flags.c_contiguous:
        return kernel(a.ctypes.data, *a.shape, at, ids, k, True)
    buffer = _buffer(a.shape[1])
    out = []
    for r, token in zip(at, ids):
        row = a[r]
        m = row.max()
        if np.isneginf(m):  # every entry masked: nothing can be drawn here
            out.append((float("-inf"), ()))
            continue
        np.subtract(row, m, out=buffer)
        np.exp(buffer, out=buffer)
        lse = m + np.log(buffer.sum(dtype=np.float32))
        best = _top(row, k)
        out.append((float(row[token] - lse), _drawable(best.tolist(), (row[best] - lse).tolist())))
    return out


def log_entries(q: torch.Tensor, at: Sequence[int], ids: Sequence[int], k: int) -> list[Entry]:
    """q [R, V] probabilities -> for each j, log q[at[j]] at ids[j] and at the k likeliest ids."""
    if q.device.type != "cpu":
        rows = q[torch.tensor(list(at), device=q.device)]
        chosen = torch.log(rows.gather(1, torch.tensor(list(ids), device=q.device)[:, None]))[:, 0].tolist()
        values, top_ids = torch.topk(rows, k, -1)
        return list(zip(chosen, map(_drawable, top_ids.tolist(), torch.log(values).tolist())))
    a = q.detach().numpy()
    if (kernel := _kernel()) is not None and a.dtype == np.float32 and a.flags.c_contiguous:
        return kernel(a.ctypes.data, *a.shape, at, ids, k, False)
    with np.errstate(divide="ignore"):  # log 0 = -inf: a token that cannot be drawn
        return [(float(np.log(a[r, token])), _drawable((best := _top(a[r], k)).tolist(), np.log(a[r, best]).tolist()))
                for r, token in zip(at, ids)]


def _drawable(ids: list[int], values: list[float]) -> tuple[tuple[int, float], ...]:
    """The (id, log-probability) pairs whose token can be drawn (above -inf), in order."""
    return tuple((i, v) for i, v in zip(ids, values) if v != float("-inf"))


@cache
def _kernel() -> Any:
    """csrc/rows.c's entries, where it was built and the CPU has AVX2 (else None: numpy serves)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from verispec.sampling import _rows
    except ImportError:
        return None
    return _rows.entries


_local = threading.local()  # a scratch row per thread (the engine's, and the prompt scorer's)


def _buffer(size: int) -> np.ndarray:
    """A float32 scratch row of `size`, kept: a fresh 196 KB array each step costs page faults."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size != size:
        buffer = _local.buffer = np.empty(size, dtype=np.float32)
    return buffer


def _top(row: np.ndarray, k: int) -> np.ndarray:
    """row [V] -> the ids of its k largest entries, largest first, equal values by lower id.

    The k-th largest of some groups' maxima is at most the k-th largest entry (k groups reach it),
    so the entries at or above it hold the top k; they are few, and sorted exactly. The groups are
    the columns of the row laid out [GROUPS, V // GROUPS], so that their maxima are one vertical
    (SIMD) reduction; the entries past the layout are scanned with the rest."""
    if k == 0:
        return np.empty(0, dtype=np.int64)
    width = row.size // GROUPS
    if k > width:
        candidates = np.arange(row.size)
    else:
        maxima = row[: GROUPS * width].reshape(GROUPS, width).max(0)  # [width]
        candidates = np.flatnonzero(row >= np.partition(maxima, width - k)[width - k])
    return candidates[np.lexsort((candidates, -row[candidates]))[:k]]
