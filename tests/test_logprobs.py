"""Log-probabilities are the target's, from its verify rows: speculation reports exactly what plain
decoding reports for the same tokens, and both equal an independent teacher-forced forward; the
sampled distribution's (processed) or the model's own (raw)."""

from __future__ import annotations

import pytest
import torch

from verispec.config import SamplingParams
from verispec.drafters import DraftModelDrafter, NgramDrafter
from verispec.errors import InvalidInputError
from verispec.sampling.distribution import probabilities

PROMPT = "the end the end the stop the end the end"


@pytest.fixture(scope="module")
def llm(ngram_llm):
    return ngram_llm


def teacher_forced(llm, prompt_ids, output_ids) -> torch.Tensor:
    """The target's logits at every output position, from one forward over prompt + output -> [n, V]."""
    ids = prompt_ids + output_ids
    cache = llm.target.new_cache()
    logits = llm.target.forward(torch.tensor(ids), torch.arange(len(ids)), cache)
    return logits[len(prompt_ids) - 1: len(ids) - 1]


@pytest.mark.parametrize("mode", ["processed", "raw"])
@pytest.mark.parametrize("drafter", ["ngram", "ngram-tree"])
def test_greedy_logprobs_under_speculation_equal_plain_decodings_bitwise(llm, mode, drafter):
    llm.engine.use(llm.make_drafter(drafter), 4)
    params = SamplingParams(max_tokens=60, ignore_eos=True, logprobs=3, logprobs_mode=mode,
                            repetition_penalty=1.2)
    spec = llm.generate(PROMPT, params)
    plain = llm.generate(PROMPT, params, speculative=False)
    assert spec.stats.accepted > 0
    assert spec.token_ids == plain.token_ids and spec.logprobs == plain.logprobs
    assert [t.token_id for t in spec.logprobs] == spec.token_ids
    assert all(len(t.top) == 3 for t in spec.logprobs)
    if mode == "processed":  # greedy takes the penalized argmax; raw reports the logits before the penalty
        assert all(t.top[0][0] == t.token_id for t in spec.logprobs)


def test_raw_logprobs_are_the_models_log_softmax_at_each_position(llm):
    llm.engine.use(NgramDrafter(), 4)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True, logprobs=5, logprobs_mode="raw"))
    reference = torch.log_softmax(teacher_forced(llm, out.prompt_token_ids, out.token_ids).float(), -1)
    for row, t in zip(reference, out.logprobs):
        assert t.logprob == pytest.approx(float(row[t.token_id]), abs=1e-5)
        values, ids = torch.topk(row, 5)
        assert [i for i, _ in t.top] == ids.tolist()
        assert [v for _, v in t.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_sampled_logprobs_are_the_targets_processed_distribution_not_the_drafts(draft_pair):
    """Each sampled token's reported log-probability is log p(x) under the target's distribution as
    sampled (temperature, top-p), recomputed here from a teacher-forced forward; finite, since x was
    drawn from p. The draft model's q differs (the pair's weights differ by noise), and most tokens
    come from accepted drafts."""
    llm, draft = draft_pair
    engine = llm.engine
    before = engine.drafter, engine.num_draft_tokens
    engine.use(DraftModelDrafter(draft), 4)
    try:
        params = SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.8, top_p=0.9, seed=5, logprobs=2)
        out = llm.generate(PROMPT, params)
    finally:
        engine.use(*before)
    assert out.stats.accepted > 20
    p = probabilities(teacher_forced(llm, out.prompt_token_ids, out.token_ids), params)
    for j, t in enumerate(out.logprobs):
        assert t.logprob == pytest.approx(float(torch.log(p[j, t.token_id])), abs=1e-5)
        assert all(v > float("-inf") for _, v in t.top) and len(t.top) <= 2


def test_no_logprobs_unless_asked_and_bad_values_are_refused(llm):
    assert llm.generate(PROMPT, SamplingParams(max_tokens=5)).logprobs is None
    assert llm.generate(PROMPT, SamplingParams(max_tokens=5, logprobs=0)).logprobs[0].top == ()
    with pytest.raises(InvalidInputError, match="logprobs=21 is not allowed: it must be an integer in \\[0, 20\\]"):
        SamplingParams(logprobs=21)
    with pytest.raises(InvalidInputError, match="logprobs_mode='logits' is not allowed; allowed: processed, raw"):
        SamplingParams(logprobs_mode="logits")


def test_a_prompt_scored_in_chunks_equals_one_teacher_forced_forward(llm):
    """Longer than score.CHUNK rows: every chunk's rows continue the cache and score the next token."""
    from verispec.engine.score import CHUNK, prompt_logprobs

    ids = llm.encode(" ".join([PROMPT] * 30))[: 2 * CHUNK + 37]
    assert len(ids) == 2 * CHUNK + 37
    scored = prompt_logprobs(llm.target, ids, 2)
    reference = torch.log_softmax(teacher_forced(llm, ids[:1], ids[1:]).float(), -1)  # rows predicting ids[1:]
    assert [t.token_id for t in scored] == ids[1:]
    assert [t.logprob for t in scored] == pytest.approx([float(reference[i, t]) for i, t in enumerate(ids[1:])], abs=1e-5)
    assert [t.top[0][0] for t in scored] == reference.argmax(-1).tolist()
