"""Structured output (verispec/sampling/grammar.py): every output follows its format; greedy
constrained speculation gives plain constrained decoding's tokens, for chains, trees and a draft
model; sampled constrained speculation draws from the target's masked distribution; the grammar
rolls back with rejected drafts (a matcher that does not roll back must break it); bad formats are
refused naming response_format."""

from __future__ import annotations

import json
import re

import pytest
import torch
from scipy.stats import chisquare

from verispec.config import SamplingParams
from verispec.drafters import DraftModelDrafter
from verispec import hub
from verispec.errors import InvalidInputError
from verispec.model.transformer import Segment
from verispec.sampling.grammar import Grammar

# The prompt offers n-gram drafts the format refuses ("x y z", "the stop"), so proposals get cut.
PROMPT = "the end the end x y z the stop the end the end x y z the end"
REGEX = "(the end |[a-c]{1,3} ){3,8}the end"


def regex(pattern: str, **params) -> SamplingParams:
    return SamplingParams(response_format={"type": "regex", "regex": pattern}, **params)


@pytest.fixture(scope="module")
def llm(ngram_llm):
    return ngram_llm


@pytest.mark.parametrize("drafter", ["ngram", "ngram-tree"])
def test_greedy_constrained_speculation_equals_plain_and_matches_the_format(llm, drafter):
    llm.engine.use(llm.make_drafter(drafter), 4)
    try:
        params = regex(REGEX, max_tokens=60)
        free = llm.generate(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True), speculative=False)
        spec, plain = llm.generate(PROMPT, params), llm.generate(PROMPT, params, speculative=False)
    finally:
        llm.engine.use(llm.make_drafter("ngram"), 4)
    assert not re.fullmatch(REGEX, free.text)  # the format changes what this model says
    assert spec.token_ids == plain.token_ids and re.fullmatch(REGEX, plain.text), (spec.text, plain.text)
    assert spec.finish_reason == "stop" and spec.stats.accepted > 0


def test_greedy_constrained_speculation_with_a_draft_model_equals_plain(draft_pair):
    llm, draft = draft_pair
    params = regex(REGEX, max_tokens=60)
    plain = llm.generate(PROMPT, params, speculative=False)
    llm.engine.use(DraftModelDrafter(draft), 3)
    try:
        spec = llm.generate(PROMPT, params)
    finally:
        llm.engine.use(None, 0)
    assert spec.token_ids == plain.token_ids and re.fullmatch(REGEX, plain.text) and spec.stats.accepted > 0


class NoRollback:
    """A matcher that forgets to roll back the drafts it consumed for the masks (the planted bug)."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def rollback(self, n: int) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self.matcher, name)


def test_a_grammar_that_does_not_roll_back_breaks_speculation(llm):
    params = regex(REGEX, max_tokens=60)
    plain = llm.generate(PROMPT, params, speculative=False)
    request, text = llm.prepare(PROMPT, params)
    request.grammar.matcher = NoRollback(request.grammar.matcher)
    try:
        llm.engine.run(request)
        broken = request.output_ids != plain.token_ids
    except RuntimeError:  # the matcher refuses a committed token
        broken = True
    assert broken


def test_sampled_constrained_outputs_follow_the_targets_masked_distribution(draft_pair, monkeypatch):
    """Two characters from '[ab][bc]': exact P(text) from the target's own rows restricted to what
    each position allows, against 1600 speculative samples (a draft model drafting, τ 2). The same
    with every verify row masked as the first (drafts not consumed) must fail: a commit the grammar
    refuses, or texts far from the target's distribution."""
    llm, draft = draft_pair
    prompt = "the end the"
    ids = llm.encode(prompt)
    letter = {c: llm.tokenizer.convert_tokens_to_ids(c) for c in "abc"}
    expected = {}
    with torch.no_grad():
        first = _masked(llm, ids, [letter["a"], letter["b"]])
        for a, pa in zip("ab", first):
            second = _masked(llm, ids + [letter[a]], [letter["b"], letter["c"]])
            expected.update({a + b: pa * pb for b, pb in zip("bc", second)})
    texts = sorted(expected)
    llm.engine.use(DraftModelDrafter(draft), 2)
    try:
        good = _counts(llm, prompt, 1600)
        assert set(good) <= set(texts), good
        assert chisquare([good.get(t, 0) for t in texts], [expected[t] * 1600 for t in texts]).pvalue > 1e-4, good
        masks = Grammar.masks
        monkeypatch.setattr(Grammar, "masks", lambda self, history, drafts, parents, rows:
                            masks(self, history, (), None, 1).expand(rows, -1))
        bad = _counts(llm, prompt, 1600)
    finally:
        llm.engine.use(None, 0)
    assert set(bad) - set(texts) or chisquare([bad.get(t, 0) for t in texts],
                                              [expected[t] * 1600 for t in texts]).pvalue < 1e-6, bad


