"""Batching: many sequences in one forward give each exactly what it gets alone (greedy and seeded
sampling, every drafter, chunked prefill, sequences joining mid-flight); draft models sharing
weights draft in one forward per step; the scheduler's queue, cancellation, death and drain."""

from __future__ import annotations

import dataclasses
import re
import threading

import pytest
import torch

from verispec.config import SamplingParams
from verispec.drafters import DraftModelDrafter, NgramDrafter
from verispec.engine.controller import Controller
from verispec.engine import generate
from verispec.engine.generate import Engine, Sequence, step
from verispec.engine.request import Request
from verispec.engine.scheduler import Audit, EngineUnavailableError, QueueFullError, Scheduler
from verispec.errors import InvalidInputError


def cases(llm, draft):
    """(prompt, params, drafter factory, τ, controller factory): every drafter, greedy and sampled,
    penalties, a stop id, a one-token prompt, a controller."""
    greedy = SamplingParams(max_tokens=60, ignore_eos=True)
    sampled = SamplingParams(max_tokens=60, temperature=0.8, top_k=20, seed=5, ignore_eos=True)
    penalized = SamplingParams(max_tokens=60, repetition_penalty=1.3, frequency_penalty=0.4, ignore_eos=True,
                               stop_token_ids=(40,))
    no_controller = lambda: None  # noqa: E731
    return [
        (llm.encode("the end the end the"), greedy, lambda: None, 0, no_controller),
        (llm.encode("stop the stop the stop the stop"), greedy, NgramDrafter, 3, no_controller),
        (llm.encode("a b c a b c a b"), greedy, lambda: DraftModelDrafter(draft), 4, no_controller),
        (llm.encode("the quick brown fox"), sampled, lambda: DraftModelDrafter(draft), 2, no_controller),
        (llm.encode("x"), sampled, NgramDrafter, 2, no_controller),
        (llm.encode("the end the end the end the end " * 5), penalized, lambda: DraftModelDrafter(draft), 5,
         no_controller),
        (llm.encode("the stop the end the stop"), greedy, NgramDrafter, 0, Controller),
    ]


def alone(llm, prompt, params, new_drafter, tau, new_controller):
    request = Request(prompt, params, llm.eos_ids, llm.engine.capacity)
    Engine(llm.target, new_drafter(), tau, new_controller()).run(request)
    return request.output_ids


def test_a_batch_gives_every_sequence_what_it_gets_alone(draft_pair):
    llm, draft = draft_pair
    expected = [alone(llm, *case) for case in cases(llm, draft)]
    sequences = [Sequence(Request(prompt, params, llm.eos_ids, llm.engine.capacity), llm.target.new_cache(),
                          new_drafter(), tau, new_controller())
                 for prompt, params, new_drafter, tau, new_controller in cases(llm, draft)]
    running, steps = sequences[:3], 0
    while any(not s.request.finished for s in sequences):
        if steps == 2:
            running += sequences[3:5]  # join while the first ones decode
        if steps == 9:
            running += sequences[5:]
        step(llm.target, [s for s in running if not s.request.finished], prefill_budget=7)  # chunked prefill
        steps += 1
    for i, (seq, want) in enumerate(zip(sequences, expected)):
        assert seq.request.output_ids == want, f"sequence {i} changed in a batch"
    assert sum(s.request.stats.drafted for s in sequences) > 0


def test_draft_models_sharing_weights_draft_together_in_one_forward_per_step(draft_pair, monkeypatch):
    llm, draft = draft_pair
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    sequences = [Sequence(Request(llm.encode(p), params, llm.eos_ids, llm.engine.capacity), llm.target.new_cache(),
                          DraftModelDrafter(draft), 4) for p in ("the end", "stop the", "a b c d")]
    step(llm.target, sequences)  # prefill
    calls = []
    original = draft.forward_many
    monkeypatch.setattr(draft, "forward_many", lambda segments: calls.append(len(segments)) or original(segments))
    target_calls = []
    target_original = llm.target.forward_many
    monkeypatch.setattr(llm.target, "forward_many",
                        lambda segments: target_calls.append(len(segments)) or target_original(segments))
    cycles = step(llm.target, sequences)
    assert [c.drafted for c in cycles] == [4, 4, 4]
    assert calls == [3, 3, 3, 3], "one draft-model forward per drafting step, for all three sequences"
    assert target_calls == [3], "one target forward verifies all three"


# --- the scheduler: threads, queue, cancellation, death, drain --------------------------------------

