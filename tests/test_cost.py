"""The cost model against values computed by hand."""

from __future__ import annotations

import pytest

from verispec.engine.cost import CostModel, VerifyCurve, expected_tokens, offered_by_position, conditional_acceptance


def test_leviathan_closed_form_with_flat_verification():
    model = CostModel(VerifyCurve.flat(10.0), draft_ms=0.5)  # c = 0.05
    # E = (1 - 0.8^5) / 0.2 = 3.3616; speedup = 3.3616 / (4 * 0.05 + 1) = 2.801333
    assert expected_tokens([0.8], 4) == pytest.approx(3.3616)
    assert model.speedup([0.8], 4) == pytest.approx(2.801333, rel=1e-6)
    assert model.speedup([0.8], 0) == 1.0
    # tau = 1 breaks even where 1 + a = 1.05
    assert model.break_even_alpha(1) == pytest.approx(0.05, abs=1e-9)


def test_per_position_acceptance_and_a_measured_verify_curve():
    model = CostModel(VerifyCurve((10.0, 12.0, 14.0)), draft_ms=1.0)
    # E = 1 + 0.9 + 0.9 * 0.5 = 2.35; cycle = 2 * 1 + T(3) = 16 ms; speedup = 2.35 * 10 / 16
    assert model.speedup([0.9, 0.5], 2) == pytest.approx(1.46875)
    assert model.curve(5) == pytest.approx(18.0)  # linear beyond the measured k
    assert model.c == pytest.approx(0.1)


def test_the_engines_overhead_is_paid_once_a_token_plainly_and_once_a_cycle_speculating():
    model = CostModel(VerifyCurve((10.0, 12.0, 14.0)), draft_ms=1.0, overhead_ms=2.0)
    # E = 2.35 as above; plain: 12 ms a token; a cycle: 2 * 1 + T(3) + 2 = 18 ms; speedup = 2.35 * 12 / 18
    assert model.t1 == 12.0
    assert model.cycle_ms(2) == pytest.approx(18.0)
    assert model.speedup([0.9, 0.5], 2) == pytest.approx(2.35 * 12 / 18)
    assert model.speedups([0.9, 0.5], 2)[2] == pytest.approx(2.35 * 12 / 18)
    # the same drafts pay more with the overhead counted: 1.567x against 1.469x without
    without = CostModel(VerifyCurve((10.0, 12.0, 14.0)), draft_ms=1.0)
    assert model.speedup([0.9, 0.5], 2) > without.speedup([0.9, 0.5], 2)


def test_best_tau_is_zero_when_drafting_cannot_pay():
    model = CostModel(VerifyCurve((10.0, 13.0, 16.0, 19.0)), draft_ms=2.0)
    assert model.best_tau([0.1]) == (0, 1.0)
    tau, speedup = model.best_tau([0.95])
    assert tau > 2 and speedup > 1.5
    # more acceptance never lowers the best speedup
    values = [model.best_tau([a])[1] for a in (0.2, 0.4, 0.6, 0.8, 0.95)]
    assert values == sorted(values)


def test_alpha_needed_for_a_speedup():
    model = CostModel(VerifyCurve.flat(10.0), draft_ms=1.0)  # c = 0.1
    alpha = model.alpha_for(1.5)
    assert max(model.speedup([alpha], t) for t in range(16)) == pytest.approx(1.5, abs=1e-6)
    assert model.alpha_for(100.0) is None


def test_position_acceptance_counts_only_tried_positions():
    # cycles (drafted, accepted): position 0 tried 3x kept 2x; position 1 tried 2x kept 2x; 2 tried once
    assert conditional_acceptance([(4, 2), (4, 0), (2, 2), (0, 0)]) == pytest.approx([2 / 3, 1.0, 0.0])


def test_short_proposals_verify_fewer_rows_and_commit_fewer_tokens():
    model = CostModel(VerifyCurve((10.0, 12.0, 14.0, 16.0, 18.0)), draft_ms=0.0)
    # proposals: none 50 %, exactly 2 tokens 30 %, 4 tokens 20 %: offered = [0.5, 0.5, 0.2, 0.2]
    offered = [0.5, 0.5, 0.2, 0.2]
    # rows = 1.4; E = 1 + 0.5 a + 0.5 a^2 + 0.2 a^3 + 0.2 a^4 at a = 0.5: 1.4125; T(2.4) = 12.8
    assert model.speedup([0.5], 4, offered) == pytest.approx(1.4125 * 10 / 12.8)
    assert model.curve(2.4) == pytest.approx(12.8)
    assert offered_by_position([(4, 0), (4, 0), (4, 2), (4, 4), (4, 4)]) == [0.6, 0.6, 0.4, 0.4]


def test_a_cycle_is_priced_over_the_law_of_the_drafts_proposed_not_at_their_mean():
    """A CPU's verify curve steps up at some row counts. A drafter that proposes all 8 tokens or none,
    half the time each, pays T(1) or T(9), never T(5): at the mean the step would be missed and a
    long τ would look cheap."""
    stepped = VerifyCurve((10.0,) * 7 + (20.0, 20.0))  # T(8) and T(9) cost twice T(1)
    model = CostModel(stepped, draft_ms=0.5)
    assert model.cycle_ms(8, [0.5]) == pytest.approx(0.5 * 10.0 + 0.5 * (8 * 0.5 + 20.0))
    assert model.cycle_ms(8, [0.5]) > 1.3 * stepped(5)


def test_a_measured_dip_in_the_verify_curve_is_treated_as_noise():
    curve = VerifyCurve((60.0, 61.0, 50.0, 70.0))
    assert curve.ms == (60.0, 61.0, 61.0, 70.0)


def test_stats_name_vllms_measures_and_the_conditional_ones_apart():
    from verispec.types import Stats

    stats = Stats()
    for drafted, accepted in [(4, 2), (4, 0), (0, 0), (2, 2)]:
        stats.record_cycle(drafted, accepted)
    assert (stats.cycles, stats.drafts, stats.drafted, stats.accepted) == (4, 3, 10, 4)
    assert stats.mean_accepted_length == pytest.approx(1 + 4 / 3), "vLLM's: over the cycles that drafted"
    assert stats.tokens_per_cycle == pytest.approx(1 + 4 / 4), "over every cycle"
    assert stats.per_position_acceptance == pytest.approx([2 / 3, 2 / 3, 0, 0]), "vLLM's: accepted at i / drafts"
    assert stats.conditional_acceptance == pytest.approx([2 / 3, 1.0, 0.0]), "accepted at i / tried at i"


def test_speedups_in_one_pass_equal_the_speedup_of_every_tau():
    import random

    r = random.Random(1)
    for _ in range(300):
        curve = VerifyCurve(tuple(sorted(r.uniform(3, 12) for _ in range(r.randint(1, 16)))))
        model = CostModel(curve, r.uniform(0, 2), r.uniform(0, 0.5))
        alphas = [r.random() for _ in range(r.randint(1, 9))]
        offered = [r.random() for _ in range(r.randint(1, 9))]
        direct = [expected_tokens(alphas, t, offered) * model.t1
                  / (model.cycle_ms(t, offered) + (model.feed_ms * expected_tokens(alphas, t, offered) if t else 0.0))
                  for t in range(9)]  # E(τ)·T(1) over the cycle's expected cost, summed over the law of drafts
        assert model.speedups(alphas, 8, offered) == pytest.approx(direct, rel=1e-12)
