"""One request's way from logits to tokens, shared by plain decoding, the target's verify rows and
a draft model's proposals, so that p and q are shaped alike (RELIABILITY.md E1-E3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verispec import tree
from verispec.config import SamplingParams
from verispec.sampling import reduce
from verispec.sampling.distribution import check_finite, new_generator, probabilities, sample
from verispec.sampling.grammar import Grammar
from verispec.types import TokenLogprob


class Sampler:
    """The request's params and private random stream, and what penalties and min_tokens depend on.

    A row's history is the output before it: the committed tokens, then the drafts that precede it
    in the same cycle. History is rebuilt from committed tokens every cycle, so a rejected draft
    leaves no count behind.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], stop_ids: Sequence[int],
                 grammar: Grammar | None = None) -> None:
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.stop_ids = sorted(stop_ids)
        self.generator = new_generator(params.seed)
        self.grammar = grammar  # params.response_format compiled (structured output), or None

    def probs(self, logits: torch.Tensor, history: Sequence[int], drafts: Sequence[int] = (),
              parents: Sequence[int] | None = None) -> torch.Tensor:
        """logits [rows, V] -> [rows, V]; row i follows output `history` + drafts[:i], or in a draft tree
        (parents, verispec/tree.py) `history` + the drafts on the path to node i."""
        return probabilities(self.processed(logits, history, drafts, parents), self.params)

    def greedy(self, logits: torch.Tensor, history: Sequence[int], drafts: Sequence[int] = (),
               parents: Sequence[int] | None = None) -> list[int]:
        """logits [rows, V] -> the id each row's greedy distribution (probs) puts all its mass on."""
        return self.argmax(self.processed(logits, history, drafts, parents))

    @staticmethod
    def argmax(x: torch.Tensor) -> list[int]:
        """processed logits [rows, V] -> each row's first maximal id, refusing NaN and infinite rows."""
        ids, finite = reduce.argmax(x)  # one pass where check_finite makes three
        if not finite:
            check_finite(x)
        return ids

    def logprobs(self, logits: torch.Tensor, history: Sequence[int], drafts: Sequence[int], parents: Sequence[int] | None,
                 at: Sequence[int], tokens: Sequence[int], probs: torch.Tensor | None = None,
                 processed: torch.Tensor | None = None) -> list[TokenLogprob]:
        """logits [R, V]; tokens[j] was emitted at row at[j] -> its log-probability and the
        params.logprobs likeliest at that row (SamplingParams: processed or raw). probs [R, V] and
        processed [R, V]: this cycle's processed distribution or logits when the verifier already
        made them. Alternatives that cannot be drawn (log-probability -inf) are left out."""
        p = self.params
        k = p.logprobs or 0
        if p.logprobs_mode == "processed" and not p.greedy:
            q = probs if probs is not None else self.probs(logits, history, drafts, parents)
            entries = reduce.log_entries(q, at, tokens, k)
        else:
            x = logits.float() if p.logprobs_mode == "raw" else (
                processed if processed is not None else self.processed(logits, history, drafts, parents))
            entries = reduce.log_softmax_entries(x, at, tokens, k)
        return [TokenLogprob(int(token), logprob, top) for token, (logprob, top) in zip(tokens, entries)]

    def processed(self, logits: torch.Tensor, history: Sequence[int], drafts: Sequence[int] = (),
                  parents: Sequence[int] | None = None) -> torch.Tensor:
        """The logits with logit_bias, min_tokens' masks, the penalties and the grammar's masks applied."""
        x = logits.float()
        rows, vocab = x.shape
        depths = range(rows) if parents is None else tree.depths(parents[: rows - 1])
        masked = [i for i in range(rows) if len(history) + depths[i] < self.params.min_tokens]
        if masked or self.params.penalized or self.params.logit_bias or self.grammar is not None:
            x = x.clone()
        if self.params.logit_bias:
            ids, biases = zip(*self.params.logit_bias)
            x[:, list(ids)] += torch.tensor(biases, dtype=x.dtype, device=x.device)
        if masked and self.stop_ids:
            x[torch.tensor(masked)[:, None], torch.tensor(self.stop_ids)[None, :]] = float("-inf")
        if self.params.penalized:
            x = self._penalize(x, history, drafts, tree.chain(rows - 1) if parents is None else parents)
        if self.grammar is not None:
            x.masked_fill_(self.grammar.masks(history, drafts, parents, rows).to(x.device), float("-inf"))
        return x

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [rows, V] -> ids [rows], from this request's stream."""
        return sample(probs, self.generator)

    def _penalize(self, x: torch.Tensor, history: Sequence[int], drafts: Sequence[int], parents: Sequence[int]
                  ) -> torch.Tensor:
        rows, vocab = x.shape
        p = self.params
        counts = _bincount(history, vocab, x.device).repeat(rows, 1)  # [rows, V]
        # row i sees the drafts on its path: ancestry [rows, rows - 1] @ the drafts' one-hots [rows - 1, V]
        ancestry = torch.zeros(rows, rows - 1, device=x.device)
        for i in range(1, rows):
            ancestry[i, [node - 1 for node in tree.path(parents, i)]] = 1.0
        drafted = torch.zeros(rows - 1, vocab, device=x.device)
        for j, token in enumerate(drafts[: rows - 1]):
            if 0 <= token < vocab:
                drafted[j, token] = 1.0
        counts = counts + ancestry @ drafted  # sums of 0/1: exact
        if p.repetition_penalty != 1:
            seen = (counts > 0) | (_bincount(self.prompt_ids, vocab, x.device) > 0)
            x = torch.where(seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
        return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def _bincount(ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """ids -> counts [V] (float32); ids outside [0, V) are not counted."""
    t = torch.tensor(list(ids), dtype=torch.long, device=device)
    return torch.bincount(t[(t >= 0) & (t < vocab)], minlength=vocab).float()[:vocab]