class Collector:
    def __init__(self) -> None:
        self.cycles, self.error, self.done = [], None, threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, BaseException):
            self.error = event
            self.done.set()
            return
        self.cycles.append(event)
        if event.sequence.request.finished:
            self.done.set()


class Paced(DraftModelDrafter):
    """A draft model that takes at least 10 ms a proposal, so that a 1500-token request runs for
    seconds on any machine (the native kernels write it in a fraction of the tests' waits)."""

    def fork(self):
        return Paced(self.model)

    @staticmethod
    def propose_many(jobs):
        threading.Event().wait(0.01)
        return DraftModelDrafter.propose_many(jobs)


def scheduler_for(llm, draft, drafter=DraftModelDrafter, **kwargs):
    s = Scheduler(llm.target, lambda: drafter(draft), 3, lambda: None, **kwargs)
    s.start()
    return s


def test_the_scheduler_serves_concurrent_requests_each_as_alone(draft_pair):
    llm, draft = draft_pair
    prompts = [llm.encode(p) for p in ("the end the", "stop stop", "a b c a b c", "the quick", "x y z")]
    jobs = [(p, SamplingParams(max_tokens=50, ignore_eos=True) if i % 2 else
             SamplingParams(max_tokens=50, temperature=0.9, seed=i, ignore_eos=True)) for i, p in enumerate(prompts)]
    expected = [alone(llm, p, q, lambda: DraftModelDrafter(draft), 3, lambda: None) for p, q in jobs]
    scheduler = scheduler_for(llm, draft, max_batch=3)
    try:
        requests = [Request(p, q, llm.eos_ids, llm.engine.capacity) for p, q in jobs]
        collectors = [Collector() for _ in jobs]
        for r, c in zip(requests, collectors):
            scheduler.submit(r, c)
        for c in collectors:
            assert c.done.wait(60) and c.error is None
        for r, c, want in zip(requests, collectors, expected):
            assert r.output_ids == want
            assert [t for cycle in c.cycles for t in cycle.tokens] == want, "the listener heard every token once"
    finally:
        scheduler.stop(10)
    assert not scheduler.alive


def test_a_full_queue_refuses_and_a_cancelled_request_frees_its_slot(draft_pair):
    llm, draft = draft_pair
    scheduler = scheduler_for(llm, draft, Paced, max_batch=1, max_queue=1)
    try:
        long = SamplingParams(max_tokens=1500, ignore_eos=True)
        first, second = Collector(), Collector()
        t1 = scheduler.submit(Request(llm.encode("the"), long, llm.eos_ids, llm.engine.capacity), first)
        while not first.cycles:
            threading.Event().wait(0.01)
        scheduler.submit(Request(llm.encode("end"), SamplingParams(max_tokens=5, ignore_eos=True), llm.eos_ids,
                                 llm.engine.capacity), second)
        with pytest.raises(QueueFullError, match="max_queue=1"):
            scheduler.submit(Request(llm.encode("x"), long, llm.eos_ids, llm.engine.capacity), Collector())
        scheduler.cancel(t1)
        assert second.done.wait(10), "the cancelled request's slot went to the waiting one"
        assert not first.cycles[-1].sequence.request.finished and len(first.cycles) < 1500
    finally:
        scheduler.stop(10)


def test_an_engine_that_cannot_make_a_slot_dies_fails_its_requests_and_refuses_new_ones(draft_pair, monkeypatch):
    llm, draft = draft_pair
    monkeypatch.setattr(llm.target, "new_cache", lambda: 1 / 0)  # e.g. out of memory for the first cache
    scheduler = scheduler_for(llm, draft)
    c = Collector()
    scheduler.submit(Request(llm.encode("the"), SamplingParams(), llm.eos_ids, llm.engine.capacity), c)
    assert c.done.wait(10) and isinstance(c.error, ZeroDivisionError)
    scheduler._thread.join(10)
    assert not scheduler.alive
    with pytest.raises(EngineUnavailableError, match="ZeroDivisionError"):
        scheduler.submit(Request(llm.encode("the"), SamplingParams(), llm.eos_ids, llm.engine.capacity), Collector())


MARK = [77, 78, 79, 80]  # the prompt of the request the faults pick


class Faulty(DraftModelDrafter):
    """A draft model that raises once, when it drafts for the marked request."""

    fired = False

    def fork(self):
        return Faulty(self.model)

    @staticmethod
    def propose_many(jobs):
        if not Faulty.fired and any(list(context[:4]) == MARK for _, context, _ in jobs):
            Faulty.fired = True
            raise RuntimeError("drafter fault")
        return DraftModelDrafter.propose_many(jobs)


