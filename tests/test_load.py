"""Load-aware speculation (verispec/engine/load.py) on simulated batches: the planner gives each
sequence the drafts of highest expected goodput for the batch (checked against a plain search over
every plan), drafts less as the batch grows, not at all where verify rows cost as much as decoding,
keeps a lone sequence's τ and fixed τs; in the engine it never changes an output, and a slot's
controller starts each request outside a run of accepted drafts."""

from __future__ import annotations

import itertools

import pytest

from verispec.config import SamplingParams
from verispec.drafters import NgramDrafter
from verispec.engine.controller import Controller
from verispec.engine.cost import CostModel, VerifyCurve, expected_tokens
from verispec.engine.generate import Engine, Sequence, step
from verispec.engine.load import BatchPlanner
from verispec.engine.request import Request


def curve(t1: float, per_row: float) -> VerifyCurve:
    return VerifyCurve(tuple(t1 + per_row * (rows - 1) for rows in range(1, 17)))


def controller(alpha: float, draft_ms: float = 0.05) -> Controller:
    """A controller that has seen 200 cycles of τ 4 accept at a constant α (a seeded sequence)."""
    c = Controller(CostModel(curve(4.0, 0.05), draft_ms))
    state = 12345
    for _ in range(200):
        accepted = 0
        while accepted < 4:
            state = (state * 1103515245 + 12345) % 2**31
            if state / 2**31 >= alpha:
                break
            accepted += 1
        c.observe(4, 4, accepted, draft_ms * 4, 4.0 + 0.05 * 4)
    return c


class Outlook:
    """A sequence as the planner reads its controller: acceptance by position, a proposal every cycle."""

    def __init__(self, alphas: list[float], draft_ms: float = 0.05) -> None:
        self.alphas, self.draft_ms = alphas, draft_ms

    def outlooks(self, tau: int) -> list[tuple[float, float, float]]:
        return [(expected_tokens(self.alphas, t), float(t), self.draft_ms) for t in range(tau + 1)]


def rate(sequences, planned, steps: VerifyCurve, prefill_rows=0) -> float:
    """The goodput of a plan, written out plainly: tokens expected over the step's time."""
    tokens = rows = draft = 0.0
    for seq, t in zip(sequences, planned):
        e, drafts, per_draft = seq.outlooks(t)[t]
        tokens += e
        rows += 1 + drafts
        draft += drafts * per_draft
    return tokens / (steps(rows + prefill_rows) + draft)  # the curve is a line: extended by its slope


ALPHAS = {"low": [0.3] * 4, "middling": [0.6] * 4, "in a run": [0.95] * 4, "falling": [0.8, 0.6, 0.4, 0.2]}


@pytest.mark.parametrize("per_row", [0.05, 0.3, 0.6, 1.0, 4.0])
def test_the_plan_is_the_one_of_highest_goodput(per_row):
    """Against every plan of a mixed batch: sequences outside a run of accepted drafts and inside one."""
    steps = curve(4.0, per_row)
    planner = BatchPlanner(steps)
    sequences = [Outlook(a) for a in ALPHAS.values()] * 2
    taus = [4, 3, 4, 4, 2, 4, 4, 3]
    planned = planner.plan(sequences, taus, prefill_rows=16)
    best = max(rate(sequences, plan, steps, 16) for plan in itertools.product(*(range(t + 1) for t in taus)))
    assert rate(sequences, planned, steps, 16) == pytest.approx(best, rel=1e-9)
    assert all(0 <= p <= t for p, t in zip(planned, taus))


def test_in_a_full_batch_a_sequence_in_a_run_keeps_its_drafts_and_the_others_stop():
    """What one cap for the batch could not do: 16 sequences, each row an eighth of a lone step."""
    planner = BatchPlanner(curve(4.0, 0.5))
    sequences = [Outlook(ALPHAS["in a run"])] * 2 + [Outlook(ALPHAS["middling"])] * 14
    planned = planner.plan(sequences, [4] * 16)
    assert planned == [4] * 2 + [0] * 14


def test_drafts_fall_as_the_batch_grows_and_stop_where_rows_cost_as_much_as_a_step():
    steps = curve(4.0, 0.25)
    drafts = []
    for batch in (1, 2, 4, 8, 16):
        planner = BatchPlanner(steps)
        planned = planner.plan([controller(0.6) for _ in range(batch)], [6] * batch)
        drafts.append(sum(planned) / batch)
    assert drafts == sorted(drafts, reverse=True) and drafts[0] == 6 and drafts[-1] < drafts[1], drafts
    dear = BatchPlanner(curve(4.0, 4.0))  # a row costs a whole step: drafting never pays in a batch
    assert dear.plan([controller(0.9) for _ in range(4)], [4] * 4) == [0] * 4
    flat = BatchPlanner(curve(4.0, 0.0))  # rows and drafts are free: every sequence keeps its τ
    assert flat.plan([controller(0.3, draft_ms=0.0) for _ in range(16)], [4] * 16) == [4] * 16
    # but 16 sequences' drafting is sequential: at 0.05 ms a draft, four drafts each cost most of a step
    assert flat.plan([controller(0.3) for _ in range(16)], [4] * 16) == [1] * 16


def test_a_lone_sequence_and_fixed_taus_are_left_alone():
    dear = BatchPlanner(curve(4.0, 4.0))
    assert dear.plan([controller(0.9)], [4]) == [4]
    planned = dear.plan([None, controller(0.2), None], [3, 4, 5])
    assert planned[0] == 3 and planned[2] == 5 and planned[1] < 4


def test_a_planned_batch_gives_every_sequence_what_it_gets_alone(ngram_llm):
    llm = ngram_llm
    prompts = [llm.encode(p) for p in ("the end the end the", "stop the stop the stop", "the end stop the end")]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    alone = []
    for ids in prompts:
        request = Request(ids, params, llm.eos_ids, llm.engine.capacity)
        Engine(llm.target, NgramDrafter(), 0, Controller()).run(request)
        alone.append(request.output_ids)
    planner = BatchPlanner(curve(0.5, 0.2))
    sequences = [Sequence(Request(ids, params, llm.eos_ids, llm.engine.capacity), llm.target.new_cache(),
                          NgramDrafter(), 0, Controller()) for ids in prompts]
    while running := [s for s in sequences if not s.request.finished]:
        step(llm.target, running, planner=planner)
    assert [s.request.output_ids for s in sequences] == alone
    assert planner.last["sequences"] == 3


def test_a_request_starts_outside_the_run_its_slot_ended_in(ngram_llm):
    """A slot's controller serves request after request: the last cycle of one says nothing of the
    first of the next, which is priced outside a run of accepted drafts."""
    llm = ngram_llm
    controller = Controller()
    controller.observe(2, 2, 2, 0.1, 1.0)  # a cycle that kept both its drafts
    assert controller.run
    request = Request(llm.encode("the end the end the"), SamplingParams(max_tokens=4), llm.eos_ids, llm.engine.capacity)
    Sequence(request, llm.target.new_cache(), NgramDrafter(), 0, controller)
    assert not controller.run
