"""verispec/sampling/reduce.py, with its kernel and with numpy: the per-row argmax and the
log-probabilities with the k likeliest alternatives equal torch's (first maximal id; log-softmax to float32 rounding; the k largest, equal
values by lower id), and a row reduces the same wherever it lies in memory."""

from __future__ import annotations

import pytest
import torch

from verispec.sampling import reduce


@pytest.fixture(params=["kernel", "numpy"], autouse=True)
def path(request, monkeypatch):
    """Every test on both paths: csrc/rows.c's kernel, and numpy where it was not built."""
    if request.param == "kernel" and reduce._kernel() is None:
        pytest.skip("the row kernel was not built here")
    if request.param == "numpy":
        monkeypatch.setattr(reduce, "_kernel", lambda: None)
    return request.param


def rows(seed: int, vocab: int = 49152) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, vocab, generator=g) * 3
    x[1, ::7] = float("-inf")  # a masked row
    x[2, 100:140] = x[2].max() + 1  # ties at the top, in one group and beyond
    x[2, 5000] = x[2, 100]
    x[3, -10:] = 50.0  # the top past the last whole group
    return x


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_log_softmax_entries_equal_a_sort_by_value_then_id_and_torchs_log_softmax(seed, k):
    x = rows(seed, 49152 + 37)
    at, ids = [0, 1, 2, 3, 4, 2], [5, 7 * 3 + 1, 100, 49152 + 30, 9, 0]
    reference = torch.log_softmax(x.double(), -1)
    for (logprob, top), r, token in zip(reduce.log_softmax_entries(x, at, ids, k), at, ids):
        order = sorted(range(x.shape[1]), key=lambda t: (-float(x[r, t]), t))[:k]
        assert [i for i, _ in top] == order
        assert logprob == pytest.approx(float(reference[r, token]), abs=1e-5)
        assert [v for _, v in top] == pytest.approx(reference[r, order].tolist(), abs=1e-5)
    p = torch.softmax(x, -1)
    for (logprob, top), r, token in zip(reduce.log_entries(p, at, ids, k), at, ids):
        assert [i for i, _ in top] == sorted(range(x.shape[1]), key=lambda t: (-float(p[r, t]), t))[:k]
        assert logprob == pytest.approx(float(torch.log(p[r, token])), abs=1e-5) or logprob == float("-inf")


def test_argmax_equals_torchs_and_a_row_gives_the_same_numbers_wherever_it_lies():
    x = rows(7)
    ids, finite = reduce.argmax(x)
    assert ids == x.argmax(-1).tolist() and finite
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[3, 17] = bad
        assert reduce.argmax(y)[1] is False
    assert reduce.argmax(torch.full((2, 9), float("-inf")))[1] is False
    padded = torch.empty(x.numel() + 3)[3:].view_as(x)  # the same rows at another alignment
    padded.copy_(x)
    here, there, alone = (reduce.log_softmax_entries(x, [2], [5], 5), reduce.log_softmax_entries(padded, [2], [5], 5),
                          reduce.log_softmax_entries(x[2:3].clone(), [0], [5], 5))
    assert here == there == alone
    assert reduce.log_softmax_entries(torch.full((1, 300), float("-inf")), [0], [4], 3) == [(float("-inf"), ())]
    small = torch.randn(1, 200)  # k above V // 64: the search scans every entry
    assert [i for i, _ in reduce.log_softmax_entries(small, [0], [1], 5)[0][1]] == torch.topk(small[0], 5).indices.tolist()


def test_alternatives_that_cannot_be_drawn_are_left_out_and_rows_outside_the_logits_are_refused():
    x = torch.full((2, 300), float("-inf"))
    x[0, [3, 200]] = torch.tensor([1.0, 2.0])  # two tokens can be drawn; five are asked for
    x[1] = 0.0
    for entries in (reduce.log_softmax_entries(x, [0], [3], 5), reduce.log_entries(torch.softmax(x, -1), [0], [3], 5)):
        (logprob, top), = entries
        assert [i for i, _ in top] == [200, 3]
        assert logprob == pytest.approx(float(torch.log_softmax(x[0], -1)[3]), abs=1e-6)
    for bad_row, bad_id in ((2, 0), (0, 300)):
        with pytest.raises(IndexError):
            reduce.log_softmax_entries(x, [bad_row], [bad_id], 1)