def test_a_request_whose_drafter_cannot_reset_fails_alone(draft_pair):
    llm, draft = draft_pair

    class Stubborn(DraftModelDrafter):
        def reset(self, sampler):
            if sampler.prompt_ids[:4] == MARK:
                raise RuntimeError("reset fault")
            super().reset(sampler)

    scheduler = Scheduler(llm.target, lambda: Stubborn(draft), 3, lambda: None, max_batch=1)
    scheduler.start()
    try:
        params = SamplingParams(max_tokens=5, ignore_eos=True)
        marked, after = Collector(), Collector()
        scheduler.submit(Request(MARK, params, llm.eos_ids, llm.engine.capacity), marked)
        scheduler.submit(Request(llm.encode("the"), params, llm.eos_ids, llm.engine.capacity), after)
        assert marked.done.wait(30) and "reset fault" in str(marked.error)
        assert after.done.wait(30) and after.error is None and scheduler.alive
    finally:
        scheduler.stop(10)


@pytest.mark.parametrize("fault", ["drafter", "forward"])
def test_a_step_that_raises_fails_only_its_requests_and_the_engine_serves_on(draft_pair, monkeypatch, fault):
    """Fault injection while other requests run: the step's requests hear the error, their slots and
    caches are reset, requests of later steps are untouched, and the next request is exact."""
    llm, draft = draft_pair
    Faulty.fired = False
    forward = llm.target.forward_many
    fired = []

    def faulty_forward(segments):
        if not fired and any(s.token_ids[:4].tolist() == MARK for s in segments):
            fired.append(True)
            raise RuntimeError("forward fault")
        return forward(segments)

    if fault == "forward":
        monkeypatch.setattr(llm.target, "forward_many", faulty_forward)
    drafter = Faulty if fault == "drafter" else DraftModelDrafter
    scheduler = Scheduler(llm.target, lambda: drafter(draft), 3, lambda: None, max_batch=2)
    scheduler.start()
    try:
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        running = Collector()
        scheduler.submit(Request(llm.encode("the end the"), params, llm.eos_ids, llm.engine.capacity), running)
        while not running.cycles:
            threading.Event().wait(0.01)
        marked = Collector()
        scheduler.submit(Request(MARK + llm.encode("x"), params, llm.eos_ids, llm.engine.capacity), marked)
        assert marked.done.wait(30) and isinstance(marked.error, RuntimeError) and f"{fault} fault" in str(marked.error)
        assert running.done.wait(30), "the request in flight finished or failed, it did not hang"
        assert running.error is marked.error or running.error is None, "it failed with its step, or not at all"
        assert scheduler.alive
        prompt = llm.encode("stop the stop")
        after = Collector()
        request = Request(prompt, params, llm.eos_ids, llm.engine.capacity)
        scheduler.submit(request, after)
        assert after.done.wait(30) and after.error is None
        assert request.output_ids == alone(llm, prompt, params, lambda: DraftModelDrafter(draft), 3, lambda: None)
        again = Collector()
        scheduler.submit(Request(MARK + llm.encode("x"), params, llm.eos_ids, llm.engine.capacity), again)
        assert again.done.wait(30) and again.error is None, "the faults fired once; the marked prompt now runs"
    finally:
        scheduler.stop(10)


def test_free_slots_count_as_room_so_a_burst_is_not_refused_while_slots_are_free(draft_pair, monkeypatch):
    """The queue bound counts the requests beyond the free slots; while the engine thread has not yet
    moved waiting requests into slots, max_batch + max_queue requests are still taken."""
    llm, draft = draft_pair
    scheduler = scheduler_for(llm, draft, max_batch=3, max_queue=2)
    try:
        with scheduler._wake:  # the engine thread cannot admit while the burst arrives
            tickets = [scheduler.submit(Request(llm.encode("the"), SamplingParams(max_tokens=3), llm.eos_ids,
                                                llm.engine.capacity), Collector()) for _ in range(5)]
            with pytest.raises(QueueFullError, match=r"0 requests are running \(max_concurrency=3\) and 5 waiting"):
                scheduler.submit(Request(llm.encode("x"), SamplingParams(), llm.eos_ids, llm.engine.capacity),
                                 Collector())
        assert len(tickets) == 5
    finally:
        scheduler.stop(30)


