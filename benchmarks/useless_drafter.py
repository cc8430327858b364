"""The controller's guarantee where drafting cannot pay: a draft model that always disagrees (random
weights, the target's tokenizer) at a fixed tau and at tau auto, beside plain decoding, same run.

    python benchmarks/useless_drafter.py [--model smollm2-135m-instruct] [--per-category 1] [--rounds 1]

Prints the bench table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from verispec import hub
from verispec.benchmark.prompts import load_prompts
from verispec.benchmark.runner import run_bench
from verispec.cli.bench import table
from verispec.config import RuntimeConfig
from verispec.llm import LLM


def random_draft_model(llm: LLM, folder: Path) -> str:
    """A 2-layer random llama with the target's tokenizer: cheap, and accepted almost never."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=llm.target.config.vocab_size, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=8192)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    llm.tokenizer.save_pretrained(folder)
    return f"draft:{folder}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=hub.DEFAULT_MODEL)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    llm = LLM(args.model, RuntimeConfig(threads=2, max_context=4096))
    prompts = load_prompts("spec-bench", ["writing", "roleplay", "qa", "translation"], args.per_category)
    with tempfile.TemporaryDirectory() as tmp:
        drafter = random_draft_model(llm, Path(tmp))
        result = run_bench(llm, prompts, [drafter], [4, "auto"], args.max_tokens, rounds=args.rounds)
    result.pop("traces")
    print(table(result).replace(drafter, "random-draft"))
    print(json.dumps(result).replace(drafter, "random-draft"))


if __name__ == "__main__":
    main()
