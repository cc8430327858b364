"""Calibration: T(k) timed so that a slow spell of a shared machine cannot single out one k, and the
stored curve reaches the controller of a later run."""

from __future__ import annotations

import json
import time

import pytest

from verispec.cli.main import main
from verispec.engine.calibrate import forward_times_ms


class SpellTarget:
    """A fake target whose forward over k tokens takes k ms, except during one slow spell of five
    consecutive calls (another process took the cores), which take 25 ms each."""

    device = "cpu"

    def __init__(self, spell_start: int) -> None:
        self.calls = 0
        self.spell = range(spell_start, spell_start + 5)

    def forward(self, token_ids, positions, cache, last_only=False):
        self.calls += 1
        time.sleep(0.025 if self.calls in self.spell else 0.001 * len(token_ids))


class NoCache:
    def truncate(self, length: int) -> None:
        pass


@pytest.mark.parametrize("spell_start", [8, 20, 33])
def test_a_slow_spell_does_not_single_out_one_k(spell_start):
    """Timing each k's repeats back to back (as calibrate once did) puts the whole spell on one k,
    whose median then reads 25 ms: a made-up step in the curve that steers τ away from it."""
    curve = forward_times_ms(SpellTarget(spell_start), NoCache(), range(1, 10), repeats=5)
    for k, ms in enumerate(curve, 1):  # a loaded machine oversleeps by a third at most; the spell reads 25
        assert ms == pytest.approx(k, abs=2.0, rel=0.35), (k, curve)


def test_calibrate_stores_a_curve_that_a_later_controller_starts_from(tiny_llm_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VERISPEC_CACHE", str(tmp_path))
    assert main(["calibrate", "--model", str(tiny_llm_folder), "--drafter", "ngram", "--repeats", "3"]) == 0
    stored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(stored["verify_ms"]) == 16 and all(ms > 0 for ms in stored["verify_ms"])
    assert stored["overhead_ms"] > 0  # the engine's own time per cycle: there always is some

    from verispec.llm import LLM

    controller = LLM(str(tiny_llm_folder), drafter="ngram").new_controller()
    # the command prints ms to 4 decimals; a native forward of this tiny model takes ~0.03 ms. Plain
    # decoding's price per token is T(1) and the engine's overhead, which the controller keeps
    assert controller.cost_model().t1 == pytest.approx(stored["verify_ms"][0] + stored["overhead_ms"],
                                                       rel=1e-3, abs=2e-4)


def test_the_engines_overhead_counts_time_outside_the_forward_only(tiny_llm, monkeypatch):
    """5 ms slept in the verification (outside the forward) shows in overhead_ms; 5 ms slept inside
    the forward does not."""
    from verispec.engine import generate

    base = tiny_llm.overhead_ms()
    greedy = generate.verify_greedy
    monkeypatch.setattr(generate, "verify_greedy", lambda *a: (time.sleep(0.005), greedy(*a))[1])
    outside = tiny_llm.overhead_ms()
    monkeypatch.setattr(generate, "verify_greedy", greedy)
    backend = tiny_llm.target.backend
    forward = backend.forward_many
    monkeypatch.setattr(backend, "forward_many", lambda segments: (time.sleep(0.005), forward(segments))[1])
    inside = tiny_llm.overhead_ms()
    assert outside - base > 4.5, (base, outside)
    assert inside - base < 2.5, (base, inside)


def test_a_drafters_cost_is_timed_after_a_forward_each_time():
    """A drafter that is slow only on caches a forward has just filled (as in a cycle) is priced slow:
    `between` runs before every timed call, not once."""
    from verispec.drafters.base import DraftProposal
    from verispec.engine.calibrate import drafter_costs_ms

    class Cold:
        flushed = False

        def reset(self, sampler=None):
            pass

        def propose(self, context, k):
            time.sleep(0.004 if self.flushed else 0.0)
            self.flushed = False
            return DraftProposal([1] * k)

    drafter = Cold()
    warm, _ = drafter_costs_ms(drafter, [1, 2, 3], None, k=4, repeats=5)
    cold, _ = drafter_costs_ms(drafter, [1, 2, 3], None, k=4, repeats=5,
                               between=lambda: setattr(drafter, "flushed", True))
    assert warm < 0.2 and cold > 0.9, (warm, cold)  # 4 ms over 4 tokens


def test_the_controller_learns_the_forwards_time_as_calibrate_times_it(tiny_llm, monkeypatch):
    """The controller's T(k) is the target's forward alone, as calibrate's curve is; the rest of a
    cycle (3 ms slept in the verification here) is the overhead the cost model adds once, not a
    second time inside T."""
    from verispec.config import SamplingParams
    from verispec.engine import generate
    from verispec.engine.controller import Controller
    from verispec.engine.cost import CostModel, VerifyCurve

    greedy = generate.verify_greedy
    monkeypatch.setattr(generate, "verify_greedy", lambda *a: (time.sleep(0.003), greedy(*a))[1])
    controller = Controller(CostModel(VerifyCurve((0.05, 0.06)), 0.001))
    engine = tiny_llm.engine
    before = engine.drafter, engine.num_draft_tokens, engine.controller
    engine.use(tiny_llm.make_drafter("ngram"), 0, controller)
    try:
        stats = tiny_llm.generate([5, 6, 7, 5, 6, 7, 5, 6], SamplingParams(max_tokens=40, temperature=0.0)).stats
    finally:
        engine.use(*before)
    assert stats.verify_s - stats.forward_s > 0.003 * stats.cycles  # the sleep was in the verification
    assert controller.cost_model().curve(1) < 1.0, controller.cost_model().curve.ms  # a forward: well under 3 ms