def test_drain_ends_what_is_still_open_after_its_timeout(draft_pair):
    llm, draft = draft_pair
    scheduler = scheduler_for(llm, draft, Paced, max_batch=1)
    long = SamplingParams(max_tokens=1500, ignore_eos=True)
    running, queued = Collector(), Collector()
    scheduler.submit(Request(llm.encode("the"), long, llm.eos_ids, llm.engine.capacity), running)
    scheduler.submit(Request(llm.encode("end"), long, llm.eos_ids, llm.engine.capacity), queued)
    while not running.cycles:
        threading.Event().wait(0.01)
    scheduler.drain(0.3)
    with pytest.raises(EngineUnavailableError):
        scheduler.submit(Request(llm.encode("x"), long, llm.eos_ids, llm.engine.capacity), Collector())
    for c in (running, queued):
        assert c.done.wait(10) and isinstance(c.error, EngineUnavailableError) and "shut down" in str(c.error)
    scheduler.stop(10)
    assert not scheduler._thread.is_alive(), "the engine thread ended once nothing was left"


def test_stop_finishes_admitted_and_queued_requests_then_refuses(draft_pair):
    llm, draft = draft_pair
    scheduler = scheduler_for(llm, draft, max_batch=1)
    collectors = [Collector() for _ in range(3)]
    for c in collectors:
        scheduler.submit(Request(llm.encode("the end"), SamplingParams(max_tokens=20, ignore_eos=True), llm.eos_ids,
                                 llm.engine.capacity), c)
    scheduler.stop(60)
    assert all(c.done.is_set() and c.error is None for c in collectors)
    assert all(len(c.cycles[-1].sequence.request.output_ids) == 20 for c in collectors)
    with pytest.raises(EngineUnavailableError):
        scheduler.submit(Request(llm.encode("the"), SamplingParams(), llm.eos_ids, llm.engine.capacity), Collector())


@pytest.mark.parametrize("planted", [False, True], ids=["exact", "verifier-accepts-everything"])
def test_the_audit_decodes_greedy_requests_again_and_counts_a_difference(draft_pair, monkeypatch, planted, caplog):
    """Negative control: a greedy verifier that accepts every draft gives the draft model's tokens, which
    the plain audit tells apart from the target's."""
    llm, draft = draft_pair
    if planted:
        monkeypatch.setattr(generate, "verify_greedy", lambda d, t: (len(d), list(d) + [t[len(d)]]))
    scheduler = scheduler_for(llm, draft, audit=Audit(rate=1.0))
    try:
        request = Request(llm.encode("the end the"), SamplingParams(max_tokens=40, ignore_eos=True), llm.eos_ids,
                          llm.engine.capacity)
        done = Collector()
        scheduler.submit(request, done)
        assert done.done.wait(60) and done.error is None
        for _ in range(600):  # the audit runs after the request, on the engine thread
            if scheduler.audit.audited:
                break
            threading.Event().wait(0.05)
        assert scheduler.audit.audited == 1
        assert scheduler.audit.mismatches == int(planted)
        found = [r.getMessage() for r in caplog.records if "differs from plain decoding" in r.getMessage()]
        assert bool(found) == planted
        if planted:  # the margin logged is the target's own top-1 minus top-2 logit where the outputs part
            at = int(re.search(r"position (\d+)", found[0]).group(1))
            plain = llm.generate(request.prompt_ids, request.params, speculative=False).token_ids
            assert request.output_ids[:at] == plain[:at] and request.output_ids[at] != plain[at]
            cache = llm.engine.cache
            cache.truncate(0)
            ids = request.prompt_ids + plain[:at]
            top = torch.topk(llm.target.forward(torch.tensor(ids), torch.arange(len(ids)), cache)[-1], 2).values
            assert float(re.search(r"logit margin there (\S+)\)", found[0]).group(1)) == pytest.approx(
                float(top[0] - top[1]), abs=1e-4)
    finally:
        scheduler.stop(10)


def prefill_rows(llm, monkeypatch) -> list[int]:
    """Counts the rows of every prefill segment the target runs."""
    rows: list[int] = []
    forward = llm.target.forward_many

    def counted(segments):
        rows.extend(len(seg.token_ids) for seg in segments if seg.logits == "none")
        return forward(segments)

    monkeypatch.setattr(llm.target, "forward_many", counted)
    return rows


