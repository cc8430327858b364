"""The generation loop. Every step is a speculative cycle; plain decoding is the cycle with τ = 0.

A sequence's cache holds every committed token but the last one (`pending`). A step, for all the
sequences of a batch at once:
1. prompts not yet in their cache take a chunk of it (prefill joins the batch, within a budget);
2. each decoding sequence's drafter proposes up to τ tokens after its committed sequence, a chain or
   a tree (τ nodes; verispec/tree.py);
3. the target runs each sequence's [pending] + drafts in ONE forward (`forward_many`): row i is the
   sequence's distribution after draft i (in a tree, after the path to node i);
4. per sequence, the verifier keeps the longest accepted prefix (in a tree, path) and adds the
   recovered or bonus token; the request commits them (stop rules apply inside the chunk); the cache
   rolls back to pending + accepted drafts (a tree's path first moves into place); the emitted token
   becomes the new pending.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field

import torch

from verispec import tree
from verispec.drafters.base import DraftProposal, Drafter, feature_layers, finish, propose_all
from verispec.engine.controller import Controller
from verispec.engine.load import BatchPlanner
from verispec.engine.monitor import Monitor
from verispec.engine.request import Request
from verispec.engine.trace import TraceWriter
from verispec.model.cache import KVCache
from verispec.model.transformer import Segment, Transformer
from verispec.sampling.rejection import uniforms_for, verify, verify_greedy, verify_tree, verify_tree_greedy
from verispec.sampling.sampler import Sampler
from verispec.types import Stats, TokenLogprob


@dataclass
class Sequence:
    """A request being generated, with its own cache, drafter and τ (fixed, or a controller's)."""

    request: Request
    cache: KVCache
    drafter: Drafter | None = None
    num_draft_tokens: int = 0
    controller: Controller | None = None
    trace: TraceWriter | None = None
    monitor: Monitor | None = None
    prefix_from: Sequence | None = None  # a sequence with the same prompt whose prefill this one copies
    _decode_start: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.drafter is None:
            self.num_draft_tokens, self.controller = 0, None
        else:
            self.drafter.reset(self.request.sampler)
        if self.controller is not None:
            self.controller.new_request()
        self.cache.truncate(0)

    @property
    def to_prefill(self) -> int:
        """Prompt tokens still to enter the cache (all but the last, which is the first pending)."""
        return len(self.request.prompt_ids) - 1 - self.cache.length if self._decode_start is None else 0

    @property
    def drafter_name(self) -> str:
        """What the monitor files this sequence's tokens under."""
        return "none" if self.drafter is None else type(self.drafter).__name__

    def choose_tau(self, context: list[int]) -> int:
        """τ for the next cycle; context is the request's prompt + committed output."""
        if self.controller is None:
            return self.num_draft_tokens
        request = self.request
        return self.controller.choose(self.drafter.backlog(context),
                                      request.params.max_tokens - len(request.output_ids))


@dataclass
class Cycle:
    """What one step did for one decoding sequence; `tokens` are those the request kept. drafted: draft
    positions (a tree's depth); nodes: draft tokens the forward verified (a chain's drafted)."""

    sequence: Sequence
    tau: int
    drafted: int
    accepted: int
    tokens: list[int]
    nodes: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the kept tokens', when the request asked


def step(target: Transformer, sequences: Seq[Sequence], prefill_budget: int | None = None,
         planner: BatchPlanner | None = None) -> list[Cycle]:
    """One target forward for every unfinished sequence; prefill chunks share at most
    `prefill_budget` rows (None: whole prompts at once); a planner caps the batch's τ by the
    step's goodput (engine/load.py). Returns the decoding sequences' cycles."""
    device = target.device
    t0 = time.perf_counter()
    # 1. prefill chunks; a prompt that another sequence is prefilling is copied from its cache instead
    waiting = _share_prefill(sequences)
    prefill: list[Segment] = []
    filling: list[Sequence] = []
    budget = prefill_budget
    for seq in sequences:
        if id(seq) in waiting:
            continue
        n = seq.to_prefill if budget is None else min(seq.to_prefill, budget)
        if n > 0:
            start = seq.cache.length
            prefill.append(Segment(torch.tensor(seq.request.prompt_ids[start: start + n], device=device),
                                   seq.cache, "none", capture=feature_layers(seq.drafter)))
            filling.append(seq)
            budget = None if budget is None else budget - n
    decoding = [s for s in sequences if not s.request.finished and s.to_prefill == 0 and s not in filling
                and id(s) not in waiting]
    # 2. drafts
    contexts = [seq.request.all_ids for seq in decoding]  # built once: the controller and drafter both read it
    taus = [seq.choose_tau(context) for seq, context in zip(decoding, contexts)]
    prefill_rows = sum(len(segment.token_ids) for segment in prefill)
    if planner is not None:
        taus = planner.plan([seq.controller for seq in decoding], taus, prefill_rows)
    proposals = _draft(decoding, taus, contexts)
    t1 = time.perf_counter()
    # 3. one forward: prefill chunks and [pending] + drafts of every decoding sequence
    verifying = [Segment(torch.tensor([seq.request.last_id] + p.token_ids, device=device), seq.cache, "all", p.parents,
                         feature_layers(seq.drafter)) for seq, p in zip(decoding, proposals)]
    bases = [seq.cache.length for seq in decoding]
    forward_start = time.perf_counter()
    logits = target.forward_many(prefill + verifying)[len(prefill):]
    forward_s = time.perf_counter() - forward_start
    verify_rows = sum(len(segment.token_ids) for segment in verifying)
    for seq, segment in zip(filling, prefill):
        if segment.capture:
            seq.drafter.features(segment.features)  # type: ignore[union-attr]
    # 4. accept, roll back, commit (a drafter that reads features hears the kept rows')
    results = []
    for seq, proposal, rows, base, segment in zip(decoding, proposals, logits, bases, verifying):
        if proposal.parents is None:
            accepted, tokens, u, logprobs = _verify_chain(seq, proposal, rows)
            seq.cache.truncate(base + 1 + accepted)
            path = None
            kept = slice(0, accepted + 1)
        else:
            path, tokens, u, logprobs = _verify_tree(seq, proposal, rows)
            seq.cache.keep(base, [0] + path)
            accepted = len(path)
            kept = [0] + path
        if segment.capture:
            seq.drafter.features(segment.features[kept])  # type: ignore[union-attr]
        results.append((accepted, tokens, path, u, logprobs))
    t2 = time.perf_counter()
    if planner is not None:
        planner.observe(verify_rows, (t2 - t1) * 1e3, prefill_rows)
    for seq in filling:
        seq.request.stats.prefill_s += t2 - t0
        seq.request.stats.target_forwards += 1
    # each sequence's drafting time: its share (by tokens drafted and taken in) of the step's
    work = [len(p.token_ids) + p.fed for p in proposals]
    shares = [(t1 - t0) * (w / sum(work) if sum(work) else 1 / len(work)) for w in work]
    return [_commit(seq, tau, proposal, accepted, tokens, path, u, logprobs, t0, share, t2 - t1, forward_s)
            for seq, tau, proposal, (accepted, tokens, path, u, logprobs), share
            in zip(decoding, taus, proposals, results, shares)]


def _share_prefill(sequences: Seq[Sequence]) -> set[int]:
    """Sequences that copy another's prompt (Sequence.prefix_from; n choices of one prompt): those
    whose source has its prompt in cache take it now, a copy instead of a forward; those whose
    source still prefills wait (their ids are returned); a source that left the step leaves them
    to prefill on their own."""
    running = {id(seq) for seq in sequences}
    waiting = set()
    for seq in sequences:
        source = seq.prefix_from
        if source is None:
            continue
        if feature_layers(seq.drafter) or id(source) not in running or source.request.prompt_ids != seq.request.prompt_ids:
            seq.prefix_from = None
        elif source.to_prefill > 0:
            waiting.add(id(seq))
        else:
            seq.cache.copy_prefix(source.cache, len(seq.request.prompt_ids) - 1)
            seq.prefix_from = None
    return waiting


def _verify_chain(seq: Sequence, proposal: DraftProposal, rows: torch.Tensor
                  ) -> tuple[int, list[int], list[float] | None, list[TokenLogprob] | None]:
    """rows [k + 1, V] -> (drafts accepted, the tokens to commit, their u-values for the monitor or
    None, their log-probabilities or None); token j was emitted at row j."""
    d, sampler, history = proposal.token_ids, seq.request.sampler, seq.request.output_ids
    if sampler.params.greedy:  # point masses: no [k + 1, V] rows to build (a tenth of a plain step)
        x = sampler.processed(rows, history, d)
        accepted, tokens = verify_greedy(d, sampler.argmax(x))
        return accepted, tokens, None, _logprobs(sampler, rows, history, d, None, range(len(tokens)), tokens,
                                                 processed=x)
    target_probs = sampler.probs(rows, history, d)  # [k + 1, V]
    accepted, tokens = verify(torch.tensor(d, dtype=torch.long), proposal.probs, target_probs, sampler.generator)
    u = seq.monitor.observe(seq.drafter_name, target_probs[: accepted + 1], tokens) if seq.monitor is not None else None
    return accepted, tokens, u, _logprobs(sampler, rows, history, d, None, range(len(tokens)), tokens, target_probs)


def _verify_tree(seq: Sequence, proposal: DraftProposal, rows: torch.Tensor
                 ) -> tuple[list[int], list[int], list[float] | None, list[TokenLogprob] | None]:
    """rows [n + 1, V], the root's first -> (the accepted path's nodes, the tokens to commit, their
    u-values for the monitor or None, their log-probabilities or None); token j was emitted at the
    row of the path's node j - 1 (the root's first)."""
    d, parents = proposal.token_ids, proposal.parents
    sampler, history = seq.request.sampler, seq.request.output_ids
    if sampler.params.greedy:
        x = sampler.processed(rows, history, d, parents)
        path, tokens = verify_tree_greedy(d, parents, sampler.argmax(x))
        return path, tokens, None, _logprobs(sampler, rows, history, d, parents, [0] + path, tokens, processed=x)
    target_probs = sampler.probs(rows, history, d, parents)  # [n + 1, V]
    uniforms = uniforms_for(1, len(d), sampler.generator, target_probs.device)[0].tolist()
    path, tokens = verify_tree(d, parents, proposal.probs, target_probs, uniforms)
    u = seq.monitor.observe(seq.drafter_name, target_probs[[0] + path], tokens) if seq.monitor is not None else None
    return path, tokens, u, _logprobs(sampler, rows, history, d, parents, [0] + path, tokens, target_probs)


def _logprobs(sampler: Sampler, rows: torch.Tensor, history: list[int], drafts: list[int], parents: list[int] | None,
              at: Seq[int], tokens: list[int], probs: torch.Tensor | None = None,
              processed: torch.Tensor | None = None) -> list[TokenLogprob] | None:
    """The tokens' log-probabilities (emitted at rows `at`) when the request asked for them."""
    if sampler.params.logprobs is None:
        return None
    return sampler.logprobs(rows, history, drafts, parents, at, tokens, probs, processed)


def _draft(sequences: list[Sequence], taus: list[int], contexts: list[list[int]]) -> list[DraftProposal]:
    """Each sequence's proposal, cut to its k (a tree to its first k nodes; one whose parents form a
    chain is read as the chain). Never draft past max_tokens or the context: a cycle commits at most
    k + 1 tokens and the forward writes k + 1 cache positions."""
    jobs, owners = [], []
    for idx, (seq, tau, context) in enumerate(zip(sequences, taus, contexts)):
        request = seq.request
        room = min(request.params.max_tokens - len(request.output_ids), seq.cache.capacity - request.length) - 1
        k = min(tau, room)
        if k > 0 and seq.drafter is not None:
            jobs.append((seq.drafter, context, k))
            owners.append(idx)
    proposals = [DraftProposal([]) for _ in sequences]
    for idx, (_, _, k), proposal in zip(owners, jobs, propose_all(jobs)):
        proposal = proposal.head(k)
        grammar = sequences[idx].request.grammar
        if grammar is not None:  # drafts the format refuses have p = 0: never spend rows on them
            proposal = proposal.subset(grammar.fit(sequences[idx].request.output_ids, proposal.token_ids,
                                                   proposal.parents))
        proposals[idx] = proposal if not tree.is_chain(proposal.parents) else DraftProposal(
            proposal.token_ids, proposal.probs, proposal.fed)
    return proposals


def _commit(seq: Sequence, tau: int, proposal: DraftProposal, accepted: int, tokens: list[int],
            path: list[int] | None, u: list[float] | None, logprobs: list[TokenLogprob] | None,
            t0: float, draft_s: float, verify_s: float, forward_s: float) -> Cycle:
    """drafted: the draft positions (a tree's depth), so that per-position acceptance reads a tree as
    the chain of its accepted path; nodes, what the forward verified, prices the cycle (stats, the
    controller; the trace also carries a tree's parents); path, a tree's kept nodes (None for a chain).
    t0: when the step began; draft_s: this sequence's share of the step's drafting; verify_s: the
    step's forward and verification (every sequence of a batch waits for all of it); forward_s: the
    forward alone."""
    request, stats = seq.request, seq.request.stats
    nodes, fed = len(proposal.token_ids), proposal.fed
    drafted = nodes if proposal.parents is None else max(tree.depths(proposal.parents))
    if seq._decode_start is None:
        seq._decode_start = t0
    if nodes:
        seq.drafter.observe(accepted)
    kept = tokens[: request.commit(tokens)]
    kept_logprobs = [] if logprobs is None else logprobs[: len(kept)]
    request.logprobs += kept_logprobs
    if request.finished and seq.drafter is not None:
        finish(seq.drafter, request.output_ids)
    if request.finished and seq.monitor is not None and not request.sampler.params.greedy:
        report = seq.monitor.report(seq.drafter_name)
        stats.monitor_tokens, stats.monitor_p_value = report["tokens"], report["p_value"]
    stats.draft_s += draft_s
    stats.verify_s += verify_s
    stats.forward_s += forward_s
    stats.target_forwards += 1
    stats.record_cycle(drafted, accepted, nodes)
    if seq.controller is not None:
        # the forward alone, as calibrate times T(k): the rest of a cycle is the overhead the cost model adds
        seq.controller.observe(tau, drafted, accepted, draft_s * 1e3, forward_s * 1e3, fed, nodes, path)
    if seq.trace is not None:
        extra = {"controller": seq.controller.last} if seq.controller is not None else {}
        if proposal.parents is not None:
            extra.update(nodes=nodes, parents=proposal.parents, path=path)
        if u is not None:
            extra.update(u=[round(x, 6) for x in u[: len(kept)]])
        seq.trace.cycle(tau=tau, drafted=drafted, accepted=accepted, fed=fed, draft_ms_per_cycle=draft_s * 1e3,
                        verify_ms_per_cycle=verify_s * 1e3, tokens=kept, **extra)
    stats.decode_s = time.perf_counter() - seq._decode_start
    stats.completion_tokens = len(request.output_ids)
    return Cycle(seq, tau, drafted, accepted, kept, nodes, kept_logprobs)


class Engine:
    """Owns a target model, its KV cache and an optional drafter; runs one request at a time."""

    def __init__(self, target: Transformer, drafter: Drafter | None = None, num_draft_tokens: int = 0,
                 controller: Controller | None = None) -> None:
        self.target = target
        self.cache = target.new_cache()
        self.monitor = Monitor()
        self.use(drafter, num_draft_tokens, controller)

    def use(self, drafter: Drafter | None, num_draft_tokens: int, controller: Controller | None = None) -> None:
        """Switch the drafter and τ between requests (bench compares several on one cache). With a
        controller, it chooses τ before every cycle and num_draft_tokens is ignored."""
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens if drafter is not None else 0
        self.controller = controller if drafter is not None else None

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def run(self, request: Request, speculative: bool = True, trace: TraceWriter | None = None) -> Stats:
        """speculative=False decodes plainly (τ = 0) with the same target and cache, for comparisons."""
        for _ in self.steps(request, speculative, trace):
            pass
        return request.stats

    def steps(self, request: Request, speculative: bool = True, trace: TraceWriter | None = None
              ) -> Iterator[list[int]]:
        """Run the request, yielding the tokens each cycle commits (for streaming)."""
        seq = Sequence(request, self.cache, self.drafter if speculative else None, self.num_draft_tokens,
                       self.controller, trace, self.monitor)
        while not request.finished:
            for cycle in step(self.target, [seq]):
                yield cycle.tokens
