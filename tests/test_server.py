"""The OpenAI-compatible server, as a real process on 127.0.0.1, spoken to with the official openai
client and raw HTTP: both endpoints whole and streamed, 16 concurrent clients, every bad input
(RELIABILITY.md H), disconnects, the queue bound, the API key, metrics invariants (G), a bounded
schemathesis run, SIGTERM draining, and /health when the engine has died."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from serving import KEY, MODEL, Server
from verispec.config import SamplingParams

CONTEXT = 2048


@pytest.fixture(scope="module")
def server(folder):
    # a fixed tau: the speculation counters must see drafts, and with the native kernels this tiny
    # model's forward is so cheap that tau 'auto' rightly never drafts
    s = Server(folder, "--drafter", "ngram", "--num-draft-tokens", "3", "--max-concurrency", "16", "--max-queue",
               "16", "--api-key", KEY, "--max-body-bytes", "200000")
    yield s
    s.stop()


def greedy(llm, prompt, max_tokens, chat=False) -> list[int]:
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), chat=chat).token_ids


EXTRA = {"return_token_ids": True, "ignore_eos": True}


# --- answers ------------------------------------------------------------------------------------------

def test_completions_whole_and_streamed_agree_with_each_other_decode_and_plain_generation(server, llm):
    whole = server.client.completions.create(model=MODEL, prompt="the end the", max_tokens=40, temperature=0,
                                             extra_body=EXTRA)
    ids = whole.choices[0].model_extra["token_ids"]
    assert ids == greedy(llm, "the end the", 40), "served greedy tokens equal LLM.generate's"
    assert whole.choices[0].text == llm.tokenizer.decode(ids, skip_special_tokens=True)
    assert whole.usage.completion_tokens == len(ids) == 40 and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(llm.encode("the end the"))
    chunks = list(server.client.completions.create(model=MODEL, prompt="the end the", max_tokens=40, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body=EXTRA))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == ids
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    speculation = whole.usage.model_extra["speculation"]
    assert speculation["cycles"] >= 1 and 0 <= speculation["accepted"] <= speculation["drafted"]
    drafts, accepted = speculation["drafts"], speculation["accepted"]
    assert 1 <= drafts <= speculation["cycles"]
    assert speculation["mean_accepted_length"] == pytest.approx(1 + accepted / drafts, abs=1e-4), "vLLM's definition"
    assert speculation["tokens_per_cycle"] == pytest.approx(1 + accepted / speculation["cycles"], abs=1e-4)
    assert len(speculation["per_position_acceptance"]) >= len(speculation["conditional_acceptance"]) >= 1


def test_chat_whole_and_streamed_agree_with_each_other_decode_and_plain_generation(server, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the stop the"}]
    whole = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                  extra_body=EXTRA)
    ids = whole.choices[0].model_extra["token_ids"]
    assert ids == greedy(llm, messages, 30)
    assert whole.choices[0].message.content == llm.tokenizer.decode(ids, skip_special_tokens=True)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 30
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                        stream=True, extra_body=EXTRA))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_whole_and_streamed_are_the_targets_for_the_tokens_served(server, llm):
    """Completions' parallel lists and chat's content list: the served tokens' log-probabilities equal
    the library's plain decoding of the same prompt (the server speculates with ngram), and a stream's
    chunks carry them all, in order."""
    params = SamplingParams(max_tokens=30, ignore_eos=True, logprobs=2)
    plain = llm.generate("the end the", params, speculative=False)
    whole = server.client.completions.create(model=MODEL, prompt="the end the", max_tokens=30, temperature=0,
                                             logprobs=2, extra_body=EXTRA)
    lp = whole.choices[0].logprobs
    assert whole.choices[0].model_extra["token_ids"] == plain.token_ids
    assert lp.token_logprobs == [t.logprob for t in plain.logprobs]
    text = whole.choices[0].text
    assert "".join(lp.tokens) == text and len(lp.tokens) == len(plain.token_ids)
    assert all(text[o: o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens))
    assert [list(d.values()) for d in lp.top_logprobs] == [[v for _, v in t.top] for t in plain.logprobs]
    chunks = list(server.client.completions.create(model=MODEL, prompt="the end the", max_tokens=30, temperature=0,
                                                   logprobs=2, stream=True, extra_body=EXTRA))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices]
    assert [x for s in streamed for x in s.token_logprobs] == lp.token_logprobs
    assert [x for s in streamed for x in s.text_offset] == lp.text_offset

    messages = [{"role": "user", "content": "the stop the"}]
    plain = llm.generate(messages, params, speculative=False)
    chat = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 logprobs=True, top_logprobs=2, extra_body=EXTRA)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == [t.logprob for t in plain.logprobs]
    assert [[a.logprob for a in c.top_logprobs] for c in content] == [[v for _, v in t.top] for t in plain.logprobs]
    assert all(bytes(c.bytes).decode() == c.token for c in content)
    stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                   logprobs=True, stream=True, extra_body=EXTRA)
    parts = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs is not None]
    assert [x.logprob for p in parts for x in p.content] == [c.logprob for c in content]
    bare = server.client.completions.create(model=MODEL, prompt="the", max_tokens=3)
    assert bare.choices[0].logprobs is None
    forced = server.client.completions.create(model=MODEL, prompt="the", max_tokens=4, temperature=0,
                                              logit_bias={"7": 100}, extra_body=EXTRA)
    assert forced.choices[0].model_extra["token_ids"] == [7] * 4


def test_echo_scores_the_prompt_as_lm_eval_reads_it(server, llm):
    """max_tokens 0 with echo: the prompt alone, each token after the first with the model's own
    log-probability given those before it (a teacher-forced forward here); with max_tokens > 0 the
    completion follows, its logprobs those of the same request without echo."""
    import torch

    ids = llm.encode("the end the stop")
    scored = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                              temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == llm.tokenizer.decode(ids) and scored.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    cache = llm.target.new_cache()
    reference = torch.log_softmax(llm.target.forward(torch.tensor(ids), torch.arange(len(ids)), cache).float(), -1)
    assert lp.token_logprobs[1:] == pytest.approx([float(reference[i, t]) for i, t in enumerate(ids[1:])], abs=1e-5)
    assert [list(d.values())[0] for d in lp.top_logprobs[1:]] == pytest.approx(
        reference[:-1].max(-1).values.tolist(), abs=1e-5)
    both = server.client.completions.create(model=MODEL, prompt="the end the stop", max_tokens=6, echo=True,
                                            logprobs=1, temperature=0, extra_body=EXTRA)
    alone = server.client.completions.create(model=MODEL, prompt="the end the stop", max_tokens=6, logprobs=1,
                                             temperature=0, extra_body=EXTRA)
    assert both.choices[0].text == "the end the stop" + alone.choices[0].text
    assert both.choices[0].logprobs.token_logprobs == lp.token_logprobs + alone.choices[0].logprobs.token_logprobs
    offsets, tokens, text = both.choices[0].logprobs.text_offset, both.choices[0].logprobs.tokens, both.choices[0].text
    assert offsets[len(ids):] == [len("the end the stop") + o for o in alone.choices[0].logprobs.text_offset]
    assert all(text[o: o + len(t)] == t for o, t in zip(offsets, tokens)) and "".join(tokens) == text
    chunks = list(server.client.completions.create(model=MODEL, prompt="the end the stop", max_tokens=6, echo=True,
                                                   temperature=0, stream=True, extra_body=EXTRA))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == both.choices[0].text
    r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_a_batch_of_prompts_gets_a_choice_per_prompt_as_each_alone(server, llm):
    """prompt as a list (of strings, or of token-id lists), as lm-eval's local-completions sends it:
    choices in order, each what the prompt gets alone; its loglikelihood payload (echo, logprobs 1,
    max_tokens 1) scores every prompt; a stream of a batch, or a bad prompt in it, is a 400."""
    texts = ["the end the", "stop the stop", "a b a b"]
    batch = server.client.completions.create(model=MODEL, prompt=texts, max_tokens=8, temperature=0, extra_body=EXTRA)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in batch.choices] == [greedy(llm, t, 8) for t in texts]
    assert batch.usage.completion_tokens == 24 and len(batch.usage.model_extra["speculation"]) == 3
    ids = [llm.encode(t) for t in texts]
    scored = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                              echo=True, seed=1234)
    for c, prompt_ids in zip(scored.choices, ids):
        assert len(c.logprobs.token_logprobs) == len(prompt_ids) + 1 and c.logprobs.token_logprobs[0] is None
        alone = server.client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=1, temperature=0,
                                                 logprobs=1, echo=True)
        assert c.logprobs.token_logprobs == alone.choices[0].logprobs.token_logprobs
    chunks = list(server.client.completions.create(model=MODEL, prompt=texts, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body=EXTRA))
    assert [_streamed(chunks, i, "token_ids") for i in range(3)] == [c.model_extra["token_ids"] for c in batch.choices]
    assert chunks[-1].usage.completion_tokens == 24 and len({c.id for c in chunks}) == 1
    r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6], [500]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt.1", r.text
    assert server.http.get("/health").status_code == 200


def test_n_choices_are_independent_samples_each_as_its_own_request(server, llm):
    """n > 1: choice j of a seeded request is the request with seed + j; greedy choices are all the
    target's one output; chat and completions alike, each choice with its own speculation stats."""
    messages = [{"role": "user", "content": "the end the"}]
    many = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, n=3,
                                                 seed=11, extra_body=EXTRA)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.object == "chat.completion"
    alone = [server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0,
                                                   seed=11 + j, extra_body=EXTRA).choices[0].message.content
             for j in range(3)]
    assert [c.message.content for c in many.choices] == alone and len(set(alone)) > 1
    assert len(many.usage.model_extra["speculation"]) == 3 and many.usage.completion_tokens == 36
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0,
                                                        n=3, seed=11, stream=True, extra_body=EXTRA))
    assert [_streamed(chunks, j) for j in range(3)] == alone
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    greedy_many = server.client.completions.create(model=MODEL, prompt="the end the", max_tokens=10, temperature=0,
                                                   n=2, extra_body=EXTRA)
    assert [c.model_extra["token_ids"] for c in greedy_many.choices] == [greedy(llm, "the end the", 10)] * 2


