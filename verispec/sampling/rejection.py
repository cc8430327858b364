"""Speculative verification (Leviathan et al. 2023; Chen et al. 2023): accept draft x with probability
min(1, p(x)/q(x)); at the first rejection draw from norm(max(0, p - q)); after a fully accepted
draft draw the bonus token from p. A drafter without a distribution (q=None) is a point mass.

`verify_batch` is the one implementation (ragged batches, each row its own τ); `verify` serves one
request; `verify_reference` is the slow, obviously-correct twin the tests hold it equal to.
"""

from __future__ import annotations

import torch

from verispec.sampling.distribution import inverse_cdf, new_generator


def verify(draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[int, list[int]]:
    """draft_token_ids [k], draft_probs [k, V] or None, target_probs [k + 1, V] ->
    (number accepted, the accepted drafts followed by the recovered or bonus token)."""
    k = draft_token_ids.shape[0]
    uniforms = uniforms_for(1, k, generator or new_generator(None), target_probs.device)
    accepted, tokens = verify_batch(draft_token_ids[None], None if draft_probs is None else draft_probs[None],
                                    target_probs[None], uniforms)
    n = int(accepted[0])
    return n, tokens[0, : n + 1].tolist()


def verify_greedy(draft_token_ids: list[int], target_ids: list[int]) -> tuple[int, list[int]]:
    """draft_token_ids [k], target_ids [k + 1]: a greedy target's choice after each draft. What verify
    gives when every target row is the point mass at its id, without building the rows: drafts are
    accepted while they equal the target's choice, then the target's own choice is emitted (the
    recovered token, or the bonus)."""
    accepted = 0
    while accepted < len(draft_token_ids) and draft_token_ids[accepted] == target_ids[accepted]:
        accepted += 1
    return accepted, list(draft_token_ids[:accepted]) + [target_ids[accepted]]


def uniforms_for(batch: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[batch, k + 1] uniforms in [0, 1): one per draft position, the last for the emitted token."""
    return torch.rand(batch, k + 1, generator=generator, device=generator.device).to(device)


def verify_batch(draft: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                 uniforms: torch.Tensor, lengths: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """draft [B, k] (row b uses its first lengths[b] ids; default all k), draft_probs [B, k, V] or None,
    target_probs [B, k + 1, V], uniforms [B, k + 1].

    Returns accepted [B] and tokens [B, k + 1]: row b holds its accepted[b] drafts, then the
    recovered or bonus token, then -1. Draft ids outside [0, V) are rejected, never used as indices.
    """
    batch, k = draft.shape
    vocab = target_probs.shape[-1]
    rows = torch.arange(batch, device=draft.device)
    lengths = torch.full((batch,), k, device=draft.device) if lengths is None else lengths
    in_draft = torch.arange(k, device=draft.device) < lengths[:, None]  # [B, k]
    valid = (draft >= 0) & (draft < vocab) & in_draft
    ids = draft.clamp(0, vocab - 1)
    # 1. accept position i while u_i * q(x_i) < p(x_i): min(1, p/q) without dividing
    p_x = target_probs[:, :k].gather(-1, ids[..., None]).squeeze(-1)  # [B, k]
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(-1, ids[..., None]).squeeze(-1)
    accept = _accepts(p_x, q_x, uniforms[:, :k]) & valid
    accepted = accept.int().cumprod(-1).sum(-1)  # [B]: the longest accepted prefix
    # 2. the emitted token: from the residual at the first rejection, or from p after a full accept
    p_row = target_probs[rows, accepted]  # [B, V]
    rejected = accepted < lengths
    at = accepted.clamp(max=max(k - 1, 0))
    if k == 0:
        q_row = torch.zeros_like(p_row)
    elif draft_probs is None:
        q_row = torch.zeros_like(p_row).scatter_(-1, ids[rows, at][:, None], valid[rows, at][:, None].float())
    else:
        q_row = draft_probs[rows, at] * valid[rows, at][:, None]
    dist = torch.where(rejected[:, None], _residual(p_row, q_row), p_row)
    emitted = inverse_cdf(dist, uniforms[:, k])
    # 3. pack: accepted drafts, the emitted token, then -1
    positions = torch.arange(k + 1, device=draft.device)
    tokens = torch.cat([draft, torch.full((batch, 1), -1, device=draft.device)], dim=1)
    tokens = torch.where(positions < accepted[:, None], tokens, torch.full_like(tokens, -1))
    tokens[rows, accepted] = emitted
    return accepted, tokens


def _accepts(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return u * q_x < p_x


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) as unnormalised weights; where p <= q everywhere (p == q up to rounding),
    the residual has no mass and p itself is the right law."""
    r = (p - q).clamp_min(0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


def verify_reference(draft: list[int], draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                     uniforms: list[float]) -> tuple[int, list[int]]:
    """One request, one position at a time, written to be read: the specification of verify_batch."""
    vocab = target_probs.shape[-1]
    out: list[int] = []
    for i, x in enumerate(draft):
        if not 0 <= x < vocab:
            q = torch.zeros(vocab)
            return i, out + [_draw(_residual(target_probs[i][None], q[None])[0], uniforms[-1])]
        q = torch.zeros(vocab).index_fill_(0, torch.tensor(x), 1.0) if draft_probs is None else draft_probs[i]
        p_x, q_x = target_probs[i, x], q[x]
        if not uniforms[i] * q_x < p_x:  # rejected: draw the recovered token from the residual
            return i, out + [_draw(_residual(target_probs[i][None], q[None])[0], uniforms[-1])]
        out.append(x)
    return len(draft), out + [_draw(target_probs[len(draft)], uniforms[-1])]


def _draw(weights: torch.Tensor, u: float) -> int:
    return int(inverse_cdf(weights[None], torch.tensor([u], dtype=weights.dtype))[0])