def test_choices_of_one_prompt_prefill_it_once_and_each_gets_what_it_gets_alone(draft_pair, monkeypatch):
    """Four sampled choices of one prompt (seeds 0..3) and one of another, batched with chunked
    prefill: the shared prompt enters the target once, the copies decode exactly as alone."""
    llm, draft = draft_pair
    prompt, other = llm.encode("the end the stop " * 12), llm.encode("a b c")
    jobs = [(prompt, SamplingParams(max_tokens=30, temperature=0.9, seed=j, ignore_eos=True)) for j in range(4)]
    jobs.append((other, SamplingParams(max_tokens=30, ignore_eos=True)))
    expected = [alone(llm, p, q, lambda: DraftModelDrafter(draft), 3, lambda: None) for p, q in jobs]
    rows = prefill_rows(llm, monkeypatch)
    sequences = []
    for p, q in jobs:
        twin = next((s for s in sequences if s.request.prompt_ids == p), None)
        sequences.append(Sequence(Request(p, q, llm.eos_ids, llm.engine.capacity), llm.target.new_cache(),
                                  DraftModelDrafter(draft), 3, prefix_from=twin))
    while any(not s.request.finished for s in sequences):
        step(llm.target, [s for s in sequences if not s.request.finished], prefill_budget=16)
    assert [s.request.output_ids for s in sequences] == expected
    assert sum(rows) == len(prompt) - 1 + len(other) - 1, rows


def test_a_choice_whose_prompt_source_is_cancelled_prefills_on_its_own(draft_pair, monkeypatch):
    llm, draft = draft_pair
    prompt = llm.encode("the end the stop " * 12)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    expected = alone(llm, prompt, params, lambda: None, 0, lambda: None)
    source = Sequence(Request(prompt, params, llm.eos_ids, llm.engine.capacity), llm.target.new_cache())
    copy = Sequence(Request(prompt, params, llm.eos_ids, llm.engine.capacity), llm.target.new_cache(),
                    prefix_from=source)
    step(llm.target, [source, copy], prefill_budget=16)  # the source is mid-prefill, the copy waits
    assert copy.cache.length == 0 and source.cache.length == 16
    while not copy.request.finished:  # the source is gone (cancelled)
        step(llm.target, [copy], prefill_budget=16)
    assert copy.request.output_ids == expected


def test_the_scheduler_prefills_n_choices_of_a_prompt_once(draft_pair, monkeypatch):
    llm, draft = draft_pair
    prompt = llm.encode("the end the stop " * 12)
    jobs = [SamplingParams(max_tokens=20, temperature=1.0, seed=j, ignore_eos=True) for j in range(3)]
    expected = [alone(llm, prompt, q, lambda: DraftModelDrafter(draft), 3, lambda: None) for q in jobs]
    rows = prefill_rows(llm, monkeypatch)
    scheduler = scheduler_for(llm, draft, max_batch=4)
    try:
        requests = [Request(prompt, q, llm.eos_ids, llm.engine.capacity) for q in jobs]
        collectors = [Collector() for _ in jobs]
        with scheduler._wake:  # submitted together, as the server submits n choices
            for r, c in zip(requests, collectors):
                scheduler.submit(r, c)
        for c in collectors:
            assert c.done.wait(60) and c.error is None
    finally:
        scheduler.stop(10)
    assert [r.output_ids for r in requests] == expected
    assert sum(rows) == len(prompt) - 1, rows


def test_n_choices_from_the_library_are_each_their_seeded_request_and_share_one_prefill(ngram_llm, monkeypatch):
    llm = ngram_llm
    prompt = "the end the stop the end " * 6
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=40, ignore_eos=True)
    alone = [llm.generate(prompt, dataclasses.replace(params, seed=40 + j)).token_ids for j in range(3)]
    rows = prefill_rows(llm, monkeypatch)
    out = llm.generate(prompt, dataclasses.replace(params, n=3))
    assert [c.token_ids for c in out.choices] == alone and out.token_ids == alone[0] and len(set(map(tuple, alone))) > 1
    assert sum(rows) == len(llm.encode(prompt)) - 1 and all(c.stats.drafted > 0 for c in out.choices)
    greedy = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True, n=2), speculative=False)
    assert [c.token_ids for c in greedy.choices] == [llm.generate(prompt, SamplingParams(max_tokens=24,
                                                                                          ignore_eos=True)).token_ids] * 2
    with pytest.raises(InvalidInputError, match="n=17 is not allowed"):
        SamplingParams(n=17)
    with pytest.raises(InvalidInputError, match="n=2 cannot be streamed"):
        next(llm.stream(prompt, SamplingParams(n=2)))