def _streamed(chunks, index: int, what: str = "text") -> str | list[int]:
    """What a stream's chunks carry for choice `index`: its text (completions' or chat's), or its token ids."""
    picked = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
    if what == "token_ids":
        return [t for c in picked for t in c.model_extra.get("token_ids") or []]
    return "".join((c.text if hasattr(c, "text") else c.delta.content) or "" for c in picked)


def test_a_guided_regex_is_followed_whole_and_streamed_as_the_library_follows_it(server, llm):
    pattern = "(the end |[a-c]{1,3} ){2,6}the stop"
    plain = llm.generate("the end the", SamplingParams(max_tokens=60, response_format={"type": "regex", "regex": pattern}),
                         speculative=False)
    assert re.fullmatch(pattern, plain.text) and plain.finish_reason == "stop"
    for stream in (False, True):
        r = server.client.completions.create(model=MODEL, prompt="the end the", max_tokens=60, temperature=0,
                                             stream=stream, extra_body={"guided_regex": pattern})
        text = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
        assert text == plain.text


def test_stop_strings_and_seeded_sampling_are_honoured(server, llm):
    out = server.client.completions.create(model=MODEL, prompt="the end the", max_tokens=60, temperature=0,
                                           stop=[" "], extra_body=EXTRA)
    assert " " not in out.choices[0].text and out.choices[0].finish_reason in ("stop", "length")
    a, b = (server.client.completions.create(model=MODEL, prompt="the", max_tokens=30, temperature=1.0, seed=7,
                                             extra_body=EXTRA).choices[0].model_extra["token_ids"] for _ in range(2))
    assert a == b, "the same seed gives the same sample"
    expected = llm.generate("the", SamplingParams(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)).token_ids
    assert a == expected, "sampled output equals LLM.generate's for the same seed (here ngram drafts, so τ > 0)"
    seen = server.metrics()["verispec_monitor_tokens{drafter=NgramDrafter}"]
    assert seen >= 60, "the losslessness monitor counted both sampled answers' tokens"


