"""Load-aware speculation: with many sequences in a step, verify rows are no longer free.

Each sequence's controller picks the τ that is best for that sequence alone. In a batch every row
a sequence adds lengthens the step for all of them, so the planner gives each sequence the drafts
that maximise the step's goodput, the tokens the whole batch is expected to commit per second:

    rate(τ'_1..τ'_n) = Σ_i E_i(τ'_i) / (T(rows) + Σ_i draft_ms_i · drafts_i(τ'_i)),   τ'_i ≤ τ_i

with E_i and drafts_i from sequence i's controller (its acceptance by position, in the state the
sequence's next cycle starts in, and its proposal lengths), rows the prefill rows plus 1 + drafts per
sequence, and T the forward's time by rows: a line fitted to the steps timed without prefill
(decayed least squares), the calibrated single-sequence curve's line counting as one early
observation; a prompt row is priced as a verify row (it costs less, and the same for every plan).
T being a line, a draft row costs the same whoever drafts it, and a sequence's next draft adds no more
tokens than the one before it (Π α_j only falls), so the plan is greedy: starting from no drafts, the
sequence whose next draft adds the most tokens per ms gets it while that beats the batch's rate so
far. A sequence inside a run of accepted drafts keeps long
drafts in a full batch while one outside it decodes plainly, which one cap for the batch cannot
do. One sequence keeps its controller's τ; sequences with a fixed τ keep theirs and count as rows.
Drafts fall as the batch grows and stop where they would lower throughput; each controller hears
the τ it ran.
"""

from __future__ import annotations

import heapq
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
        kept), or fewer, as the step's goodput is highest."""
        if len(taus) < 2 or all(c is None for c in controllers) or (line := self.step_ms()) is None:
            return list(taus)
        a, b = line
        # per sequence and τ' = 0..τ: (tokens expected, ms its drafts add to the step)
        views = [[(e, b * drafts + drafts * per_draft) for e, drafts, per_draft in c.outlooks(tau)]
                 if c is not None else None for c, tau in zip(controllers, taus)]
        planned = [tau if view is None else 0 for tau, view in zip(taus, views)]
        tokens = sum(1.0 if view is None else view[0][0] for view in views)
        ms = a + b * (prefill_rows + len(taus) + sum(t for t, view in zip(taus, views) if view is None))
        steps = [step for i, view in enumerate(views) if view is not None and (step := _next_step(view, 0, i))]
        heapq.heapify(steps)
        while steps:
            ratio, i, tau, gain, cost = heapq.heappop(steps)
            if -ratio <= tokens / ms:  # the best step left would lower the batch's rate
                break
            tokens, ms, planned[i] = tokens + gain, ms + cost, tau
            if step := _next_step(views[i], tau, i):
                heapq.heappush(steps, step)
        self.last = {"sequences": len(taus), "drafts": sum(planned), "tokens_per_ms": round(tokens / ms, 4)}
        return planned


def _next_step(view: list[tuple[float, float]], tau: int, i: int) -> tuple[float, int, int, float, float] | None:
    """Sequence i's next draft from τ, as a heap entry (−tokens per ms it adds, i, τ + 1, tokens, ms);
    None at its own τ."""
    if tau + 1 >= len(view):
        return None
    gain, cost = view[tau + 1][0] - view[tau][0], view[tau + 1][1] - view[tau][1]
    return (-gain / cost if cost > 0 else -float("inf")), i, tau + 1, gain, cost
