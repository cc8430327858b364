"""Scoring a text with the target: each token's log-probability given the tokens before it (a
completion's `echo`), and how near a tie its choice after a text was (the audit's and bench's
report of a divergence)."""

from __future__ import annotations

import torch

from verispec.config import SamplingParams
from verispec.model.transformer import Transformer
from verispec.sampling import Sampler
from verispec.types import TokenLogprob

CHUNK = 128  # prompt rows per forward: their logits, [CHUNK, V], are all kept at once


def prompt_logprobs(target: Transformer, ids: list[int], top: int) -> list[TokenLogprob]:
    """ids[1:] scored: the model's own log-softmax (raw; a prompt token was not sampled, so no
    sampling distribution applies) with the `top` likeliest at each position."""
    sampler = Sampler(SamplingParams(logprobs=top, logprobs_mode="raw"), ids, [])
    cache = target.new_cache(len(ids))
    device = target.device
    out: list[TokenLogprob] = []
    for start in range(0, len(ids) - 1, CHUNK):
        chunk = ids[start: start + CHUNK]
        logits = target.forward(torch.tensor(chunk, device=device), torch.arange(start, start + len(chunk), device=device),
                                cache)
        scored = ids[start + 1: start + len(chunk) + 1]  # row i predicts the token after chunk[i]
        out += sampler.logprobs(logits, [], (), None, range(len(scored)), scored)
    return out


def logit_margin(target: Transformer, ids: list[int]) -> float:
    """The target's top-1 minus top-2 logit after ids: how near a tie a diverging position was (a
    margin near 0 points at rounding, a large one at a verifier or cache bug)."""
    device = target.device
    logits = target.forward(torch.tensor(ids, device=device), torch.arange(len(ids), device=device),
                            target.new_cache(len(ids)), last_only=True)[0]
    top = torch.topk(logits, 2).values
    return round(float(top[0] - top[1]), 6)
