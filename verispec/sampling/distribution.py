"""The one function that turns logits into the distribution a token is drawn from.

It serves plain decoding, the target's p and a drafter's q alike, so the three can never disagree
on temperature or truncation (RELIABILITY.md E1, E3).
"""

from __future__ import annotations

import torch

from verispec.config import SamplingParams
from verispec.errors import NumericsError


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [rows, vocab] -> probabilities [rows, vocab] (float32, rows sum to 1).

    Greedy (temperature 0) is the one-hot of the argmax (the first maximal id on ties). Otherwise
    softmax(logits / temperature) restricted by top-k, then top-p, then min-p, renormalised.
    Penalties and masks are the caller's (Sampler), applied to the logits before.
    """
    x = logits.float()
    if not params.greedy:
        x = x / params.temperature
    check_finite(x)
    if params.greedy:
        return torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(p, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        drop = (mass_before >= params.top_p).scatter(-1, order, mass_before >= params.top_p)
        p = p.masked_fill(drop, 0.0)
    if params.min_p > 0:
        p = p.masked_fill(p < params.min_p * p.amax(-1, keepdim=True), 0.0)
    return p / p.sum(-1, keepdim=True)


def check_finite(x: torch.Tensor) -> None:
    """Fail loudly rather than draw a token from NaN: logits may be -inf (masked), never NaN or +inf,
    and every row must leave some token possible."""
    if torch.isnan(x).any() or torch.isposinf(x).any() or torch.isneginf(x).all(-1).any():
        raise NumericsError(f"the logits hold NaN or infinite values ({int(torch.isnan(x).sum())} NaN, "
                            f"{int(torch.isposinf(x).sum())} +inf, rows with every token masked: "
                            f"{int(torch.isneginf(x).all(-1).sum())}): no token can be drawn from them")


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one id per row of probs [rows, vocab] by inverting the CDF at a uniform -> [rows]."""
    return inverse_cdf(probs, torch.rand(probs.shape[0], generator=generator, device=probs.device))


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [B, V] (unnormalised, >= 0), u [B] in [0, 1) -> ids [B]: the first id whose cumulative
    weight exceeds u * total; never an id of zero weight."""
    cdf = weights.cumsum(-1)
    ids = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    # Rounding can put u * total at the very end; the last id with weight is the right answer there.
    last_nonzero = weights.shape[-1] - 1 - (weights.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(ids, last_nonzero)


def new_generator(seed: int | None, device: torch.device = torch.device("cpu")) -> torch.Generator:
    """A private stream per request: seeded -> reproducible; unseeded -> fresh entropy. Never the global RNG."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
