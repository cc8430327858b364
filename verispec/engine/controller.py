"""Adaptive τ: before every cycle, the τ (0 = a plain step) that maximises expected committed tokens
per second under the cost model, from online estimates of the acceptance by position, the share of
cycles in which the drafter proposes, its cost per token and the verify curve T(k).

Speculation can only lose when the estimates are wrong, so they track the recent past (exponential
decay) and, while speculation is off, a probe every so often (a bounded share of cycles) measures
whether acceptance has come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from verispec.engine.cost import CostModel, VerifyCurve

# Until a verify over k tokens has been timed: T(k) = T(1) * (1 + GROWTH_GUESS * (k - 1))
GROWTH_GUESS = 0.1


@dataclass(frozen=True)
class ControllerConfig:
    max_tau: int = 8
    decay: float = 0.9  # weight of the past per observation (a window of ~10 observations)
    prior_alpha: float = 0.5  # what position 0 is believed to accept before anything was seen
    prior_weight: float = 1.0  # in observations
    probe_interval: int = 16  # while off: one probe cycle in this many, at most
    probe_interval_max: int = 64  # probes that find nothing space out up to this
    probe_tau: int = 2


class Controller:
    def __init__(self, prior: CostModel | None = None, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        c = self.config
        self._kept = [0.0] * c.max_tau  # decayed counts per position
        self._tried = [0.0] * c.max_tau
        self._prior_weight = [c.prior_weight] * c.max_tau  # the prior decays like an observation
        self._longer = [1.0] * c.max_tau  # decayed: proposals longer than i / requests for more than i
        self._asked = [1.0] * c.max_tau
        self._verify_ms: dict[int, float] = {}  # k -> decayed mean of measured T(k)
        if prior is not None:
            self._verify_ms = {k: prior.curve(k) for k in range(1, c.max_tau + 2)}
        self._draft_ms = prior.draft_ms if prior is not None else 0.0
        self._draft_seen = prior is not None
        self._since_probe = 0
        self._interval = c.probe_interval
        self.last: dict[str, Any] = {}

    # --- estimates --------------------------------------------------------------------------------
    @property
    def alphas(self) -> list[float]:
        """α_i, each position's prior being the estimate of the one before: positions beyond the τ
        chosen so far are believed to accept like the deepest one seen, so a longer τ gets tried.
        The prior counts as one early observation and fades like the others, so a drafter that is
        never accepted is estimated at 0, not at a floor the prior would hold up."""
        prior, out = self.config.prior_alpha, []
        for kept, tried, w in zip(self._kept, self._tried, self._prior_weight):
            prior = (kept + w * prior) / (tried + w)
            out.append(prior)
        return out

    @property
    def offered(self) -> list[float]:
        """P(the drafter proposes more than i tokens | asked for more than i)."""
        return [n / a for n, a in zip(self._longer, self._asked)]

    def cost_model(self) -> CostModel | None:
        if 1 not in self._verify_ms:
            return None
        t1 = self._verify_ms[1]
        guess = [t1 * (1 + GROWTH_GUESS * (k - 1)) for k in range(1, self.config.max_tau + 2)]
        curve = tuple(self._verify_ms.get(k, g) for k, g in enumerate(guess, 1))
        return CostModel(VerifyCurve(curve), self._draft_ms)

    # --- decisions --------------------------------------------------------------------------------
    def choose(self) -> int:
        """1. no T(1) yet: a plain step measures it; 2. the cost model's best τ; 3. off: probe now and then."""
        model = self.cost_model()
        if model is None:
            return self._decide(0, "measuring T(1)")
        tau, speedup = model.best_tau(self.alphas, self.config.max_tau, self.offered)
        if tau > 0:
            self._interval = self.config.probe_interval
            self._since_probe = 0
            return self._decide(tau, "best", speedup)
        self._since_probe += 1
        if self._since_probe >= self._interval:
            self._since_probe = 0
            self._interval = min(2 * self._interval, self.config.probe_interval_max)
            return self._decide(self.config.probe_tau, "probe", speedup)
        return self._decide(0, "off", speedup)

    def observe(self, tau: int, drafted: int, accepted: int, draft_ms: float, verify_ms: float) -> None:
        c = self.config
        rows = drafted + 1
        old = self._verify_ms.get(rows)
        self._verify_ms[rows] = verify_ms if old is None else c.decay * old + (1 - c.decay) * verify_ms
        if tau == 0:
            return
        if self.last.get("why") == "probe" and accepted > 0:  # acceptance may be back: look again at once
            self._since_probe, self._interval = self.config.probe_interval, self.config.probe_interval
        for i in range(min(tau, c.max_tau)):
            self._asked[i] = c.decay * self._asked[i] + 1
            self._longer[i] = c.decay * self._longer[i] + (drafted > i)
        if drafted == 0:
            return
        per_token = draft_ms / drafted
        self._draft_ms = per_token if not self._draft_seen else c.decay * self._draft_ms + (1 - c.decay) * per_token
        self._draft_seen = True
        for i in range(min(drafted, c.max_tau, accepted + 1)):  # drafted positions that were reached
            self._tried[i] = c.decay * self._tried[i] + 1
            self._kept[i] = c.decay * self._kept[i] + (i < accepted)
            self._prior_weight[i] *= c.decay

    def _decide(self, tau: int, why: str, speedup: float | None = None) -> int:
        self.last = {"tau": tau, "why": why, "alphas": [round(a, 3) for a in self.alphas[:4]],
                     "offered": [round(o, 3) for o in self.offered[:4]], "draft_ms": round(self._draft_ms, 4),
                     "t1_ms": round(self._verify_ms.get(1, 0.0), 3)}
        if speedup is not None:
            self.last["predicted_speedup"] = round(speedup, 3)
        return tau
