"""logits -> distribution -> token: the filters, the sampler's law, and private random streams."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from verispec.config import SamplingParams
from verispec.errors import InvalidInputError, NumericsError
from verispec.sampling import Sampler, probabilities, sample
from verispec.sampling.distribution import new_generator

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]])


def test_greedy_is_the_one_hot_argmax_first_on_ties():
    p = probabilities(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), SamplingParams())
    assert p.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_temperature_is_softmax_of_scaled_logits():
    p = probabilities(LOGITS, SamplingParams(temperature=0.7))
    assert torch.allclose(p, torch.softmax(LOGITS / 0.7, -1), atol=1e-7)


def test_top_k_keeps_exactly_the_k_largest():
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, top_k=3))
    assert set(p.nonzero()[:, 1].tolist()) == {0, 1, 6}
    assert math.isclose(p.sum().item(), 1.0, rel_tol=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    full = torch.softmax(LOGITS, -1)[0]
    order = full.argsort(descending=True)
    for top_p in (0.3, 0.6, 0.9, 0.99):
        kept = set(probabilities(LOGITS, SamplingParams(temperature=1.0, top_p=top_p)).nonzero()[:, 1].tolist())
        mass = full[order].cumsum(0)
        n = int((mass < top_p).sum()) + 1
        assert kept == set(order[:n].tolist())


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, min_p=0.3))
    full = torch.softmax(LOGITS, -1)[0]
    assert set(p.nonzero()[:, 1].tolist()) == set((full >= 0.3 * full.max()).nonzero()[:, 0].tolist())


def test_penalties_follow_the_openai_and_vllm_formulas_by_hand():
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    sampler = Sampler(params, prompt_ids=[4], stop_ids=[])
    p = sampler.probs(LOGITS, history=[0, 0, 5])
    # by hand: id 0 (2.0, seen twice in the output): 2.0 / 2 - 0.5 * 2 - 0.25 = -0.25;
    # id 4 (-1.0, in the prompt only): -1.0 * 2 = -2.0; id 5 (-3.0, once): -6.0 - 0.5 - 0.25 = -6.75
    expected = LOGITS.clone()
    expected[0, 0], expected[0, 4], expected[0, 5] = -0.25, -2.0, -6.75
    assert torch.allclose(p, torch.softmax(expected, -1))


def test_penalties_at_each_verify_position_count_the_earlier_drafts():
    params = SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)  # greedy with penalties
    sampler = Sampler(params, prompt_ids=[1], stop_ids=[])
    rows = LOGITS.expand(3, -1)
    drafts = [0, 0]
    p = sampler.probs(rows, history=[], drafts=drafts)
    by_row = [sampler.probs(LOGITS, history=drafts[:i]) for i in range(3)]
    assert torch.equal(p, torch.cat(by_row))
    # row 0 sees nothing: argmax 0; row 1 sees one 0 (2.0 - 2 = 0): argmax 6; row 2 sees two 0s: argmax 6
    assert p.argmax(-1).tolist() == [0, 6, 6]


def test_no_penalty_means_the_plain_distribution():
    sampler = Sampler(SamplingParams(temperature=0.7), prompt_ids=[0, 1], stop_ids=[])
    assert torch.equal(sampler.probs(LOGITS, history=[0, 0, 6]), probabilities(LOGITS, SamplingParams(temperature=0.7)))


def test_sample_follows_the_distribution():
    p = torch.softmax(LOGITS, -1)
    g = new_generator(7)
    draws = torch.cat([sample(p.expand(1000, -1), g) for _ in range(50)])
    counts = torch.bincount(draws, minlength=8).numpy()
    assert chisquare(counts, p[0].numpy() * len(draws)).pvalue > 1e-3


def test_sample_never_picks_a_zero_probability_id():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    g = new_generator(1)
    draws = torch.cat([sample(p.expand(1000, -1), g) for _ in range(20)])
    assert set(draws.tolist()) == {1, 3}


def test_seeded_streams_repeat_unseeded_differ_and_global_rng_is_untouched():
    p = torch.softmax(LOGITS, -1).expand(64, -1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert torch.equal(sample(p, new_generator(5)), sample(p, new_generator(5)))
    assert not torch.equal(sample(p, new_generator(None)), sample(p, new_generator(None)))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("field,value,allowed", [
    ("temperature", -0.1, ">= 0"), ("temperature", float("nan"), "finite"), ("temperature", float("inf"), "finite"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_k", -1, ">= 0"), ("min_p", 1.0, "[0, 1)"),
    ("max_tokens", 0, ">= 1"), ("max_tokens", -5, ">= 1"), ("stop", ("",), "non-empty"),
    ("seed", -1, "[0, 4294967295]"), ("seed", 2**32, "[0, 4294967295]"), ("seed", 2**64, "[0, 4294967295]"),
    ("stop", ("a\ud800",), "valid Unicode"), ("stop_token_ids", (True,), ">= 0"),
    ("repetition_penalty", 0.0, "[0.01, 100.0]"), ("repetition_penalty", 1e-300, "[0.01, 100.0]"),
    ("repetition_penalty", 1e300, "[0.01, 100.0]"),
    ("frequency_penalty", 2.5, "[-2, 2]"), ("presence_penalty", float("nan"), "[-2, 2]"),
])
def test_invalid_sampling_values_name_the_value_and_the_allowed_range(field, value, allowed):
    with pytest.raises(InvalidInputError) as e:
        SamplingParams(**{field: value})
    assert f"{field}={value!r}" in str(e.value) and allowed in str(e.value)


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_temperatures_below_the_floor_are_greedy_not_nan(temperature):
    """logits / 1e-40 overflow float32: vLLM's rule, below 1e-5 is greedy (config.GREEDY_BELOW)."""
    p = probabilities(LOGITS, SamplingParams(temperature=temperature))
    assert torch.equal(p, probabilities(LOGITS, SamplingParams(temperature=0)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_or_infinite_logits_fail_loudly_instead_of_drawing_a_token(bad, temperature):
    logits = LOGITS.clone()
    logits[0, 3] = bad
    with pytest.raises(NumericsError, match="NaN or infinite"):
        probabilities(logits, SamplingParams(temperature=temperature))
    with pytest.raises(NumericsError, match="every token masked: 1"):
        probabilities(torch.full((1, 8), float("-inf")), SamplingParams(temperature=temperature))


@pytest.mark.parametrize("bad, says", [(float("nan"), "1 NaN"), (float("inf"), r"1 \+inf"), (None, "every token masked: 1")])
def test_greedy_verify_rows_fail_loudly_on_nan_infinite_or_fully_masked_logits(bad, says):
    """Sampler.greedy checks the row maxima only (NaN propagates through max): each bad kind still fails."""
    sampler = Sampler(SamplingParams(), [1, 2], [0])
    rows = LOGITS.repeat(3, 1)
    if bad is None:
        rows[1] = float("-inf")
    else:
        rows[2, 5] = bad
    with pytest.raises(NumericsError, match=says):
        sampler.greedy(rows, [])
    assert sampler.greedy(LOGITS.repeat(3, 1), []) == LOGITS.repeat(3, 1).argmax(-1).tolist()
