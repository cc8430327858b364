"""Replay greedy speculation on a known output, priced by the cost model instead of timed.

Greedy speculation commits the target's own tokens whatever τ is, so once the target's output for a
prompt is known, the cycles any τ policy would run follow without the target: the drafter proposes
after the committed tokens, the accepted drafts are the longest prefix (a tree's path) that matches
the output, and the cycle costs drafted·d + fed·g + T(drafted + 1) + o (o: the engine's own time per
cycle; plain decoding pays T(1) + o a token). Priced by one verify curve, a fixed τ and the
controller are compared without the machine's timing noise, which on a shared CPU is larger than
the 5 % the controller is judged by. `noise` perturbs the timings the controller sees (not the price) to show
how it copes with a real clock. With `curves` (T(k) at two context lengths), every cycle, and plain
decoding's every token, is priced at its own context: attention makes long prompts' verifies dearer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from verispec import tree
from verispec.drafters.base import Drafter, DraftProposal
from verispec.engine.controller import Controller
from verispec.engine.cost import ContextCurve, CostModel
from verispec.sampling import Sampler, verify_tree_greedy


@dataclass(frozen=True)
class Replayed:
    tokens: int
    ms: float  # priced by the cost model
    plain_ms: float  # plain decoding of the same tokens, priced alike
    taus: tuple[int, ...]  # τ of every cycle
    cycles: tuple[tuple[int, int], ...]  # (draft positions, a tree's depth; accepted) of every cycle
    nodes: int  # draft tokens verified (a chain's equal its positions)

    @property
    def drafted(self) -> int:
        """Draft positions, summed over the cycles."""
        return sum(d for d, _ in self.cycles)

    @property
    def accepted(self) -> int:
        return sum(a for _, a in self.cycles)

    @property
    def speedup(self) -> float:
        """Against plain decoding: one token per T(1)."""
        return self.plain_ms / self.ms


def replay(drafter: Drafter, sampler: Sampler, prompt_ids: Sequence[int], output_ids: Sequence[int],
           policy: int | Controller, model: CostModel, noise: float = 0.0, seed: int = 0,
           curves: ContextCurve | None = None, features: torch.Tensor | None = None) -> Replayed:
    """The cycles of `policy` (a fixed τ, or a controller that keeps learning) over output_ids.
    features: the target's hidden states of prompt + output [n, layers, H], for a drafter that reads
    them (EAGLE), handed to it as the engine would: the prompt's, then each cycle's kept rows."""
    rng = random.Random(seed)
    drafter.reset(sampler)
    if isinstance(policy, Controller):
        policy.new_request()
    if features is not None:
        drafter.features(features[: len(prompt_ids) - 1])  # type: ignore[attr-defined]
    done, ms, plain_ms, taus, cycles, verified = 0, 0.0, 0.0, [], [], 0
    context = list(prompt_ids)
    while done < len(output_ids):
        curve = model.curve if curves is None else curves.at(len(context))
        # as the engine asks: with the drafter's backlog and the tokens the request may still generate
        tau = (policy.choose(drafter.backlog(context), len(output_ids) - done) if isinstance(policy, Controller)
               else policy)
        k = min(tau, len(output_ids) - done - 1)  # as the engine: never draft past max_tokens
        proposal = (drafter.propose(context, k) if k > 0 else DraftProposal([])).head(k)
        drafts, parents = proposal.token_ids, proposal.parents or tree.chain(len(proposal.token_ids))
        # the greedy target chooses output_ids: after a node of depth d, output_ids[done + d]
        path, _ = verify_tree_greedy(drafts, parents, [output_ids[done + d] for d in tree.depths(parents)])
        accepted, positions = len(path), max(tree.depths(parents))  # positions: the engine's `drafted`
        if drafts:
            drafter.observe(accepted)
        if features is not None:  # the rows the verify forward kept: pending + the accepted drafts
            drafter.features(features[len(context) - 1: len(context) + accepted])  # type: ignore[attr-defined]
        draft_ms = len(drafts) * model.draft_ms + proposal.fed * model.feed_ms
        verify_ms = curve(len(drafts) + 1)  # what the controller times; the cycle also pays the engine's overhead
        if isinstance(policy, Controller):
            policy.observe(tau, positions, accepted, draft_ms, verify_ms * max(0.1, 1 + rng.gauss(0, noise)),
                           proposal.fed, len(drafts), path)
        ms += draft_ms + verify_ms + model.overhead_ms
        plain_ms += (accepted + 1) * (curve(1) + model.overhead_ms)
        context += output_ids[done: done + accepted + 1]
        done += accepted + 1
        taus.append(tau)
        cycles.append((positions, accepted))
        verified += len(drafts)
    return Replayed(len(output_ids), ms, plain_ms, tuple(taus), tuple(cycles), verified)
