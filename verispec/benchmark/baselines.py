"""transformers' generate on the same weights and prompts: plain, prompt lookup, assisted."""

from __future__ import annotations

import time
from typing import Any

import torch

from verispec.model.load import ModelSource


def load_hf(source: ModelSource) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, **kwargs).eval()


def decode_tok_s(model: Any, prompt_ids: list[int], tokens: int, **generate_kwargs: Any) -> float:
    """Greedy decode tokens per second of model.generate, its prefill (one-token run) subtracted."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **generate_kwargs)
        elapsed = time.perf_counter() - start - prefill
    return (out.shape[1] - len(prompt_ids) - 1) / max(elapsed, 1e-9)
