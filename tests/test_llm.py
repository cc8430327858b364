"""The LLM facade and the CLI on a tiny random model with a real tokenizer folder."""

from __future__ import annotations

import json
import re

import pytest

from verispec.cli.main import main
from verispec.config import SamplingParams
from verispec.errors import ContextOverflowError, InvalidInputError


def test_greedy_generation_is_deterministic_and_counts_match(tiny_llm):
    a = tiny_llm.generate("the end", SamplingParams(max_tokens=20, ignore_eos=True))
    b = tiny_llm.generate("the end", SamplingParams(max_tokens=20, ignore_eos=True))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20 and a.finish_reason == "length"
    assert a.stats.completion_tokens == 20 and a.stats.cycles == 20 and a.stats.target_forwards == 21


def test_text_equals_decode_of_token_ids(tiny_llm):
    out = tiny_llm.generate("hello", SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True))
    assert out.text == tiny_llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_same_seed_same_output_other_seed_other_output(tiny_llm):
    outs = [tiny_llm.generate("hi", SamplingParams(max_tokens=30, temperature=1.5, seed=s, ignore_eos=True)).token_ids
            for s in (1, 1, 2)]
    assert outs[0] == outs[1] != outs[2]


def test_stop_string_cuts_the_text_and_keeps_the_completing_token(tiny_llm):
    free = tiny_llm.generate("abc", SamplingParams(max_tokens=40, ignore_eos=True))
    stop = free.text[10:12]
    out = tiny_llm.generate("abc", SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.find(stop)]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert stop in tiny_llm.tokenizer.decode(out.token_ids) and stop not in tiny_llm.tokenizer.decode(out.token_ids[:-1])


def test_chat_messages_use_the_chat_template(tiny_llm):
    ids = tiny_llm.encode([{"role": "user", "content": "hi"}])
    assert tiny_llm.tokenizer.decode(ids) == "<s>user\nhi</s><s>assistant\n"
    assert tiny_llm.encode("hi", chat=True) == ids


@pytest.mark.parametrize("prompt,match", [
    ([{"role": "wizard", "content": "x"}], "role='wizard' is not allowed"),
    ([{"role": "user", "content": 5}], "content must be a string"),
    ([1, 2, 999], r"outside the vocabulary \[0, 96\)"),
    ([1.5, "a"], "prompt must be"),
])
def test_bad_prompts_are_typed_errors(tiny_llm, prompt, match):
    with pytest.raises(InvalidInputError, match=match):
        tiny_llm.generate(prompt)


def test_prompt_longer_than_the_context_is_refused(tiny_llm):
    with pytest.raises(ContextOverflowError, match="the context holds"):
        tiny_llm.generate([5] * (tiny_llm.engine.capacity + 1))