def test_sixteen_concurrent_clients_get_complete_identical_answers_and_metrics_stay_consistent(server, llm):
    prompts = ["the end", "stop the stop", "a b c a b c", "the quick brown", "x y", "end end end", "hello", "the"]
    jobs = [(p, i % 2 == 1) for p in prompts for i in range(2)]  # each prompt twice: once whole, once streamed
    before = server.metrics()

    def ask(job):
        prompt, stream = job
        if not stream:
            r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0, extra_body=EXTRA)
            return r.choices[0].model_extra["token_ids"], r.usage.completion_tokens
        chunks = list(server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                                       stream=True, stream_options={"include_usage": True},
                                                       extra_body=EXTRA))
        return [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]], chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, _), (ids, used) in zip(jobs, answers):
        assert len(ids) == used == 48, "complete answers, usage equal to the tokens returned"
        assert ids == greedy(llm, prompt, 48), f"{prompt!r}: a batched answer differs from generation alone"
    after = server.metrics()
    assert after["verispec_generation_tokens_total"] - before["verispec_generation_tokens_total"] == 16 * 48
    # RELIABILITY.md G, with vLLM's names and definitions
    spec = "verispec_spec_decode_"
    drafts, drafted, accepted, cycles = (after[f"{spec}num_{n}_total"]
                                         for n in ("drafts", "draft_tokens", "accepted_tokens", "cycles"))
    positions = sorted(int(k.split("position=")[1].rstrip("}")) for k in after
                       if k.startswith(f"{spec}num_draft_tokens_per_pos_total"))
    assert drafted > 0 and positions == list(range(len(positions)))
    assert drafted == sum(after[f"{spec}num_draft_tokens_per_pos_total{{position={i}}}"] for i in positions)
    assert accepted <= drafted and drafts <= cycles
    accepted_at = [after.get(f"{spec}num_accepted_tokens_per_pos_total{{position={i}}}", 0) for i in positions]
    assert accepted == sum(accepted_at)
    rates = [after.get(f"{spec}per_position_acceptance{{position={i}}}", 0.0) for i in positions]
    assert rates == pytest.approx([a / drafts for a in accepted_at[: len(rates)]]), "vLLM's: accepted at i / drafts"
    assert all(a >= b for a, b in zip(rates, rates[1:])), f"per-position acceptance rises: {rates}"
    assert after[f"{spec}mean_accepted_length"] == pytest.approx(1 + accepted / drafts)
    assert after[f"{spec}tokens_per_cycle"] == pytest.approx(1 + accepted / cycles)
    assert after[f"{spec}acceptance_rate"] == pytest.approx(accepted / drafted)
    assert after[f"{spec}conditional_acceptance{{position=0}}"] == pytest.approx(rates[0]), "α_0 is the same"
    assert after["verispec_running_requests"] == 0 and after["verispec_queue_depth"] == 0


