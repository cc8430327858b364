"""The draft-model drafter: greedy equality (C1), drafter = target (C2), its cache in sync after every
cycle (F2), penalties under speculation (E2), the law of sampled outputs end to end (B3, B6), and a
tokenizer mismatch refused with the difference named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import save_tiny_tokenizer, tiny_hf_model
from markov import MarkovModel
from verispec.config import SamplingParams
from verispec.drafters import DraftModelDrafter, NgramDrafter
from verispec.engine import generate as engine_module
from verispec.engine.generate import Engine
from verispec.engine.request import Request
from verispec.errors import TokenizerMismatchError
from verispec.llm import LLM
from verispec.model.load import ModelSource, load_model


def run(llm, drafter, prompt, params, k):
    engine = Engine(llm.target, drafter, k)
    request = Request(prompt, params, llm.eos_ids, engine.capacity)
    return request, engine.run(request)


def test_greedy_with_a_draft_model_equals_plain_for_every_tau(draft_pair):
    llm, draft = draft_pair
    prompt = llm.encode("the stop the end the stop")
    params = SamplingParams(max_tokens=1024, ignore_eos=True)
    plain, _ = run(llm, None, prompt, params, 0)
    for k in range(1, 9):
        spec, stats = run(llm, DraftModelDrafter(draft), prompt, params, k)
        assert spec.output_ids == plain.output_ids, f"tau={k} diverged"
        assert stats.accepted < stats.drafted


def test_drafter_equal_to_target_accepts_everything_greedy_and_sampled(draft_pair):
    llm, _ = draft_pair
    prompt = llm.encode("the end")
    for params in (SamplingParams(max_tokens=200, ignore_eos=True),
                   SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.0, top_p=0.9, seed=1)):
        _, stats = run(llm, DraftModelDrafter(llm.target), prompt, params, 4)
        assert stats.acceptance_rate >= 0.98


class Recording(DraftModelDrafter):
    def propose(self, context, k):
        proposal = super().propose(context, k)
        self.seen.append((list(context), k, proposal))
        return proposal


@pytest.mark.parametrize("same", [True, False], ids=["all-accepted", "mostly-rejected"])
def test_draft_cache_stays_in_sync_after_every_cycle(draft_pair, same):
    """Every proposal of the running drafter equals that of a fresh drafter given the same context:
    the bonus or recovered token entered its cache, and rejected drafts left it."""
    llm, draft = draft_pair
    model = llm.target if same else draft
    drafter = Recording(model)
    drafter.seen = []
    prompt = llm.encode("the stop the end")
    run(llm, drafter, prompt, SamplingParams(max_tokens=60, ignore_eos=True), 3)
    fresh = DraftModelDrafter(model)
    for context, k, proposal in drafter.seen:
        fresh.reset(Request(prompt, SamplingParams(), llm.eos_ids, 2048).sampler)
        again = fresh.propose(context, k)
        assert again.token_ids == proposal.token_ids and torch.equal(again.probs, proposal.probs)
        assert again.fed == len(context)  # a fresh drafter takes in the whole context
    # the running drafter took in the prompt once, then only what a cycle committed (at most the
    # k + 1 tokens of a full acceptance), never the context again
    assert drafter.seen[0][2].fed == len(prompt)
    assert all(1 <= proposal.fed <= k + 1 for _, k, proposal in drafter.seen[1:])


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_greedy_with_penalties_equals_plain_with_penalties(draft_pair, drafter):
    llm, draft = draft_pair
    prompt = llm.encode("the stop the end the stop the end")
    params = SamplingParams(max_tokens=300, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4,
                            presence_penalty=0.2)
    plain, _ = run(llm, None, prompt, params, 0)
    unpenalized, _ = run(llm, None, prompt, SamplingParams(max_tokens=300, ignore_eos=True), 0)
    assert plain.output_ids != unpenalized.output_ids, "the penalties must change the output for this test"
    spec, stats = run(llm, NgramDrafter() if drafter == "ngram" else DraftModelDrafter(draft), prompt, params, 5)
    assert spec.output_ids == plain.output_ids and stats.drafted > 0


def test_a_draft_model_with_another_tokenizer_is_refused_naming_the_difference(tmp_path, draft_pair):
    llm, _ = draft_pair
    folder = tmp_path / "other"
    tiny_hf_model("llama").save_pretrained(folder)
    save_tiny_tokenizer(folder)
    config = folder / "tokenizer.json"
    config.write_text(config.read_text().replace('"Z": ', '"Q2": '))
    with pytest.raises(TokenizerMismatchError, match="'Z' for the target but 'Q2'"):
        LLM(str(llm.source.folder), drafter=f"draft:{folder}")


# --- the law of sampled outputs, end to end ---------------------------------------------------------

def markov_pair(vocab=3, positions=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = MarkovModel(torch.randn(positions, vocab, vocab, generator=g) * 1.5)
    draft = MarkovModel(torch.randn(positions, vocab, vocab, generator=g) * 1.5)
    return target, draft


def joint_counts(target, draft, n, k, length, temperature, seed=0, controller=None):
    counts = np.zeros([target.table.shape[-1]] * length, dtype=np.int64)
    params = SamplingParams(max_tokens=length, temperature=temperature, seed=None)
    engine = Engine(target, DraftModelDrafter(draft), k, controller)
    torch.manual_seed(seed)
    for trial in range(n):
        request = Request([0, 1], SamplingParams(**{**params.__dict__, "seed": seed * 1_000_003 + trial}),
                          frozenset(), 64)
        engine.run(request)
        counts[tuple(request.output_ids)] += 1
    return counts


def fit(counts, law):
    law = law.double().numpy().reshape(-1)
    expected = law / law.sum() * counts.sum()
    return chisquare(counts.reshape(-1), expected).pvalue


N_JOINT = 3_000


def test_joint_law_of_the_first_three_tokens_on_a_markov_toy():
    """B3: drafts of 2 from a disagreeing Markov drafter; the law of 3 emitted tokens (first cycle's
    accepted drafts, then the recovered or bonus token, then the next cycle) is the target's."""
    target, draft = markov_pair()
    counts = joint_counts(target, draft, N_JOINT, 2, 3, 1.0)
    assert fit(counts, target.law(1, 1, 3, 1.0)) > 1e-3


