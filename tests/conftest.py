"""Shared fixtures: tiny random models built inside the tests (no files, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

# every backend and activation mode; the invariance, logits and real-model tests run on each
BACKENDS = ["torch", "native", "native-int8"]
EXACT_BACKENDS = [b for b in BACKENDS if not b.endswith("int8")]  # those held to transformers' logits


def backend_args(name: str) -> tuple[str, str]:
    """(backend, activations) for load_model; a native one is skipped where the kernels cannot run."""
    from verispec.model import native

    if name.startswith("native") and native.unavailable():
        pytest.skip(f"native kernels: {native.unavailable()}")
    return ("torch", "exact") if name == "torch" else ("native", "int8" if name.endswith("int8") else "exact")


# dims are multiples of 16 so elementwise kernels never take a scalar tail on some rows only
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_hf_model(architecture: str, seed: int = 0, **overrides):
    """A random transformers model of the given architecture, small enough for CPU tests."""
    import transformers as tf

    kw = {**TINY, **overrides}
    if architecture == "llama":
        config = tf.LlamaConfig(**kw, rope_theta=10000.0)
        cls = tf.LlamaForCausalLM
    elif architecture == "qwen2":
        config = tf.Qwen2Config(**kw)
        cls = tf.Qwen2ForCausalLM
    elif architecture == "qwen3":
        config = tf.Qwen3Config(**kw, head_dim=16)
        cls = tf.Qwen3ForCausalLM
    elif architecture == "gemma3":
        kw.setdefault("num_hidden_layers", 3)
        kw["num_hidden_layers"] = max(kw["num_hidden_layers"], 3)
        config = tf.Gemma3TextConfig(**kw, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                     layer_types=["sliding_attention", "sliding_attention", "full_attention"][
                                         : kw["num_hidden_layers"]] + ["sliding_attention"] * (kw["num_hidden_layers"] - 3))
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(architecture)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm scales, so a wrong norm formula shows
                p.copy_(torch.rand_like(p) * 0.5 + (0.0 if architecture == "gemma3" else 0.75))
    return model


@pytest.fixture
def hf_folder(tmp_path: Path):
    """Save a tiny transformers model to a folder and return (folder, hf_model)."""

    def make(architecture: str, **overrides):
        model = tiny_hf_model(architecture, **overrides)
        folder = tmp_path / architecture
        model.save_pretrained(folder)
        return folder, model

    return make


CHARS = list(" abcdefghijklmnopqrstuvwxyz.,!?\n0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
MERGES = [("t", "h"), ("th", "e"), ("e", "n"), ("en", "d"), ("s", "t"), ("st", "o"), ("sto", "p")]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def save_tiny_tokenizer(folder: Path, vocab_size: int = 96) -> None:
    """A character BPE with a few merges (multi-character tokens), EOS '</s>' = 2, a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + CHARS + ["".join(m) for m in MERGES]
    tokens += [f"<extra{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": [t for t in tokens if t.startswith("<extra")]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def save_tiny_llm(folder: Path, **overrides) -> Path:
    """A tiny random llama with a tokenizer: a complete model folder for LLM, CLI and server tests."""
    tiny_hf_model("llama", **overrides).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm_folder(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_folder):
    return _llm(tiny_llm_folder)


@pytest.fixture(scope="module")
def folder(request, tmp_path_factory) -> Path:
    """A tiny model for a module that serves it (test_server, test_replicas), with the module's
    CONTEXT positions."""
    return save_tiny_llm(tmp_path_factory.mktemp("served"), max_position_embeddings=request.module.CONTEXT)


@pytest.fixture(scope="module")
def llm(folder):
    return _llm(folder)


def _llm(folder: Path):
    from verispec.llm import LLM

    return LLM(str(folder))


@pytest.fixture(scope="module")
def ngram_llm(tmp_path_factory):
    """A tiny random llama of 1024 positions with the ngram drafter at tau 4, one per test module
    (tests may switch its drafter)."""
    from verispec.llm import LLM

    folder = tmp_path_factory.mktemp("tiny-ngram")
    tiny_hf_model("llama", max_position_embeddings=1024, seed=3).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return LLM(str(folder), drafter="ngram", num_draft_tokens=4)


@pytest.fixture(scope="session")
def draft_pair(tmp_path_factory):
    """(target LLM, a draft model with the same tokenizer: the target with noise on its weights, so
    that it agrees often but not always, as a real draft model does)."""
    root = tmp_path_factory.mktemp("draft")
    target = tiny_hf_model("llama", max_position_embeddings=2048, seed=3)
    target.save_pretrained(root / "target")
    torch.manual_seed(4)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.03)
    target.save_pretrained(root / "draft")
    for name in ("target", "draft"):
        save_tiny_tokenizer(root / name)
    from verispec.llm import LLM
    from verispec.model.load import ModelSource, load_model

    llm = LLM(str(root / "target"))
    draft = load_model(ModelSource.of(str(root / "draft")), llm.target.max_context, llm.target.device)
    return llm, draft
