"""The generation loop: prefill, then steps that each commit one or more tokens."""

from __future__ import annotations

import time

import torch

from verispec.engine.request import Request
from verispec.model.transformer import Transformer
from verispec.sampling import probabilities, sample
from verispec.sampling.distribution import new_generator
from verispec.types import Stats


class Engine:
    """Owns a target model and its KV cache; runs one request at a time."""

    def __init__(self, target: Transformer) -> None:
        self.target = target
        self.cache = target.new_cache()

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def run(self, request: Request) -> Stats:
        device = self.target.device
        generator = new_generator(request.params.seed)
        stats = Stats(prompt_tokens=len(request.prompt_ids))
        self.cache.truncate(0)
        start = time.perf_counter()
        prompt = torch.tensor(request.prompt_ids, device=device)
        logits = self.target.forward(prompt, torch.arange(len(prompt), device=device), self.cache, last_only=True)
        stats.target_forwards += 1
        stats.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        while True:
            probs = probabilities(logits[-1:], request.params, request.suppressed())
            token = int(sample(probs, generator)[0]) if not request.params.greedy else int(probs.argmax())
            request.commit([token])
            if request.finished:
                break
            pos = self.cache.length
            logits = self.target.forward(torch.tensor([token], device=device), torch.tensor([pos], device=device),
                                         self.cache)
            stats.target_forwards += 1
        stats.decode_s = time.perf_counter() - start
        stats.completion_tokens = len(request.output_ids)
        return stats