def _masked(llm, ids: list[int], allowed: list[int]) -> list[float]:
    """The target's softmax at the end of ids, restricted to `allowed` (temperature 1)."""
    logits = llm.target.forward_many([Segment(torch.tensor(ids), llm.target.new_cache(), "last")])[0][-1]
    return torch.softmax(logits[allowed].double(), -1).tolist()


def _counts(llm, prompt: str, n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seed in range(n):
        try:
            text = llm.generate(prompt, regex("[ab][bc]", max_tokens=4, temperature=1.0, seed=seed)).text
        except RuntimeError:  # the grammar refused a committed token
            text = "<refused>"
        counts[text] = counts.get(text, 0) + 1
    return counts


def test_bad_formats_are_refused_naming_response_format(llm):
    with pytest.raises(InvalidInputError, match="response_format.type='xml' is not allowed"):
        SamplingParams(response_format={"type": "xml"})
    with pytest.raises(InvalidInputError, match="min_tokens=3 is not allowed with a response_format"):
        regex("a+", min_tokens=3)
    with pytest.raises(InvalidInputError, match="the regex is not valid") as e:
        llm.generate(PROMPT, regex("(a"))
    assert e.value.param == "response_format"
    with pytest.raises(InvalidInputError, match="the json_schema is not valid"):
        llm.generate(PROMPT, SamplingParams(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}))


real = pytest.mark.skipif(not hub.is_fetched("smollm2-135m-instruct"), reason="run `verispec models fetch smollm2-135m-instruct`")
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer"],
          "properties": {"answer": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 60}}}}


@pytest.mark.real
@real
def test_every_spec_bench_extraction_answer_validates_against_its_schema_and_equals_plain():
    import jsonschema

    from verispec.benchmark.prompts import load_prompts
    from verispec.llm import LLM

    llm = LLM("smollm2-135m-instruct", drafter="ngram", num_draft_tokens=4)
    params = SamplingParams(max_tokens=400, response_format={"type": "json_schema",
                                                            "json_schema": {"name": "answer", "schema": SCHEMA}})
    prompts = [p for p in load_prompts("spec-bench") if p.category == "extraction"]
    assert len(prompts) == 10
    for p in prompts:
        spec = llm.generate(p.text, params, chat=p.chat)
        assert spec.finish_reason == "stop", spec.text
        jsonschema.validate(json.loads(spec.text), SCHEMA)
        assert llm.generate(p.text, params, chat=p.chat, speculative=False).token_ids == spec.token_ids


@pytest.mark.real
@real
def test_the_server_answers_a_json_schema_through_the_openai_client_whole_and_streamed():
    import jsonschema

    from test_server import KEY, MODEL, Server
    from verispec.llm import LLM

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "year"],
              "properties": {"city": {"type": "string", "maxLength": 40}, "year": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    messages = [{"role": "user", "content": "Where and when were the first modern Olympic Games held? Answer in JSON."}]
    plain = LLM("smollm2-135m-instruct").generate(messages, SamplingParams(max_tokens=60, response_format=fmt),
                                                   speculative=False)
    server = Server("smollm2-135m-instruct", "--drafter", "ngram", "--num-draft-tokens", "4",
                    "--api-key", KEY)
    try:
        whole = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0,
                                                      response_format=fmt)
        chunks = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0,
                                                       response_format=fmt, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finally:
        server.stop()
    assert whole.choices[0].message.content == streamed == plain.text
    jsonschema.validate(json.loads(streamed), schema)
