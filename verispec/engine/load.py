"""Load-aware speculation: with many sequences in a step, verify rows are no longer free.

Each sequence's controller picks the τ that is best for that sequence alone. In a batch every row
a sequence adds lengthens the step for all of them, so the planner caps the batch's τ at the value
that maximises the step's goodput, the tokens the whole batch is expected to commit per second:

    rate(cap) = Σ_i E_i(min(τ_i, cap)) / (T(rows(cap)) + Σ_i draft_ms_i · drafts_i(cap))

with E_i and drafts_i from sequence i's controller (its acceptance by position and proposal
lengths), rows(cap) the prefill rows plus 1 + drafts per sequence, and T the forward's time by
rows: a line fitted to the steps timed without prefill (decayed least squares), the calibrated
single-sequence curve's line counting as one early observation; a prompt row is priced as a verify
row (it costs less, and the same for every cap). One sequence keeps its
controller's τ; sequences with a fixed τ keep theirs and count as rows. The cap falls as the batch
grows and reaches 0 where drafting would lower throughput; each controller hears the τ it ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from verispec.engine.controller import Controller, fit_line, line_moments
from verispec.engine.cost import VerifyCurve

PRIOR_ROWS = 64  # the calibrated curve (16 rows, extended by its own slope) read as a line up to here
PRIOR_FLOOR = 0.01  # in observations: anchors the slope while every step has the same rows


class BatchPlanner:
    def __init__(self, prior: VerifyCurve | None = None, decay: float = 0.95) -> None:
        self._decay = decay
        self._prior = None if prior is None else line_moments([(1.0 / PRIOR_ROWS, r, prior(r))
                                                               for r in range(1, PRIOR_ROWS + 1)])
        self._prior_weight = 1.0
        self._data = [0.0] * 5
        self.last: dict[str, Any] = {}

    def observe(self, rows: int, ms: float, prefill_rows: int = 0) -> None:
        """One forward of `rows` verify rows (every sequence's) and `prefill_rows` prompt rows took
        `ms`. Only steps without prefill are fitted: a prompt row skips the LM head and sampling
        (about half a verify row here), and big prefill chunks would set the line's slope."""
        if prefill_rows or rows == 0:
            return
        d = self._decay
        self._prior_weight = max(d * self._prior_weight, PRIOR_FLOOR)
        self._data = [d * x + y for x, y in zip(self._data, line_moments([(1.0, rows, ms)]))]

    def step_ms(self) -> tuple[float, float] | None:
        """(a, b): a step of R rows is expected to take a + b·R ms (None before any timing or prior)."""
        if self._prior is None and self._data[0] == 0:
            return None
        prior = self._prior or [0.0] * 5
        return fit_line([self._prior_weight * p + x for p, x in zip(prior, self._data)])

    def plan(self, controllers: Sequence[Controller | None], taus: Sequence[int], prefill_rows: int = 0) -> list[int]:
        """The τ each decoding sequence drafts this step: its own (controllers[i] None: a fixed τ,
        kept), capped at the cap of highest expected goodput."""
        if len(taus) < 2 or all(c is None for c in controllers) or (line := self.step_ms()) is None:
            return list(taus)
        a, b = line
        views = [[(1.0, float(tau), 0.0)] * (tau + 1) if c is None else c.outlooks(tau)
                 for c, tau in zip(controllers, taus)]
        best_cap, best_rate = max(taus), -1.0
        for cap in range(max(taus), -1, -1):  # from the top: a tie keeps the longer drafts
            tokens, rows, draft_ms = 0.0, float(prefill_rows), 0.0
            for c, tau, view in zip(controllers, taus, views):
                e, drafts, per_draft = view[tau if c is None else min(tau, cap)]
                tokens, rows, draft_ms = tokens + e, rows + 1 + drafts, draft_ms + drafts * per_draft
            rate = tokens / (a + b * rows + draft_ms)
            if rate > best_rate:
                best_cap, best_rate = cap, rate
        self.last = {"cap": best_cap, "sequences": len(taus), "tokens_per_ms": round(best_rate, 4)}
        return [tau if c is None else min(tau, best_cap) for c, tau in zip(controllers, taus)]
