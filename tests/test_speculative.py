"""Speculative decoding end to end: greedy output equals plain output token for token (RELIABILITY.md
C1), stops inside accepted chunks, statistics invariants (G), drafter = target-like copying."""

from __future__ import annotations

import io

import pytest

from verispec import hub
from verispec.benchmark.replay import replay
from verispec.config import SamplingParams
from verispec.drafters import NgramDrafter
from verispec.drafters.base import DraftProposal
from verispec.engine.controller import Controller
from verispec.engine.cost import CostModel, VerifyCurve
from verispec.engine.diagnose import diagnose
from verispec.engine.generate import Engine
from verispec.engine.monitor import Monitor
from verispec.engine.request import Request
from verispec.engine.trace import Trace, TraceWriter, parse_trace


@pytest.fixture(scope="module")
def long_llm(tmp_path_factory):
    from conftest import save_tiny_tokenizer, tiny_hf_model
    from verispec.llm import LLM

    folder = tmp_path_factory.mktemp("tiny-long")
    tiny_hf_model("llama", max_position_embeddings=2048, seed=3).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return LLM(str(folder))


def run(llm, prompt, params, k):
    engine = Engine(llm.target, NgramDrafter() if k else None, k)
    request = Request(prompt, params, llm.eos_ids, engine.capacity)
    stats = engine.run(request)
    return request, stats


def test_greedy_speculative_equals_plain_for_every_tau_on_long_outputs(long_llm):
    prompt = long_llm.encode("the stop the end the stop")
    params = SamplingParams(max_tokens=1024, ignore_eos=True)
    plain, _ = run(long_llm, prompt, params, 0)
    assert len(plain.output_ids) == 1024
    for k in range(1, 9):
        spec, stats = run(long_llm, prompt, params, k)
        assert spec.output_ids == plain.output_ids, f"tau={k} diverged"
        assert 0 < stats.accepted < stats.drafted, "the test must see both accepted and rejected drafts"
        # G: metrics invariants
        assert stats.drafted == sum(stats.drafted_per_position)
        assert stats.accepted == sum(stats.accepted_per_position)
        assert all(a >= b for a, b in zip(stats.accepted_per_position, stats.accepted_per_position[1:]))
        assert stats.completion_tokens == len(spec.output_ids)
        assert stats.cycles <= stats.completion_tokens <= stats.cycles + stats.accepted


def test_max_tokens_and_stop_inside_an_accepted_chunk(long_llm):
    prompt = long_llm.encode("the end the end the end")
    full, _ = run(long_llm, prompt, SamplingParams(max_tokens=200, ignore_eos=True), 0)
    for max_tokens in (1, 7, 33, 101):
        spec, stats = run(long_llm, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), 8)
        assert spec.output_ids == full.output_ids[:max_tokens] and spec.finish_reason == "length"
        assert stats.completion_tokens == max_tokens
    # a stop id in the middle of the output stops there, with nothing after it
    stop = full.output_ids[150]
    first = full.output_ids.index(stop)
    spec, _ = run(long_llm, prompt, SamplingParams(max_tokens=200, ignore_eos=True, stop_token_ids=(stop,)), 8)
    assert spec.output_ids == full.output_ids[:first] and spec.finish_reason == "stop"


def test_context_limit_inside_a_draft_finishes_with_length(long_llm):
    prompt = long_llm.encode("the end the end")
    capacity = long_llm.engine.capacity
    spec, _ = run(long_llm, prompt, SamplingParams(max_tokens=capacity, ignore_eos=True), 8)
    assert spec.finish_reason == "length" and spec.length == capacity


def test_seeded_sampling_is_reproducible_under_speculation(long_llm):
    prompt = long_llm.encode("the end")
    params = SamplingParams(max_tokens=100, temperature=0.8, seed=9, ignore_eos=True)
    a, _ = run(long_llm, prompt, params, 4)
    b, _ = run(long_llm, prompt, params, 4)
    assert a.output_ids == b.output_ids


REAL = pytest.mark.skipif(not hub.is_fetched("smollm2-135m-instruct"), reason="SmolLM2 not fetched")


@pytest.fixture(scope="module")
def smollm2_plain():
    """SmolLM2 as its own draft model, a copying prompt and its plain greedy output (computed once)."""
    from verispec.llm import LLM

    llm = LLM("smollm2-135m-instruct", drafter="draft:smollm2-135m-instruct", num_draft_tokens=4)
    text = ("Repeat this list exactly, then continue it with five more items: apples, pears, plums, "
            "cherries, peaches, apricots, grapes, melons.")
    prompt = llm.encode(text, chat=True)
    params = SamplingParams(max_tokens=160, min_tokens=160)
    return llm, prompt, params, run(llm, prompt, params, 0)[0]


