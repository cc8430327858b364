"""Stopping inside multi-token chunks (RELIABILITY.md D): what is kept, counted and why it finished."""

from __future__ import annotations

import pytest

from verispec.config import SamplingParams
from verispec.engine.request import Request
from verispec.errors import ContextOverflowError

EOS = 2


def req(capacity: int = 100, stop_check=None, **params) -> Request:
    return Request([5, 6, 7], SamplingParams(**params), frozenset({EOS}), capacity, stop_check)


def test_eos_mid_chunk_stops_and_nothing_after_it_is_kept():
    r = req()
    assert r.commit([10, 11, EOS, 12, 13]) == 2
    assert r.output_ids == [10, 11] and r.finish_reason == "stop"


def test_eos_as_last_token_of_a_chunk_stops():
    r = req()
    r.commit([10, 11, EOS])
    assert r.output_ids == [10, 11] and r.finish_reason == "stop"


def test_max_tokens_reached_mid_chunk_gives_exactly_max_tokens():
    r = req(max_tokens=4)
    r.commit([10, 11, 12])
    assert not r.finished
    assert r.commit([13, 14, 15]) == 1
    assert r.output_ids == [10, 11, 12, 13] and r.finish_reason == "length"


def test_stop_and_max_tokens_in_one_chunk_the_stop_wins():
    r = req(max_tokens=3)
    r.commit([10, 11, EOS, 12])
    assert r.finish_reason == "stop" and r.output_ids == [10, 11]


def test_ignore_eos_continues_past_eos():
    r = req(ignore_eos=True, max_tokens=5)
    r.commit([10, EOS, 11, EOS, 12, 13])
    assert r.output_ids == [10, EOS, 11, EOS, 12] and r.finish_reason == "length"


def test_stop_token_ids_stop_like_eos():
    r = req(stop_token_ids=(11,))
    r.commit([10, 11, 12])
    assert r.output_ids == [10] and r.finish_reason == "stop"


def test_min_tokens_masks_stop_ids_at_every_verify_position_before_it():
    import torch

    r = req(min_tokens=3, stop_token_ids=(9,), temperature=1.0)
    logits = torch.zeros(5, 16)
    logits[:, [EOS, 9]] = 10.0  # the stop ids would win everywhere if not masked
    p = r.sampler.probs(logits, r.output_ids, [10, 11, 12, 13])  # rows follow 0..4 output tokens
    assert (p[:3, [EOS, 9]] == 0).all() and (p[3:, [EOS, 9]] > 0).all()
    r.commit([10, 11, 12])
    assert (r.sampler.probs(logits[:1], r.output_ids)[0, [EOS, 9]] > 0).all()


def test_stop_string_check_stops_at_the_token_that_completes_it():
    r = req(stop_check=lambda ids: ids[-2:] == [11, 12])
    assert r.commit([10, 11, 12, 13]) == 3
    assert r.output_ids == [10, 11, 12] and r.finish_reason == "stop"


def test_context_limit_mid_chunk_finishes_with_length_without_overrun():
    r = req(capacity=6)
    r.commit([10, 11, 12, 13])
    assert r.output_ids == [10, 11, 12] and r.length == 6 and r.finish_reason == "length"


def test_prompt_that_does_not_fit_or_is_empty_is_refused():
    with pytest.raises(ContextOverflowError, match="at most 2"):
        req(capacity=3)
    with pytest.raises(ContextOverflowError, match="empty"):
        Request([], SamplingParams(), frozenset({EOS}), 10)