def test_models_health_and_the_api_key(server):
    assert server.client.models.list().data[0].id == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401


# --- bad input: a 4xx naming the field, never a 5xx, and the server stays up --------------------------

BAD = [
    ("completions", {"prompt": list(range(3, 93)) * 25}, 400, "prompt", "2048"),  # longer than the context
    ("completions", {"prompt": [5] * 2000, "max_tokens": 100}, 400, "max_tokens", "at most 48"),
    ("completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("completions", {"prompt": [500]}, 400, "prompt", "outside the vocabulary"),
    ("completions", {}, 400, "prompt", "required"),
    ("chat", {"messages": "hi"}, 400, "messages", "list"),
    ("chat", {"messages": []}, 400, "messages", "at least 1"),
    ("chat", {"messages": [{"content": "x"}]}, 400, "messages.0.role", "required"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "wizard"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", ""),
    ("completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens", "integer"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens", ">= 1"),
    ("completions", {"prompt": "x", "n": 17}, 400, "n", "16"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n", "1"),
    ("completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "not permitted"),
    ("completions", {"prompt": "x", "suffix_global": "off"}, 400, "suffix_global", "boolean"),
    ("completions", {"prompt": "x", "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9", "stream": True}, 404, "model", ""),
    ("completions", {"prompt": "x", "temperature": 0.5, "stream": True, "top_p": 2}, 400, "top_p", ""),
    ("completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "[0, 20]"),
    ("completions", {"prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias", "token ids written as strings"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias", "[-100, 100]"),
    ("completions", {"prompt": "x", "logit_bias": {"500": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs", "top_logprobs=21 is not allowed"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs",
     "without logprobs: true"),
    ("completions", {"prompt": "x", "logprobs": 1, "logprobs_mode": "logits"}, 400, "logprobs_mode", "processed, raw"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, 400,
     "response_format", "allowed: text, json_object"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, 400, "response_format",
     "the json_schema is not valid"),
    ("completions", {"prompt": "x", "guided_regex": "(a"}, 400, "response_format", "the regex is not valid"),
    ("completions", {"prompt": "x", "guided_regex": "a", "response_format": {"type": "json_object"}}, 400, "guided_regex",
     "given together"),
    ("completions", {"prompt": "x", "guided_grammar": "start: nowhere"}, 400, "response_format", "not valid"),
]


@pytest.mark.parametrize("endpoint, fields, status, param, says", BAD,
                         ids=[f"{e}-{'-'.join(f)}-{p}" for e, f, _, p, _ in BAD])
def test_bad_input_gets_a_4xx_json_error_naming_the_field(server, endpoint, fields, status, param, says):
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    r = server.http.post(path, json={"model": MODEL, **fields})
    assert r.status_code == status and r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


@pytest.mark.parametrize("raw, param", [("NaN", "temperature"), ("Infinity", "temperature"), ("-Infinity", "temperature")])
def test_non_finite_numbers_are_refused(server, raw, param):
    r = server.http.post("/v1/completions", content=f'{{"model": "{MODEL}", "prompt": "x", "temperature": {raw}}}',
                         headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_malformed_json_and_an_oversized_body_are_refused(server):
    r = server.http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 300_000})
    assert r.status_code == 413 and "200000" in r.json()["error"]["message"]
    assert server.http.get("/health").status_code == 200


def test_a_bounded_schemathesis_run_finds_no_server_error(server, tmp_path):
    result = subprocess.run(  # in tmp_path: schemathesis keeps a cache folder where it runs
        [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "20", "--header", f"Authorization: Bearer {KEY}", "--phases", "examples,coverage,fuzzing",
         "--workers", "2", "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert server.http.get("/health").status_code == 200


# --- a context that is not a multiple of 64, and a burst ------------------------------------------------

SHORT = 1000


@pytest.fixture(scope="module")
def short(folder):
    """--max-context 1000 (the cache's storage is 1024), 8 slots and 16 queue places (issue 12)."""
    s = Server(folder, "--drafter", "ngram", "--max-context", str(SHORT), "--max-concurrency", "8", "--max-queue", "16",
               "--api-key", KEY)
    yield s
    s.stop()


def test_requests_reach_the_last_position_of_a_context_of_1000_and_no_further(short):
    for prompt, max_tokens in ((960, 40), (999, 1), (993, 7)):  # output that ends at the last position
        body = {"model": MODEL, "prompt": [5, 6, 7, 8] * (prompt // 4) + [9] * (prompt % 4), "max_tokens": max_tokens,
                **EXTRA}
        r = short.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == SHORT
        assert r.json()["choices"][0]["finish_reason"] == "length"
    chat = short.http.post("/v1/chat/completions", json={"model": MODEL, "ignore_eos": True,
                                                       "messages": [{"role": "user", "content": "ab" * 480}]})
    assert chat.status_code == 200 and chat.json()["usage"]["total_tokens"] == SHORT, "a chat runs to the context's end"
    r = short.http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 950, "max_tokens": 100})
    assert r.status_code == 400
    assert "the context holds 1000, so at most 50 can be generated" in r.json()["error"]["message"]
    r = short.http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 1000})
    assert r.status_code == 400 and "the context holds 1000" in r.json()["error"]["message"]
    assert short.http.get("/health").status_code == 200


def test_a_burst_as_large_as_the_slots_and_the_queue_together_is_served_in_full(short):
    """24 simultaneous requests with 8 slots and 16 queue places: none is refused."""
    def ask(i):
        return httpx.post(short.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                          json={"model": MODEL, "prompt": f"the {i}", "max_tokens": 20, "ignore_eos": True})

    with ThreadPoolExecutor(24) as pool:
        statuses = [r.status_code for r in pool.map(ask, range(24))]
    assert statuses == [200] * 24, statuses


# A bounded fuzz (hypothesis) of every request field, and of prompt lengths around a context that is not
# a multiple of 64: no 5xx, no error event in a stream, and the engine alive after every case.
ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 95, 96, 2**32, 2**64]),
                st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e-300, 1e-40, 1e-6, 1e300, -0.0]),
                st.text(max_size=8), st.sampled_from(["\ud800", "a\udfff", "</s>", ""]),
                st.lists(st.integers(-5, 100), max_size=3),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FIELDS = [f.name for f in dataclasses.fields(SamplingParams)] + [
    "stream", "n", "user", "return_token_ids", "max_completion_tokens", "response_format", "tool_choice", "store"]
PROMPT_LENGTHS = st.integers(SHORT - 12, SHORT + 2) | st.integers(1, 8)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(chat=st.booleans(), length=PROMPT_LENGTHS, fields=st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=4),
       max_tokens=st.one_of(st.none(), st.integers(-1, 40)))
def test_a_bounded_fuzz_of_every_field_and_of_lengths_around_the_context_finds_no_5xx(short, chat, length, fields,
                                                                                       max_tokens):
    body = {"model": MODEL, **fields}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if chat:
        body["messages"] = [{"role": "user", "content": "ab" * (length // 2)}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = [5, 6, 7] * (length // 3) + [9] * (length % 3)
        path = "/v1/completions"
    raw = json.dumps(body)  # ASCII: lone surrogates travel escaped, as a JSON client may send them
    with short.http.stream("POST", path, content=raw, headers={"content-type": "application/json"}, timeout=120) as r:
        text = r.read().decode("utf-8", "replace")
    assert r.status_code < 500, (body, text[:500])
    assert "server_error" not in text, (body, text[:500])
    assert short.http.get("/health").status_code == 200


# --- what OpenAI's SDKs send and expect ----------------------------------------------------------------

def test_unknown_routes_and_methods_get_openai_error_json(server):
    for r, status in ((server.http.get("/v1/nothing"), 404), (server.http.delete("/v1/completions"), 405),
                      (server.http.put("/health"), 405)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_bodies_that_are_not_json_or_not_utf8_get_openai_error_json_without_a_byte_offset_as_param(server):
    for raw in (b'{"model": "tiny", "prompt": ', b'{"model": "tiny", "prompt": "\xff\xfe"}',
                '{"model": "tiny", "prompt": "caf\u00e9"}'.encode("latin-1")):
        r = server.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] is None, err


def test_max_completion_tokens_is_named_as_sent(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    r = server.http.post("/v1/chat/completions", json={**chat, "max_completion_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
    assert "max_completion_tokens=-1" in r.json()["error"]["message"]
    r = server.http.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 5000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text


def test_models_retrieve_head_requests_and_a_lower_case_bearer(server):
    assert server.client.models.retrieve(MODEL).id == MODEL
    r = server.http.get("/v1/models/gpt-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.head(server.url + "/health").status_code == 200
    assert server.http.head("/v1/models").status_code == 200
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL


def test_fields_that_sdks_send_as_no_ops_are_accepted_and_typos_still_refused(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    harmless = {"response_format": {"type": "text"}, "store": False, "metadata": {"k": "v"}, "tool_choice": "none",
                "parallel_tool_calls": True, "user": "u-1"}
    r = server.http.post("/v1/chat/completions", json={**chat, **harmless})
    assert r.status_code == 200, r.text
    for typo, value in (("temprature", 0.5), ("max_token", 5)):
        r = server.http.post("/v1/chat/completions", json={**chat, typo: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == typo
    r = server.http.post("/v1/chat/completions", json={**chat, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert "no token of this model's vocabulary can begin" in r.json()["error"]["message"]  # the tiny one has no '{'


@pytest.mark.parametrize("global_tree", ["on", "off"])
def test_the_suffix_drafter_serves_plain_greedy_outputs_with_and_without_its_global_tree(folder, llm, global_tree):
    """Requests that read the global tree, and one that opts out (suffix_global false), all answer
    what plain decoding does; a server with --suffix-global off takes the field too."""
    s = Server(folder, "--drafter", "suffix", "--suffix-global", global_tree, "--num-draft-tokens", "3",
               "--api-key", KEY)
    try:
        for prompt, opt in (("the end the end", {}), ("the end the end", {}), ("the stop", {"suffix_global": False})):
            r = s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                            extra_body={**EXTRA, **opt})
            assert r.choices[0].model_extra["token_ids"] == greedy(llm, prompt, 40)
            assert r.usage.model_extra["speculation"]["drafted"] > 0
    finally:
        s.stop()


# --- values that used to kill the engine or answer 500 ------------------------------------------------

BAD_VALUES = [
    ({"stop_token_ids": [99999], "min_tokens": 1}, "stop_token_ids", "outside the vocabulary"),
    ({"stop_token_ids": [2**70], "min_tokens": 1}, "stop_token_ids", "outside the vocabulary"),
    ({"seed": 2**64}, "seed", "[0, 4294967295]"),
    ({"seed": 2**32}, "seed", "[0, 4294967295]"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", "[0.01, 100.0]"),
    ({"temperature": 0.7, "repetition_penalty": 1e-300}, "repetition_penalty", "[0.01, 100.0]"),
]


@pytest.mark.parametrize("fields, param, says", BAD_VALUES, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD_VALUES)])
def test_values_that_used_to_kill_the_engine_get_a_400_and_the_engine_lives(server, fields, param, says):
    r = server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 8, **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and says in r.json()["error"]["message"], r.text
    assert server.http.get("/health").status_code == 200


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "bad \\ud800 x"}', "prompt"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "bad \\ud800 x"}]}',
     "messages.0.content"),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "stop": ["\\udfff"]}', "stop"),
])
def test_lone_surrogates_get_a_400(server, path, raw, param):
    r = server.http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tiny_temperatures_are_greedy(server, llm):
    expected = greedy(llm, "the end the", 20)
    for temperature in (1e-300, 1e-40):
        r = server.client.completions.create(model=MODEL, prompt="the end the", max_tokens=20, temperature=temperature,
                                             extra_body=EXTRA)
        assert r.choices[0].model_extra["token_ids"] == expected


# --- slots: disconnects, the queue bound, draining --------------------------------------------------------

@pytest.fixture
def narrow(folder):
    """One slot, one queue place, no drafter, the torch backend: a 2000-token request takes seconds
    (on the native kernels this tiny model writes it in well under one, before a hang-up is seen);
    so these tests also serve on the torch backend."""
    s = Server(folder, "--max-concurrency", "1", "--max-queue", "1", "--api-key", KEY, "--backend", "torch")
    yield s
    s.stop()


def long_stream(server):
    """A 2000-token stream. Keep its line iterator alive while reading: a dropped httpx iterator
    closes the connection, which the server rightly takes for a client that left."""
    body = {"model": MODEL, "prompt": "the", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    client = httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    return client.stream("POST", "/v1/completions", json=body)


def idle_metrics(server, within=5.0):
    """The metrics once no request is running, or after `within` seconds."""
    deadline = time.time() + within
    while (m := server.metrics())["verispec_running_requests"] and time.time() < deadline:
        time.sleep(0.05)
    return m


def test_a_client_that_disconnects_mid_stream_frees_its_slot_at_once(narrow):
    with long_stream(narrow) as r:
        lines = r.iter_lines()
        next(lines)
    m = idle_metrics(narrow)
    assert m["verispec_running_requests"] == 0
    assert m["verispec_generation_tokens_total"] < 1000, "the engine stopped generating for the gone client"
    r = narrow.http.post("/v1/completions", timeout=10,  # sampled at OpenAI's temperature 1: EOS may come early
                         json={"model": MODEL, "prompt": "x", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot_too(narrow):
    with pytest.raises(httpx.ReadTimeout):  # the client hangs up after 0.5 s
        httpx.post(narrow.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                   json={"model": MODEL, "prompt": "the", "max_tokens": 2000, "ignore_eos": True})
    m = idle_metrics(narrow)
    assert m["verispec_running_requests"] == 0
    assert m["verispec_generation_tokens_total"] < 1500, "the engine stopped generating for the gone client"


def test_a_full_queue_answers_429_at_once(narrow):
    with ThreadPoolExecutor(1) as pool, long_stream(narrow) as running:
        lines = running.iter_lines()
        next(lines)
        queued = pool.submit(httpx.post, narrow.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": MODEL, "prompt": "x", "max_tokens": 5, "ignore_eos": True}, timeout=60)
        while narrow.metrics()["verispec_queue_depth"] < 1:
            time.sleep(0.02)
        start = time.time()
        r = narrow.http.post("/v1/completions", json={"model": MODEL, "prompt": "y", "max_tokens": 5})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert time.time() - start < 2
    assert queued.result(timeout=30).status_code == 200, "the queued request ran once the slot was free"


def test_sigterm_finishes_in_flight_requests_then_exits(folder):
    s = Server(folder, "--api-key", KEY)
    body = {"model": MODEL, "prompt": "the", "max_tokens": 1000, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with s.http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        s.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["usage"]["completion_tokens"] == 1000
    assert s.proc.wait(30) in (0, -signal.SIGTERM), "a clean exit (uvicorn re-raises the signal it handled)"
    assert "Application shutdown complete" in Path(s.log.name).read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(s.url + "/health", timeout=2)


def test_sigterm_ends_what_is_still_open_after_the_shutdown_timeout(folder):
    # the torch backend and a short timeout: two 2000-token requests take seconds there, so both
    # are still open when the timeout ends them (the native kernels could finish them first)
    s = Server(folder, "--api-key", KEY, "--max-concurrency", "2", "--shutdown-timeout", "0.3", "--backend", "torch")
    long = {"model": MODEL, "prompt": "the", "max_tokens": 2000, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool, s.http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        whole = pool.submit(s.http.post, "/v1/completions", json=long)
        while s.metrics()["verispec_running_requests"] < 2:
            time.sleep(0.02)
        start = time.time()
        s.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
        answer = whole.result(timeout=30)
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][len("data: "):])["error"]
    assert err["code"] == "engine_unavailable" and "shut down" in err["message"]
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_unavailable"
    assert s.proc.wait(30) in (0, -signal.SIGTERM)
    assert time.time() - start < 10, "the shutdown waited about --shutdown-timeout, not for 2000 tokens"


# --- in process: faults inside the engine -------------------------------------------------------------

def in_process(llm, max_batch=2):
    from fastapi.testclient import TestClient

    from verispec.config import ServeConfig
    from verispec.server.app import create_app

    scheduler = llm.scheduler(max_batch, 2)
    return scheduler, TestClient(create_app(llm, scheduler, ServeConfig(), MODEL))


def test_a_failed_step_fails_its_requests_cleanly_and_the_server_serves_on(llm, monkeypatch):
    """Fault injection: the forward raises on one step; the whole answer in it gets a 500 JSON, the
    stream in it an error event then [DONE]; /health stays 200 and the next request is exact."""
    forward = llm.target.forward_many
    faults = []

    def faulty(segments):
        if len(faults) < 2 and any(s.token_ids[:3].tolist() == [77, 78, 79] for s in segments):
            faults.append(True)  # once for the whole answer, once for the stream
            raise RuntimeError("injected fault")
        return forward(segments)

    monkeypatch.setattr(llm.target, "forward_many", faulty)
    scheduler, client = in_process(llm)
    body = {"model": MODEL, "prompt": [77, 78, 79, 80], "max_tokens": 5}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "injected fault" in r.json()["error"]["message"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and "injected fault" in json.loads(events[-2][len("data: "):])["error"]["message"]
    assert events[-1] == "data: [DONE]"
    assert client.get("/health").status_code == 200 and scheduler.alive
    r = client.post("/v1/completions", json={**body, "max_tokens": 12, "temperature": 0, **EXTRA})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == greedy(llm, [77, 78, 79, 80], 12)
    scheduler.stop(10)


def test_health_says_503_and_requests_fail_cleanly_when_the_engine_has_died(llm, monkeypatch):
    monkeypatch.setattr(llm.target, "new_cache", lambda: 1 / 0)  # the engine cannot recover: no cache fits
    scheduler, client = in_process(llm)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
    assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"


@pytest.mark.parametrize("flag, value, message", [("--shutdown-timeout", "-1", "shutdown_timeout=-1.0 is not allowed"),
                                                 ("--audit-rate", "1.5", "audit_rate=1.5 is not allowed")])
def test_a_bad_serve_flag_exits_2_naming_it(folder, capsys, flag, value, message):
    from verispec.cli.main import main

    assert main(["serve", "--model", str(folder), flag, value]) == 2
    assert message in capsys.readouterr().err


def test_metrics_report_the_greedy_audit(folder):
    from verispec.llm import LLM

    scheduler, client = in_process(LLM(str(folder), drafter="ngram", num_draft_tokens=3))
    scheduler.audit.rate = 1.0
    try:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "the end the end the end", "max_tokens": 30,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["speculation"]["drafted"] > 0
        for _ in range(600):  # the audit runs after the answer, on the engine thread
            if scheduler.audit.audited:
                break
            time.sleep(0.05)
        metrics = client.get("/metrics").text
        assert "verispec_audited_requests 1.0" in metrics and "verispec_audit_mismatches 0.0" in metrics
    finally:
        scheduler.stop(10)


def test_best_of_returns_the_candidates_of_highest_log_probability_per_token(server, llm):
    """best_of 4, n 2, seeded: the candidates are the requests with seeds s..s+3; the two returned
    are those of highest mean log-probability per token, best first; usage counts all four."""
    fields = dict(model=MODEL, prompt="the end the", max_tokens=10, temperature=1.0, seed=21)
    candidates = []
    for j in range(4):
        r = server.client.completions.create(**{**fields, "seed": 21 + j}, logprobs=0)
        lp = r.choices[0].logprobs.token_logprobs
        candidates.append((sum(lp) / len(lp), r.choices[0].text, r.usage.completion_tokens))
    best = server.client.completions.create(**fields, n=2, best_of=4)
    assert [c.text for c in best.choices] == [t for _, t, _ in sorted(candidates, key=lambda c: -c[0])[:2]]
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert best.usage.completion_tokens == sum(c[2] for c in candidates) and len(best.usage.model_extra["speculation"]) == 4
    for body, says in (({"n": 3, "best_of": 2}, "at least n=3"), ({"best_of": 2, "stream": True}, "cannot be streamed")):
        r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of" and says in r.json()["error"]["message"]


REPEATED = "the end the end the end the"  # the ngram drafter drafts the first tokens


def test_n_samples_at_temperature_1_follow_the_targets_distribution(server, llm):
    """640 first tokens from 40 requests of n=16 (speculation on: the first token comes from a
    verify of up to 2 drafts; the prompt prefilled once per request and copied into the other 15 choices) against the target's softmax at the prompt's
    end: a chi-square over bins of consecutive ids holding 5 % of the mass or more. The same
    samples as an identical-seed bug would give them (choice 0 sixteen times) must fail."""
    from scipy.stats import chisquare

    import torch

    from verispec.model.transformer import Segment

    ids = llm.encode(REPEATED)
    with torch.no_grad():
        logits = llm.target.forward_many([Segment(torch.tensor(ids), llm.target.new_cache(), "last")])[0][-1]
    p = torch.softmax(logits.double(), -1)
    draws, drafted = [], 0
    for r in range(40):
        out = server.client.completions.create(model=MODEL, prompt=REPEATED, max_tokens=3, temperature=1.0, n=16,
                                               seed=1000 + 16 * r, extra_body=EXTRA)  # room for drafts: 2
        draws.append([c.model_extra["token_ids"][0] for c in out.choices])
        drafted += sum(s["drafted"] for s in out.usage.model_extra["speculation"])

    bins, mass = [0] * len(p), 0.0  # token id -> bin
    for t in range(len(p)):
        bins[t] = bins[t - 1] + (mass >= 0.05) if t else 0
        mass = float(p[t]) if t and mass >= 0.05 else mass + float(p[t])

    def pvalue(samples: list[int]) -> float:
        expected = [0.0] * (bins[-1] + 1)
        for t, q in enumerate(p.tolist()):
            expected[bins[t]] += q * len(samples)
        observed = [0] * len(expected)
        for t in samples:
            observed[bins[t]] += 1
        return chisquare(observed, expected).pvalue

    assert drafted > 100, "the first tokens were verified speculatively"
    assert pvalue([t for row in draws for t in row]) > 1e-4
    assert pvalue([row[0] for row in draws for _ in row]) < 1e-6