def test_joint_law_holds_with_the_adaptive_controller():
    from verispec.engine.controller import Controller

    target, draft = markov_pair()
    counts = joint_counts(target, draft, N_JOINT, 0, 3, 1.0, controller=Controller())
    assert fit(counts, target.law(1, 1, 3, 1.0)) > 1e-3


@pytest.mark.parametrize("bug", ["bonus-from-the-last-draft-row", "rows-shifted-by-one"])
def test_joint_law_negative_controls_fail(monkeypatch, bug):
    real_verify = engine_module.verify

    def planted(draft_ids, draft_probs, target_probs, generator):
        p = target_probs.clone()
        if bug == "bonus-from-the-last-draft-row" and len(p) > 1:
            p[-1] = p[-2]
        elif bug == "rows-shifted-by-one" and len(p) > 1:
            p[1:] = target_probs[:-1]
        return real_verify(draft_ids, draft_probs, p, generator)

    monkeypatch.setattr(engine_module, "verify", planted)
    target, draft = markov_pair()
    counts = joint_counts(target, draft, N_JOINT, 2, 3, 1.0)
    assert fit(counts, target.law(1, 1, 3, 1.0)) < 1e-10


def test_first_token_through_a_real_draft_model_follows_plain_sampling(draft_pair):
    """B6: tiny transformer target and draft, top-k 8: the first emitted token's law is the target's
    processed p at the prompt, and nothing outside its top 8 appears."""
    llm, draft = draft_pair
    prompt = llm.encode("the end")
    params = SamplingParams(max_tokens=2, temperature=1.0, top_k=8, ignore_eos=True)
    logits = llm.target.forward(torch.tensor(prompt), torch.arange(len(prompt)), llm.target.new_cache())[-1:]
    p = Request(prompt, params, frozenset(), 2048).sampler.probs(logits, [])[0].numpy().astype(np.float64)
    engine = Engine(llm.target, DraftModelDrafter(draft), 1)
    counts = np.zeros(len(p), dtype=np.int64)
    for trial in range(1500):
        request = Request(prompt, SamplingParams(**{**params.__dict__, "seed": trial}), frozenset(), engine.capacity)
        engine.run(request)
        counts[request.output_ids[0]] += 1
    support = p > 0
    assert counts[~support].sum() == 0 and support.sum() == 8
    # p is float32: renormalised in float64 so that expected and observed totals agree (scipy checks to 1e-8)
    assert chisquare(counts[support], p[support] / p[support].sum() * counts.sum()).pvalue > 1e-3


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_fifty_rejected_requests_leave_memory_and_state_where_they_started(draft_pair, tmp_path):
    """F3: a draft model that almost never agrees, 50 requests in a row: no growth in the caches,
    the drafter's bookkeeping or the process's memory; each request's counters start from zero."""
    llm, _ = draft_pair
    wrong = tiny_hf_model("llama", seed=11)
    wrong.save_pretrained(tmp_path / "wrong")
    drafter = DraftModelDrafter(load_model(ModelSource.of(str(tmp_path / "wrong")), 2048, llm.target.device))
    engine = Engine(llm.target, drafter, 4)
    prompt = llm.encode("the end the stop")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    rss = []
    for i in range(50):
        request = Request(prompt, params, llm.eos_ids, engine.capacity)
        stats = engine.run(request)
        assert stats.completion_tokens == 40 and stats.cycles <= 40
        assert engine.cache.length <= len(prompt) + 40 and drafter.cache.length <= len(prompt) + 40
        assert len(drafter._cached) == drafter.cache.length
        rss.append(_rss_mb())
    assert stats.acceptance_rate < 0.3, "the test needs mostly rejected drafts"
    assert rss[-1] - rss[9] < 20, f"memory grew from {rss[9]:.0f} MB to {rss[-1]:.0f} MB"
