"""Training data for an EAGLE-3 head: the target's own answers (self-distillation).

Prompts come from a user's JSONL (bench's loader: prompts, conversations or logged request bodies)
or, with none, from the target itself: it writes user turns under its chat template at temperature
1, deduplicated. Spec-Bench is evaluation data and is refused here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from verispec.benchmark.advise import decode_all
from verispec.benchmark.prompts import load_prompts
from verispec.config import SamplingParams
from verispec.errors import InvalidInputError
from verispec.llm import LLM

EVALUATION_SETS = ("spec-bench",)


@dataclass
class Example:
    """One conversation: ids = prompt + the target's answer; the loss is taken on the answer."""

    ids: list[int]
    prompt_len: int


def user_prefix(llm: LLM) -> list[int]:
    """The ids that open a user turn under the chat template (what the target continues to write one)."""
    marker = "\x00"
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return list(llm.tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"])


def own_prompts(llm: LLM, count: int, seed: int, max_tokens: int = 48, progress: bool = False) -> list[list[int]]:
    """Up to `count` distinct user turns the target writes itself, as chat prompts."""
    prefix = user_prefix(llm)
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[list[int]] = []
    for _ in range(3):  # duplicates and empty turns are dropped; a few rounds fill the count
        need = count - len(prompts)
        if need <= 0:
            break
        params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.95, seed=rng.randrange(2**31))
                  for _ in range(need + need // 4)]
        for turn in decode_all(llm, [prefix] * len(params), params, progress=progress):
            text = llm.tokenizer.decode(turn, skip_special_tokens=True).strip()
            if len(turn) >= 4 and text and text not in seen:
                seen.add(text)
                prompts.append(llm.encode([{"role": "user", "content": text}]))
    return prompts[:count]


def file_prompts(llm: LLM, source: str) -> list[list[int]]:
    if source in EVALUATION_SETS:
        raise InvalidInputError(f"prompts={source!r} is evaluation data (Spec-Bench): a head trained on it would "
                                "report acceptance it never earned; give your own JSONL, or none to let the "
                                "target write its own prompts", param="prompts")
    return [llm.encode(p.text, chat=p.chat) for p in load_prompts(source)]


def answer(llm: LLM, prompts: list[list[int]], max_tokens: int, progress: bool = False) -> list[Example]:
    """The target's greedy answers, batched."""
    outputs = decode_all(llm, prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), progress=progress)
    return [Example(p + o, len(p)) for p, o in zip(prompts, outputs) if o]


def target_features(llm: LLM, ids: list[int], layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's features of every position of `ids`: (fused layers [n, len(layers), H], the
    residual stream leaving the last layer [n, H], whose logits are the target's distribution)."""
    features = llm.target.features(ids, (*layers, llm.target.config.num_layers))  # [n, len(layers) + 1, H]
    return features[:, :-1].contiguous(), features[:, -1].contiguous()
