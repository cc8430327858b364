"""Speculative verification (Leviathan et al. 2023; Chen et al. 2023): accept draft x with probability
min(1, p(x)/q(x)); at the first rejection draw from norm(max(0, p - q)); after a fully accepted
draft draw the bonus token from p. A drafter without a distribution (q=None) is a point mass.

`verify_batch` is the one implementation (ragged batches, each row its own τ); `verify` serves one
request; `verify_reference` is the slow, obviously-correct twin the tests hold it equal to.

Trees (verispec/tree.py): `verify_tree` walks down from the root. At a node with target row r it tries
the children in node order, child x_i with its q_i: accepted with probability min(1, r(x_i)/q_i(x_i)),
else r <- norm(max(0, r - q_i)) (SpecInfer's multi-round rule, for children drawn from q with
replacement). A deterministic child (q None) is the point mass q_i = one-hot(x_i): accepted with
probability r(x_i) over the mass not yet rejected, which is "draw x from r; descend if it is a child".
When every child is rejected the emitted token is drawn from what is left of r. `verify_tree_greedy`
follows the child equal to the target's choice; `verify_tree_reference` is the slow twin.
"""

from __future__ import annotations

import torch

from verispec import tree
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


def verify_tree_greedy(draft_token_ids: list[int], parents: list[int], target_ids: list[int]
                       ) -> tuple[list[int], list[int]]:
    """draft_token_ids [n], parents [n], target_ids [n + 1]: the greedy target's choice after each node
    (the root first) -> (the accepted nodes, root's child first; their tokens, then the target's choice
    after the deepest). Follows the first child equal to the target's choice, as deep as it goes."""
    below = tree.children(parents)
    node, path = 0, []
    while (child := next((c for c in below[node] if draft_token_ids[c - 1] == target_ids[node]), None)) is not None:
        path.append(child)
        node = child
    return path, [draft_token_ids[c - 1] for c in path] + [target_ids[node]]


def verify_tree(draft_token_ids: list[int], parents: list[int], draft_probs: torch.Tensor | None,
                target_probs: torch.Tensor, uniforms: list[float]) -> tuple[list[int], list[int]]:
    """draft_token_ids [n], parents [n], draft_probs [n, V] (row i: the q node i + 1 was drawn from) or
    None (deterministic children), target_probs [n + 1, V] (row j: after node j, the root first),
    uniforms [n + 1] (node j's coin at j - 1, the emitted token's last) -> (the accepted nodes, root's
    child first; their tokens, then the recovered or bonus token). On a chain it is `verify`."""
    vocab = target_probs.shape[-1]
    below = tree.children(parents)
    node, path = 0, []
    r = target_probs[0]
    while True:
        for child in below[node]:
            x = draft_token_ids[child - 1]
            if not 0 <= x < vocab:  # never accepted, never an index; it holds no mass of r
                continue
            q_x = 1.0 if draft_probs is None else draft_probs[child - 1, x]
            if uniforms[child - 1] * q_x < r[x]:
                path.append(child)
                node, r = child, target_probs[child]
                break
            r = _normalised(_residual(r, _one_hot(x, r) if draft_probs is None else draft_probs[child - 1]))
        else:
            return path, [draft_token_ids[c - 1] for c in path] + [_draw(r, uniforms[-1])]


def _one_hot(x: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like).index_fill_(0, torch.tensor(x), 1.0)


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    """The next child's coin compares with r itself, so the residual must be a distribution again."""
    return weights / weights.sum(-1, keepdim=True)


def verify_tree_reference(draft: list[int], parents: list[int], draft_probs: torch.Tensor | None,
                          target_probs: torch.Tensor, uniforms: list[float]) -> tuple[list[int], list[int]]:
    """verify_tree written to be read: every child gets its q as a row (one-hot for a point mass), the
    children are found by scanning the parents, and the walk recurses."""
    vocab = target_probs.shape[-1]

    def walk(node: int, r: torch.Tensor) -> tuple[list[int], list[int]]:
        for child in [c for c in range(1, len(draft) + 1) if parents[c - 1] == node]:
            x = draft[child - 1]
            if not 0 <= x < vocab:
                continue
            q = torch.zeros(vocab).index_fill_(0, torch.tensor(x), 1.0) if draft_probs is None else draft_probs[child - 1]
            if uniforms[child - 1] * q[x] < r[x]:  # accepted with probability min(1, r(x) / q(x))
                path, tokens = walk(child, target_probs[child])
                return [child] + path, [x] + tokens
            r = _normalised(_residual(r[None], q[None])[0])  # r <- norm(max(0, r - q))
        return [], [_draw(r, uniforms[-1])]

    return walk(0, target_probs[0])
