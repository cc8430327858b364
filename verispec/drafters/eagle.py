"""An EAGLE-3 head drafts from the target's hidden states (verispec/eagle/head.py).

The engine hands the drafter the target's features of every token it commits (`features`, for the
layers in `feature_layers`); the context's last token (pending) has none yet. A proposal first takes
in the pairs it has not seen (pair t: the features at t and the token at t + 1; the last pair ends
at the pending token), then drafts one token per head step on its own features. Its head cache
keeps the pairs built from the target's features; the drafted ones are dropped at the next proposal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verispec.drafters.base import DraftProposal
from verispec.eagle.head import Head
from verispec.sampling import Sampler


WIDTH = 4  # a tree's children per node and nodes expanded per depth (EAGLE-2's top-k)


def _argmax_is_greedy(sampler: Sampler) -> bool:
    """Whether the request's greedy choice over the head's q is its argmax (no bias, penalty or
    format; min_tokens hides the stop ids, which the argmax can skip): then a draft is a point mass."""
    p = sampler.params
    return p.greedy and not p.penalized and not p.logit_bias and sampler.grammar is None


class EagleDrafter:
    """A chain (the head's q, sampled or argmax), or with tree=True EAGLE-2's dynamic tree of top-k
    children (`_tree`)."""

    def __init__(self, head: Head, capacity: int, tree: bool = False) -> None:
        self.head = head  # drafting runs on the native kernels where they run (Head.use_native)
        self.capacity = capacity
        self.tree = tree
        self.cache = head.new_cache(capacity)
        self._unseen: list[torch.Tensor] = []  # target features [m, layers, H] not yet in the head cache
        self._seen = 0  # pairs in the head cache built from the target's features
        self._last: torch.Tensor | None = None  # h [1, H] of the last of them: its logits give draft 1
        self._sampler: Sampler | None = None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.head.config.layers

    @property
    def batch_key(self) -> int:
        return id(self.head)

    def fork(self) -> EagleDrafter:
        return EagleDrafter(self.head, self.capacity, self.tree)

    def reset(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._unseen, self._seen, self._last = [], 0, None
        self.cache.truncate(0)

    def features(self, rows: torch.Tensor) -> None:
        """The target's features [m, layers, H] of the next m committed tokens."""
        self._unseen.append(rows)

    def backlog(self, context: Sequence[int]) -> int:
        return sum(len(rows) for rows in self._unseen)

    def observe(self, num_accepted: int) -> None:
        pass  # drafted pairs are dropped from the head cache at the next proposal

    def propose(self, context: Sequence[int], k: int) -> DraftProposal:
        return self.propose_many([(self, context, k)])[0]

    @staticmethod
    def propose_many(jobs: Sequence[tuple[EagleDrafter, Sequence[int], int]]) -> list[DraftProposal]:
        """Proposals for drafters that share one head: every head step is one pass for all."""
        head = jobs[0][0].head
        drafts: list[list[int]] = [[] for _ in jobs]
        rows: list[list[torch.Tensor]] = [[] for _ in jobs]
        fed = [0] * len(jobs)
        # never past the head's context, nor the target's (RELIABILITY.md D9)
        limits = [min(k, drafter.cache.capacity - len(context)) for drafter, context, k in jobs]
        feeds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # job -> (tokens [n], g [n, H]) to take in
        ready: dict[int, torch.Tensor] = {}  # job -> the h [1, H] whose logits give its next draft
        for idx, (drafter, context, _) in enumerate(jobs):
            if drafter._sampler is None:
                raise RuntimeError("EagleDrafter.propose before reset(sampler)")
            feed = drafter._catch_up(context)
            if feed is not None:
                feeds[idx], fed[idx] = feed, len(feed[0])
            elif drafter._last is not None and drafter._seen == len(context) - 1:
                ready[idx] = drafter._last  # the same context again: no pair to take in
        catching_up = set(feeds)
        trees: dict[int, DraftProposal] = {}
        while feeds or ready:
            if feeds:
                found = head.step([(tokens, g, jobs[idx][0].cache) for idx, (tokens, g) in feeds.items()])
                for idx, h in zip(list(feeds), found):
                    ready[idx] = h[-1:]
                    if idx in catching_up:
                        jobs[idx][0]._last = h[-1:]
                feeds, catching_up = {}, set()
            for idx in [idx for idx in ready if jobs[idx][0].tree]:  # a tree grows on its own, level by level
                if limits[idx] > 0:
                    trees[idx] = jobs[idx][0]._tree(ready[idx], limits[idx])
                del ready[idx]
            for idx, h in ready.items():
                drafter, context, _ = jobs[idx]
                sampler = drafter._sampler
                if limits[idx] <= 0:
                    continue
                history = list(context[len(sampler.prompt_ids):]) + drafts[idx]
                with torch.inference_mode():
                    if _argmax_is_greedy(sampler):  # no [V] row to build
                        logits = head.logits(h)[0]  # [draft_vocab]
                        if len(history) < sampler.params.min_tokens:  # min_tokens: no stop yet
                            hidden = [t for t in sampler.stop_ids if head.t2d[t]]
                            logits[torch.searchsorted(head.draft_ids, torch.tensor(hidden, dtype=torch.long))] = float("-inf")
                        drafts[idx].append(int(head.draft_ids[int(logits.argmax())]))
                    else:
                        probs = sampler.probs(head.full_logits(h), history)  # [1, V], zero outside the draft vocabulary
                        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
                            continue  # the request's rules leave no draft-vocabulary token: stop drafting here
                        drafts[idx].append(int(sampler.sample(probs)[0]))
                        rows[idx].append(probs[0])
                if len(drafts[idx]) < limits[idx] and drafts[idx][-1] not in sampler.stop_ids:
                    feeds[idx] = (torch.tensor(drafts[idx][-1:]), h)
            ready = {}
        return [DraftProposal(trees[idx].token_ids, None, fed[idx], trees[idx].parents) if idx in trees else
                DraftProposal(tokens, torch.stack(r) if r else None, fed[idx])
                for idx, (tokens, r) in enumerate(zip(drafts, rows))]

    @torch.inference_mode()
    def _tree(self, root: torch.Tensor, k: int) -> DraftProposal:
        """EAGLE-2's dynamic tree of at most k nodes after the root (the last committed pair, whose h
        [1, H] is `root`): each depth keeps the WIDTH likeliest children (by path probability under
        the head's q) of the nodes the depth before kept, and expands them in one head pass. The
        children are deterministic (top-k), so the proposal carries no q."""
        head, stops = self.head, set(self._sampler.stop_ids)
        base = self.cache.length  # the committed pairs' slots come first
        tokens: list[int] = []
        parents: list[int] = []
        score, depth, slot = {0: 0.0}, {0: 0}, {}  # per node: path log-probability, depth, head-cache slot
        frontier = [(0, root[0])]  # (node, its h [H]): the nodes whose children come next
        while frontier and len(tokens) < k:
            logq = torch.log_softmax(head.logits(torch.stack([h for _, h in frontier])), dim=-1)  # [f, draft_vocab]
            top = logq.topk(min(WIDTH, logq.shape[-1]), dim=-1)
            found = sorted(((score[node] + float(v), node, int(d)) for (node, _), vs, ds
                            in zip(frontier, top.values, top.indices) for v, d in zip(vs, ds)), reverse=True)
            grown = []
            for path_logp, parent, d in found[: min(WIDTH, k - len(tokens))]:
                tokens.append(int(head.draft_ids[d]))
                parents.append(parent)
                node = len(tokens)
                score[node], depth[node] = path_logp, depth[parent] + 1
                grown.append(node)
            expand = [node for node in grown if tokens[node - 1] not in stops]
            if not expand or len(tokens) >= k:
                break
            h_of = dict(frontier)
            start = self.cache.length
            visible = torch.zeros(len(expand), start + len(expand), dtype=torch.bool)
            visible[:, :base] = True
            for row, node in enumerate(expand):  # its ancestors' pairs and its own
                slot[node] = start + row
                up = node
                while up:
                    if up in slot:
                        visible[row, slot[up]] = True
                    up = parents[up - 1]
            frontier = list(zip(expand, head.step_tree(
                torch.tensor([tokens[node - 1] for node in expand]), torch.stack([h_of[parents[node - 1]] for node in expand]),
                torch.tensor([base + depth[node] - 1 for node in expand]), self.cache, visible)))
        return DraftProposal(tokens, None, 0, parents)

    def _catch_up(self, context: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Drop the drafted pairs; the unseen pairs (tokens [n], fused g [n, H]) to take in next, or
        None: none is new (the same context again), or the features do not cover the context (the
        drafter joined a sequence late: it drafts nothing for this request)."""
        self.cache.truncate(self._seen)
        n = sum(len(rows) for rows in self._unseen)
        if n == 0:
            return None
        if self._seen + n != len(context) - 1:
            self._unseen, self._last = [], None
            return None
        with torch.inference_mode():
            g = self.head.fuse(torch.cat(self._unseen))
        tokens = torch.tensor(list(context[self._seen + 1:]))
        self._unseen, self._seen = [], self._seen + n
        return tokens, g