def test_cli_generate_json(tiny_llm_folder, capsys):
    assert main(["generate", "--model", str(tiny_llm_folder), "--prompt", "the", "--max-tokens", "7",
                 "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 7 and out["finish_reason"] == "length" and "decode_s" in out["stats"]


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "temperature=-1.0 is not allowed"),
    (["--top-p", "0"], "top_p=0.0 is not allowed"),
    (["--max-tokens", "0"], "max_tokens=0 is not allowed"),
    (["--model", "/no/such/model.gguf"], "'/no/such/model.gguf' is neither a built-in name"),
])
def test_cli_bad_input_exits_2_with_a_message(tiny_llm_folder, capsys, args, message):
    argv = ["generate", "--model", str(tiny_llm_folder), "--prompt", "x", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_compare_runs_speculation_beside_plain(tiny_llm_folder, capsys):
    assert main(["generate", "--model", str(tiny_llm_folder), "--prompt", "the end the end", "--max-tokens", "40",
                 "--ignore-eos", "--drafter", "ngram", "--num-draft-tokens", "3", "--compare", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == out["plain"]["token_ids"]
    assert out["stats"]["cycles"] < 40 and out["plain"]["stats"]["cycles"] == 40


@pytest.mark.parametrize("args,message", [
    (["--drafter", "oracle"], "drafter='oracle' is not allowed; allowed: none, ngram, ngram-tree, suffix, suffix-tree, draft:MODEL"),
    (["--drafter", "ngram", "--num-draft-tokens", "0"], "num_draft_tokens=0 is not allowed"),
])
def test_cli_bad_drafter_settings_exit_2(tiny_llm_folder, capsys, args, message):
    assert main(["generate", "--model", str(tiny_llm_folder), "--prompt", "x", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("drafter_k", [0, 3])
@pytest.mark.parametrize("stop_length", [0, 1, 3])
def test_streamed_text_equals_generated_text_equals_decode(tiny_llm_folder, drafter_k, stop_length):
    """C3, also with stop strings (taken from the unstopped text) that a stream must hold back."""
    from verispec.llm import LLM

    llm = LLM(str(tiny_llm_folder), drafter="ngram" if drafter_k else None, num_draft_tokens=max(drafter_k, 1))
    prompt, params = "the end the stop the end", SamplingParams(max_tokens=60, ignore_eos=True)
    unstopped = llm.generate(prompt, params).text
    stop = (unstopped[len(unstopped) // 2:][:stop_length],) if stop_length else ()
    params = SamplingParams(max_tokens=60, ignore_eos=True, stop=stop)
    full = llm.generate(prompt, params)
    *pieces, out = list(llm.stream(prompt, params))
    assert "".join(pieces) == out.text == full.text and out.token_ids == full.token_ids
    assert len(pieces) > 1, "a stream must deliver text as it is made"
    if stop:
        assert out.finish_reason == "stop" and stop[0] not in out.text
    else:
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_cli_trace_has_a_run_line_and_one_line_per_cycle(tiny_llm_folder, tmp_path, capsys):
    from verispec.engine.trace import read_trace

    path = tmp_path / "trace.jsonl"
    assert main(["generate", "--model", str(tiny_llm_folder), "--prompt", "the end the end the end", "--max-tokens",
                 "50", "--ignore-eos", "--drafter", "ngram", "--num-draft-tokens", "4", "--trace", str(path),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    trace = read_trace(path)
    assert trace.run["target_step_ms"] > 0 and trace.run["drafter"] == "ngram"
    assert len(trace.cycles) == out["stats"]["cycles"]
    assert [t for c in trace.cycles for t in c["tokens"]] == out["token_ids"]
    assert sum(c["accepted"] for c in trace.cycles) == out["stats"]["accepted"]
    assert trace.run["schema"] == 2
    assert all(c["verify_ms_per_cycle"] > 0 and c["tau"] == 4 and c["fed"] == 0 for c in trace.cycles)


@pytest.mark.parametrize("content,message", [
    ("", "is empty"), ("not json\n", "line 1: not JSON"), ('{"type": "cycle"}\n', "first line must be the run line"),
    ('{"type": "run"}\n{"type": "cycle", "tau": 2, "drafted": 2, "accepted": 3, "draft_ms_per_cycle": 1, '
     '"verify_ms_per_cycle": 1}\n', "line 2: accepted=3 must be in [0, drafted=2]"),
    ('{"type": "run", "schema": 1}\n{"type": "cycle", "tau": 2, "drafted": 2, "accepted": 3, "draft_ms": 1, '
     '"verify_ms": 1}\n', "line 2: accepted=3 must be in [0, drafted=2]"),  # schema 1's names still read
    ('{"type": "run"}\n{"type": "cycle", "tau": 2, "drafted": 2, "accepted": 1, "draft_ms": 1, "verify_ms": 1}\n',
     "line 2: cycle lacks numeric field(s) draft_ms_per_cycle, verify_ms_per_cycle"),
    ('{"type": "run"}\n{"type": "cycle", "tau": 2, "drafted": 2, "accepted": 1, "draft_ms_per_cycle": 1, '
     '"verify_ms_per_cycle": 1, "fed": -3}\n', "line 2: fed=-3 must be an integer >= 0"),
    ('{"type": "run", "schema": 3}\n', "line 1: schema 3 is not one this version reads (1 or 2)"),
    ('{"type": "run"}\n{"type": "cycle", "tau": 2}\n', "line 2: cycle lacks numeric field(s) drafted"),
])
def test_bad_traces_are_refused_naming_the_line(tmp_path, content, message):
    from verispec.engine.trace import read_trace
    from verispec.errors import InvalidInputError

    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        read_trace(path)


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft"])
def test_a_context_that_is_not_a_multiple_of_64_is_one_length_for_rope_cache_and_requests(tiny_llm_folder, drafter):
    """The cache's storage is whole blocks of 64, but a sequence may use exactly max_context positions:
    the RoPE tables' length. A request reaching the last one finishes with 'length', none beyond."""
    from verispec.config import RuntimeConfig
    from verispec.llm import LLM

    name = f"draft:{tiny_llm_folder}" if drafter == "draft" else drafter
    llm = LLM(str(tiny_llm_folder), RuntimeConfig(max_context=100), drafter=name, num_draft_tokens=4)
    for prompt in ([5, 6, 7] * 30, [9] * 99):  # output runs into the last position; a prompt that fills all but one
        out = llm.generate(prompt, SamplingParams(max_tokens=50, ignore_eos=True))
        assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == 100
    assert llm.engine.capacity == llm.target.max_context == 100
    with pytest.raises(ContextOverflowError, match="the context holds 100, so the prompt must have at most 99"):
        llm.generate([5] * 100)


@pytest.mark.parametrize("bad", [96, 99999, 2**70])
def test_stop_token_ids_outside_the_vocabulary_are_refused_before_the_engine_sees_them(tiny_llm, bad):
    with pytest.raises(InvalidInputError, match=r"stop_token_ids \[\d+\] are outside the vocabulary \[0, 96\)") as e:
        tiny_llm.generate("the", SamplingParams(max_tokens=8, min_tokens=1, stop_token_ids=(bad,)))
    assert e.value.param == "stop_token_ids"


@pytest.mark.parametrize("prompt", ["bad \ud800 x", [{"role": "user", "content": "bad \udfff"}]])
def test_lone_surrogates_are_refused_as_invalid_unicode(tiny_llm, prompt):
    with pytest.raises(InvalidInputError, match="is not valid Unicode: .* is a lone surrogate"):
        tiny_llm.generate(prompt, SamplingParams(max_tokens=2))


def test_a_tiny_temperature_is_greedy(tiny_llm):
    greedy = tiny_llm.generate("the end", SamplingParams(max_tokens=20, ignore_eos=True)).token_ids
    for temperature in (1e-300, 1e-40):
        params = SamplingParams(max_tokens=20, ignore_eos=True, temperature=temperature, seed=1)
        assert tiny_llm.generate("the end", params).token_ids == greedy


def test_import_verispec_does_not_load_torch_and_llm_is_importable_from_the_package():
    import subprocess
    import sys

    code = ("import sys, verispec; assert 'torch' not in sys.modules, 'torch loaded eagerly'; "
            "from verispec import LLM, SamplingParams; from verispec.llm import LLM as L; assert LLM is L")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
