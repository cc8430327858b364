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

    from verispec.llm import LLM

    controller = LLM(str(tiny_llm_folder), drafter="ngram").new_controller()
    # the command prints ms to 4 decimals; a native forward of this tiny model takes ~0.03 ms
    assert controller.cost_model().t1 == pytest.approx(stored["verify_ms"][0], rel=1e-3, abs=1e-4)