@pytest.mark.real
@REAL
@pytest.mark.parametrize("k", [2, 5])
def test_real_smollm2_greedy_speculative_equals_plain(smollm2_plain, k):
    llm, prompt, params, plain = smollm2_plain
    spec, stats = run(llm, prompt, params, k)
    assert spec.output_ids == plain.output_ids
    assert stats.accepted > 0


@pytest.mark.real
@REAL
def test_real_smollm2_as_its_own_draft_model_is_accepted_everywhere_and_exact(smollm2_plain):
    """C2 on the real model: drafter = target -> acceptance >= 0.98 and the plain greedy output."""
    llm, prompt, params, plain = smollm2_plain
    request = Request(prompt, params, llm.eos_ids, llm.engine.capacity)
    stats = llm.engine.run(request)
    assert request.output_ids == plain.output_ids
    assert stats.acceptance_rate >= 0.98


def test_greedy_with_the_adaptive_controller_equals_plain(long_llm):
    """Lossless whatever τ the controller picks, τ = 0 steps and probes included."""
    from verispec.engine.controller import Controller

    prompt = long_llm.encode("the stop the end the stop")
    params = SamplingParams(max_tokens=600, ignore_eos=True)
    plain, _ = run(long_llm, prompt, params, 0)
    engine = Engine(long_llm.target, NgramDrafter(), 0, Controller())
    request = Request(prompt, params, long_llm.eos_ids, engine.capacity)
    stats = engine.run(request)
    assert request.output_ids == plain.output_ids
    assert len(set(stats.drafted_per_position)) > 1 and stats.cycles > 0


def test_replay_runs_the_cycles_the_engine_runs(long_llm):
    """benchmark.replay prices the cycles a policy would run on a known greedy output; they must be
    the engine's own cycles, or its comparison of fixed τ and the controller means nothing."""
    prompt = long_llm.encode("the stop the end the stop")
    params = SamplingParams(max_tokens=300, ignore_eos=True)
    model = CostModel(VerifyCurve((10.0, 11.0, 12.0, 20.0, 21.0, 22.0, 23.0)), draft_ms=0.5)
    for tau in (2, 5):
        spec, stats = run(long_llm, prompt, params, tau)
        replayed = replay(NgramDrafter(), spec.sampler, prompt, spec.output_ids, tau, model)
        assert (len(replayed.taus), replayed.drafted, replayed.accepted) == (stats.cycles, stats.drafted, stats.accepted)
        assert 0 < stats.accepted < stats.drafted
        assert replayed.ms > stats.cycles * model.t1  # drafts were verified and drafting costs
    silent = replay(NoDrafts(), spec.sampler, prompt, spec.output_ids, 4, model)
    assert silent.speedup == 1.0 and len(silent.taus) == 300  # plain steps, priced T(1) each
    runs = [replay(NgramDrafter(), spec.sampler, prompt, spec.output_ids, Controller(model), model, noise=0.1, seed=3)
            for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0].taus)) > 1


class NoDrafts(NgramDrafter):
    def propose(self, context, k):
        return DraftProposal([])


def test_the_monitor_sees_every_sampled_token_and_changes_no_output(long_llm):
    """(A tree's tokens: test_tree_engine.py.)"""
    prompt = long_llm.encode("the end the end the end the end")
    params = SamplingParams(max_tokens=120, temperature=0.8, seed=11, ignore_eos=True)
    engine = Engine(long_llm.target, NgramDrafter(), 4)
    watched = Request(prompt, params, long_llm.eos_ids, engine.capacity)
    lines = io.StringIO()
    stats = engine.run(watched, trace=TraceWriter(lines))
    assert stats.drafted > 0
    cycles = parse_trace(lines.getvalue().splitlines()).cycles
    assert all(len(c["u"]) == len(c["tokens"]) for c in cycles), "the trace carries each kept token's u"
    assert diagnose(Trace({}, cycles)).sampled_tokens == 120
    report = engine.monitor.report("NgramDrafter")
    assert report["tokens"] >= len(watched.output_ids) == 120  # verified past max_tokens: the cut ones too
    assert stats.monitor_tokens == report["tokens"] and stats.monitor_p_value == report["p_value"]
    engine.monitor = None
    unwatched = Request(prompt, params, long_llm.eos_ids, engine.capacity)
    engine.run(unwatched)
    assert unwatched.output_ids == watched.output_ids
    greedy = Request(prompt, SamplingParams(max_tokens=20, ignore_eos=True), long_llm.eos_ids, engine.capacity)
    engine.monitor = Monitor()
    engine.run(greedy)
    assert engine.monitor.report() == {}  # point-mass rows say nothing
