"""The real SmolLM2-135M (fetched by `make test`): greedy output and chat template equal transformers'."""

from __future__ import annotations

import pytest
import torch

from verispec import hub
from verispec.config import SamplingParams

pytestmark = [pytest.mark.real, pytest.mark.skipif(not hub.is_fetched("smollm2-135m-instruct"),
                                                   reason="run `verispec models fetch smollm2-135m-instruct`")]
PROMPTS = ["Write a short poem about the sea.", "What is 17 times 23? Explain step by step."]


@pytest.fixture(scope="module")
def llm():
    from verispec.llm import LLM

    return LLM("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference(llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = llm.source
    tokenizer = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.gguf_file, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_template_ids_equal_transformers(llm, reference, prompt):
    tokenizer, _ = reference
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": prompt}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert llm.encode(messages) == list(expected)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_equal_transformers(llm, reference, prompt):
    _, model = reference
    ids = llm.encode(prompt, chat=True)
    ours = llm.generate(ids, SamplingParams(max_tokens=64, min_tokens=64))  # min_tokens = min_new_tokens
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64)
    assert ours.token_ids == theirs[0, len(ids):].tolist()
    assert len(ours.token_ids) == 64


@pytest.fixture(scope="module")
def torch_llm():
    from verispec.config import RuntimeConfig
    from verispec.llm import LLM

    return LLM("smollm2-135m-instruct", RuntimeConfig(backend="torch"))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_native_greedy_64_tokens_equal_the_torch_backend(llm, torch_llm, prompt):
    assert llm.target.backend_name == "native" or pytest.skip("the native backend cannot run here")
    ids = llm.encode(prompt, chat=True)
    params = SamplingParams(max_tokens=64, min_tokens=64)
    assert llm.generate(ids, params).token_ids == torch_llm.generate(ids, params).token_ids


def _has_builtin_head() -> bool:
    from verispec.eagle.head import builtin_head
    from verispec.errors import InvalidInputError

    try:
        return builtin_head().is_dir()
    except InvalidInputError:
        return False


@pytest.mark.skipif(not _has_builtin_head(), reason="no EAGLE head is built in")
@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_built_in_eagle_head_drafts_for_smollm2_and_keeps_its_greedy_output(llm, prompt):
    from verispec.llm import LLM

    eagle = LLM("smollm2-135m-instruct", drafter="eagle", num_draft_tokens=4)
    ids = llm.encode(prompt, chat=True)
    params = SamplingParams(max_tokens=64)
    out = eagle.generate(ids, params)
    assert out.token_ids == llm.generate(ids, params).token_ids
    assert out.stats.accepted > 0  # it reads SmolLM2's own features: some drafts are right
