"""llama.cpp as a bench baseline: without the extra, a clear error naming it; `bench` puts llama.cpp's
plain decoding beside every config in the same rounds (a stand-in for llama.cpp, so no extra needed);
with the extra and the real model, one quick decode."""

from __future__ import annotations

import json
import sys

import pytest

from verispec import hub
from verispec.benchmark import llamacpp, runner
from verispec.cli.main import main
from verispec.errors import InvalidInputError
from verispec.model.load import ModelSource


def test_missing_extra_is_a_clear_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with pytest.raises(InvalidInputError, match=r"llama-cpp-python.*pip install 'verispec\[llamacpp\]'"):
        llamacpp.require()
    with pytest.raises(InvalidInputError, match=r"verispec\[llamacpp\]"):
        llamacpp.LlamaCpp(ModelSource(tmp_path, "model.gguf"), threads=2)


def test_bench_without_the_extra_exits_2_before_loading(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["bench", "--model", "/no/model", "--baselines", "plain,llamacpp"]) == 2
    assert "verispec[llamacpp]" in capsys.readouterr().err


def test_a_folder_model_is_refused(tiny_llm_folder):
    with pytest.raises(InvalidInputError, match="needs a .gguf model"):
        llamacpp.LlamaCpp(ModelSource(tiny_llm_folder, None), threads=2)


def test_bench_bogus_baseline_exits_2(tiny_llm_folder, capsys):
    assert main(["bench", "--model", str(tiny_llm_folder), "--baselines", "plain,bogus"]) == 2
    assert "baselines='plain,bogus' is not allowed: choose from plain, transformers, llamacpp" in capsys.readouterr().err


class FakeLlamaCpp:
    """Decodes at a fixed rate, echoing the prompt's first id; records the prompts it was given."""

    calls: list[tuple[list[int], int]] = []

    def __init__(self, source, threads, n_ctx=2048):
        assert threads >= 1 and n_ctx >= 2048

    def decode(self, prompt_ids, tokens):
        FakeLlamaCpp.calls.append((list(prompt_ids), tokens))
        return 50.0, [prompt_ids[0]] * tokens

    def verify_curve_ms(self, max_k, context=128, repeats=5):
        return tuple(5.0 + k for k in range(max_k))

    def close(self):
        pass


def test_bench_puts_llamacpp_in_the_same_rounds(tiny_llm_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(llamacpp, "require", lambda: None)
    monkeypatch.setattr(runner, "LlamaCpp", FakeLlamaCpp)
    FakeLlamaCpp.calls = []
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"category": c, "turns": [t]}) for c, t in
                                 [("copy", "the end the end the end"), ("free", "hello there")]))
    assert main(["bench", "--model", str(tiny_llm_folder), "--prompts", str(prompts), "--num-draft-tokens", "2",
                 "--max-tokens", "12", "--rounds", "2", "--baselines", "plain,llamacpp"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    rows = result["categories"]["overall"]
    assert set(rows) == {"plain", "ngram/2", "llamacpp"}
    assert rows["llamacpp"]["runs"] == 4 and rows["llamacpp"]["tok_s"] == 50.0 and rows["llamacpp"]["vs_llamacpp"] == 1.0
    # every config's ratio against llama.cpp: per prompt the median over rounds, then over prompts
    for name in ("plain", "ngram/2"):
        assert rows[name]["vs_llamacpp"] > 0
    assert 0 <= rows["llamacpp"]["parts_from_plain_at"] <= 12
    assert len(FakeLlamaCpp.calls) == 1 + 4  # a warm-up, then 2 prompts x 2 rounds
    fed = [tuple(ids) for ids, tokens in FakeLlamaCpp.calls[1:] if tokens == 12]
    assert len(fed) == 4 and all(fed.count(ids) == 2 for ids in fed)  # each prompt once a round
    assert result["llamacpp_verify_ms"]["1"] == 5.0 and len(result["llamacpp_verify_ms"]) == 2 + 1
    assert any(line.startswith("llama.cpp verify cost") for line in printed)
    assert "vs llama.cpp" in printed[0]


needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="the extra verispec[llamacpp] is not installed")


@pytest.mark.real
@needs_llamacpp
@pytest.mark.skipif(not hub.is_fetched("smollm2-135m-instruct"), reason="run `verispec models fetch smollm2-135m-instruct`")
def test_real_llamacpp_decodes_and_rolls_back():
    from verispec.llm import LLM

    llm = LLM("smollm2-135m-instruct")
    model = llamacpp.LlamaCpp(llm.source, threads=2)
    ids = llm.encode("Write a short poem about the sea.", chat=True)
    rate, out = model.decode(ids, 8)
    assert rate > 0 and len(out) == 8 and all(0 <= t < llm.target.config.vocab_size for t in out)
    assert model.decode(ids, 8)[1] == out  # the cache rolled back to the prompt: the same greedy tokens
    assert model.prefill_s(ids, repeats=1) > 0
    model.close()
