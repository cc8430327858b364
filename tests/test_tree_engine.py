"""Draft trees through the engine: greedy output equals plain output token for token with trees of
depth 3 and width 3 on every backend, alone and batched beside chains and prefill chunks; a tree
cycle's trace line carries its node count, parents and kept path, and stats, the controller, diagnose and
replay count its nodes; malformed proposals are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from verispec.config import RuntimeConfig, SamplingParams
from verispec.drafters import NgramDrafter
from verispec.drafters.base import DraftProposal
from verispec.engine.generate import Engine, Sequence, step
from verispec.engine.monitor import Monitor
from verispec.engine.request import Request
from verispec.engine.trace import TraceWriter
from verispec.errors import DraftProposalError

from conftest import BACKENDS

TREE = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]  # width 3 at depths 1-2, depth 3 under nodes 4, 5


class OracleTree:
    """Knows the target's own greedy continuation (`truth`, prompt included) and proposes TREE: along one
    path the true tokens, which sibling holds them turning with each cycle, and wrong tokens elsewhere;
    every third cycle the true path breaks off at a depth, so acceptances of every depth occur."""

    def __init__(self, truth: list[int], vocab: int, sampled: bool = False) -> None:
        self.truth, self.vocab, self.sampled, self.cycle = truth, vocab, sampled, 0

    def propose(self, context, k: int) -> DraftProposal:
        g = torch.Generator().manual_seed(self.cycle)
        true_node, depth_of = 0, {0: 0}
        tokens = []
        breaks = self.cycle % 3 + 1 if self.cycle % 2 else 99
        for j, parent in enumerate(TREE, start=1):
            depth_of[j] = depth_of[parent] + 1
            slot = (j - 1) % 3
            pos = len(context) + depth_of[j] - 1
            if parent == true_node and slot == self.cycle % 3 and pos < len(self.truth) and depth_of[j] < breaks:
                tokens.append(self.truth[pos])
                true_node = j
            else:
                tokens.append(int(torch.randint(0, self.vocab, (1,), generator=g)))
        self.cycle += 1
        probs = torch.full((len(TREE), self.vocab), 1 / self.vocab) if self.sampled else None
        return DraftProposal(tokens, probs, parents=TREE).head(k)

    def backlog(self, context) -> int:
        return 0

    def observe(self, num_accepted: int) -> None:
        pass

    def fork(self):
        return OracleTree(self.truth, self.vocab, self.sampled)

    def reset(self, sampler) -> None:
        self.cycle = 0


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request, tmp_path_factory):
    from conftest import backend_args, save_tiny_llm
    from verispec.llm import LLM

    backend, activations = backend_args(request.param)
    folder = save_tiny_llm(tmp_path_factory.mktemp("tree-llm"), max_position_embeddings=1024, seed=3)
    return LLM(str(folder), RuntimeConfig(backend=backend, activations=activations))


GREEDY = SamplingParams(max_tokens=120, ignore_eos=True)


def plain(llm, prompt, params=GREEDY) -> list[int]:
    request = Request(prompt, params, llm.eos_ids, llm.engine.capacity)
    Engine(llm.target).run(request, speculative=False)
    return request.output_ids


@pytest.mark.parametrize("tau", [1, 5, 18])
def test_greedy_with_trees_equals_plain_decoding(llm, tau, tmp_path):
    prompt = llm.encode("the quick brown fox jumps over")
    want = plain(llm, prompt)
    engine = Engine(llm.target, OracleTree(prompt + want, llm.target.config.vocab_size), tau)
    request = Request(prompt, GREEDY, llm.eos_ids, engine.capacity)
    with open(tmp_path / "trace.jsonl", "w") as f:
        stats = engine.run(request, trace=TraceWriter(f))
    assert request.output_ids == want
    cycles = [json.loads(line) for line in open(tmp_path / "trace.jsonl") if '"cycle"' in line]
    trees = [c for c in cycles if "nodes" in c]  # near max_tokens a tree cut to one node is a chain
    if tau > 1:
        assert {c["accepted"] for c in trees} >= {0, 1, 2} and stats.accepted > 0
        assert all(c["nodes"] <= tau and c["accepted"] <= c["drafted"] <= 3 for c in trees)
        assert trees[0]["nodes"] == min(tau, len(TREE))
    else:  # one node is a chain: traced as before, without a node count
        assert all("nodes" not in c for c in cycles)


def test_a_batch_of_trees_chains_and_prefill_gives_each_what_it_gets_alone(llm):
    sampled = SamplingParams(max_tokens=50, temperature=0.9, seed=3, ignore_eos=True)
    penalized = SamplingParams(max_tokens=50, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    vocab = llm.target.config.vocab_size
    prompts = [llm.encode(t) for t in ("a b c a b c", "the stop the end", "x y z " * 6, "hello there")]
    truths = [p + plain(llm, p) for p in prompts]
    cases = [(prompts[0], GREEDY, lambda: OracleTree(truths[0], vocab), 18),
             (prompts[1], GREEDY, NgramDrafter, 3),
             (prompts[2], sampled, lambda: OracleTree(truths[2], vocab, sampled=True), 9),
             (prompts[3], penalized, lambda: OracleTree(truths[3], vocab), 12)]

    def sequence(prompt, params, new_drafter, tau):
        return Sequence(Request(prompt, params, llm.eos_ids, llm.engine.capacity), llm.target.new_cache(),
                        new_drafter(), tau)

    expected = []
    for case in cases:
        seq = sequence(*case)
        while not seq.request.finished:
            step(llm.target, [seq])
        expected.append(seq.request.output_ids)
    batch = [sequence(*case) for case in cases]
    while any(not s.request.finished for s in batch):
        step(llm.target, [s for s in batch if not s.request.finished], prefill_budget=5)
    for i, (seq, want) in enumerate(zip(batch, expected)):
        assert seq.request.output_ids == want, f"sequence {i} changed in a batch"
    assert expected[0] == plain(llm, prompts[0])


def test_replay_runs_the_tree_cycles_the_engine_runs(llm):
    from verispec.benchmark.replay import replay
    from verispec.engine.cost import CostModel, VerifyCurve

    prompt = llm.encode("the quick brown fox jumps over")
    want = plain(llm, prompt)
    engine = Engine(llm.target, OracleTree(prompt + want, llm.target.config.vocab_size), 18)
    request = Request(prompt, GREEDY, llm.eos_ids, engine.capacity)
    stats = engine.run(request)
    model = CostModel(VerifyCurve(tuple(10.0 + i for i in range(20))), draft_ms=0.5)
    replayed = replay(OracleTree(prompt + want, llm.target.config.vocab_size), request.sampler, prompt, want, 18,
                      model)
    assert (len(replayed.taus), replayed.drafted, replayed.accepted) == (stats.cycles, stats.drafted, stats.accepted)


def test_stats_trace_controller_diagnose_and_replay_count_a_trees_nodes(llm, tmp_path):
    """Every consumer reads the same tree cycles: the trace carries the shape (nodes, parents) and the
    kept path, Stats sum the nodes, the controller switches to node budgets, diagnose reports the mean
    node count and replay verifies as many nodes as the engine did."""
    from verispec.benchmark.replay import replay
    from verispec.engine.controller import Controller
    from verispec.engine.cost import CostModel, VerifyCurve
    from verispec.engine.diagnose import diagnose
    from verispec.engine.trace import read_trace
    from verispec.tree import depths

    prompt = llm.encode("the quick brown fox jumps over")
    want = plain(llm, prompt)
    controller = Controller()
    engine = Engine(llm.target, OracleTree(prompt + want, llm.target.config.vocab_size), 0, controller)
    request = Request(prompt, GREEDY, llm.eos_ids, engine.capacity)
    with open(tmp_path / "trace.jsonl", "w") as f:
        stats = engine.run(request, trace=TraceWriter(f, target_step_ms=10.0))
    assert request.output_ids == want and controller.tree
    trace = read_trace(tmp_path / "trace.jsonl")
    trees = [c for c in trace.cycles if "parents" in c]
    assert trees and all(c["nodes"] == len(c["parents"]) and c["drafted"] == max(depths(c["parents"]))
                         and len(c["path"]) == c["accepted"] for c in trees)
    assert stats.nodes == sum(c["nodes"] for c in trace.cycles) > stats.drafted
    report = diagnose(trace)
    assert report.tree and report.mean_nodes == pytest.approx(stats.mean_nodes, abs=1e-3)
    model = CostModel(VerifyCurve(tuple(10.0 + i for i in range(20))), draft_ms=0.5)
    replayed = replay(OracleTree(prompt + want, llm.target.config.vocab_size), request.sampler, prompt, want, 6,
                      model)
    fixed = Engine(llm.target, OracleTree(prompt + want, llm.target.config.vocab_size), 6)
    assert replayed.nodes == fixed.run(Request(prompt, GREEDY, llm.eos_ids, fixed.capacity)).nodes


def test_the_monitor_sees_every_token_of_sampled_trees_and_changes_no_output(llm):
    prompt = llm.encode("the end")
    params = SamplingParams(max_tokens=60, temperature=0.8, seed=5, ignore_eos=True)
    outputs = []
    for watch in (True, False):
        engine = Engine(llm.target, OracleTree(prompt + plain(llm, prompt), llm.target.config.vocab_size, sampled=True),
                        len(TREE))
        engine.monitor = Monitor() if watch else None
        request = Request(prompt, params, llm.eos_ids, engine.capacity)
        stats = engine.run(request)
        outputs.append(request.output_ids)
        if watch:
            assert stats.nodes > stats.drafted, "trees were verified"
            assert engine.monitor.report("OracleTree")["tokens"] >= len(request.output_ids) == 60
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("bad, match", [
    (dict(token_ids=[1, 2], parents=[0, 2]), r"parents\[1\] = 2"),
    (dict(token_ids=[1, 2], parents=[0]), "1 parents for 2 draft nodes"),
    (dict(token_ids=[1, 2], parents=[-1, 0]), r"parents\[0\] = -1"),
    (dict(token_ids=[1, 2], probs=torch.ones(3, 5)), r"probs of shape \(3, 5\) for 2 drafts"),
])
def test_malformed_proposals_are_refused_by_name(bad, match):
    with pytest.raises(DraftProposalError, match=match):
        DraftProposal(**bad)
