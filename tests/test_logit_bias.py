"""logit_bias, as OpenAI defines it: added to the target's logits before anything else, so it shapes
p, the drafter's q and plain decoding alike, and greedy speculation still gives plain decoding's
output; the CLI and the server take it, and bad values are refused naming it."""

from __future__ import annotations

import json

import pytest

from verispec.cli.main import main
from verispec.config import SamplingParams
from verispec.errors import InvalidInputError

PROMPT = "the end the end the stop the end the end"


@pytest.fixture(scope="module")
def llm(ngram_llm):
    return ngram_llm


def test_a_bias_moves_greedy_output_and_speculation_still_equals_plain(llm):
    free = llm.generate(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True), speculative=False).token_ids
    banned = SamplingParams(max_tokens=40, ignore_eos=True, logit_bias=((free[0], -100), (free[1], -100)))
    spec, plain = llm.generate(PROMPT, banned), llm.generate(PROMPT, banned, speculative=False)
    assert spec.token_ids == plain.token_ids and free[0] not in plain.token_ids and free[1] not in plain.token_ids
    forced = SamplingParams(max_tokens=20, ignore_eos=True, logit_bias=((7, 100),))
    assert llm.generate(PROMPT, forced).token_ids == [7] * 20


def test_a_banned_token_is_never_sampled(llm):
    free = llm.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.5, seed=3)).token_ids
    common = max(set(free), key=free.count)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.5, seed=3,
                                              logit_bias=((common, -100),))).token_ids
    assert free.count(common) > 5 and common not in out


def test_bad_biases_are_refused_naming_logit_bias(llm, capsys):
    with pytest.raises(InvalidInputError, match="logit_bias=\\{5: 101\\} is not allowed"):
        SamplingParams(logit_bias=((5, 101),))
    with pytest.raises(InvalidInputError, match="logit_bias \\[500\\] are outside the vocabulary"):
        llm.generate(PROMPT, SamplingParams(logit_bias=((500, 1),)))
    assert main(["generate", "--model", str(llm.source.folder), "--prompt", "the", "--max-tokens", "5",
                 "--ignore-eos", "--logit-bias", "7=100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [7] * 5
    with pytest.raises(SystemExit) as exited:  # argparse's own exit, code 2
        main(["generate", "--model", str(llm.source.folder), "--prompt", "the", "--logit-bias", "7:100"])
    assert exited.value.code == 2
    assert "'7:100' is not allowed: write TOKEN_ID=BIAS" in capsys.readouterr().err
