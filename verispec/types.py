"""Small value objects returned to users."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Stats:
    """What one generation cost: token counts, wall times in seconds summed over the request (prefill,
    decode; inside decode the drafter's and the verifying target's share, inside verify the target's
    forward alone), and speculation: cycles,
    drafts (the cycles that drafted), draft positions (`drafted`) and accepted, per position, and the
    draft tokens the target verified (`nodes`: a chain's equal its positions, a tree's exceed its depth)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    forward_s: float = 0.0
    target_forwards: int = 0
    cycles: int = 0
    drafts: int = 0
    drafted: int = 0
    accepted: int = 0
    nodes: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    # position i is tried when it was drafted and drafts 0..i-1 were accepted
    tried_per_position: list[int] = field(default_factory=list)
    # the live losslessness monitor (engine/monitor.py) for this drafter when a sampled request ended:
    # tokens observed so far and their chi-square p-value (None: too few yet, or greedy)
    monitor_tokens: int = 0
    monitor_p_value: float | None = None

    def record_cycle(self, drafted: int, accepted: int, nodes: int | None = None) -> None:
        """drafted and accepted: positions (a tree's depth, its kept path's); nodes: None for a chain."""
        self.cycles += 1
        self.drafts += drafted > 0
        self.drafted += drafted
        self.accepted += accepted
        self.nodes += drafted if nodes is None else nodes
        for counts, n in ((self.drafted_per_position, drafted), (self.accepted_per_position, accepted),
                          (self.tried_per_position, min(drafted, accepted + 1))):
            counts.extend([0] * max(0, drafted - len(counts)))
            for i in range(n):
                counts[i] += 1

    @property
    def conditional_acceptance(self) -> list[float]:
        """α_i: the chance that draft i is accepted given that drafts 0..i-1 were."""
        return [a / t for a, t in zip(self.accepted_per_position, self.tried_per_position) if t]

    @property
    def per_position_acceptance(self) -> list[float]:
        """vLLM's per-position acceptance: the share of drafts whose token i was accepted."""
        return [a / self.drafts for a in self.accepted_per_position] if self.drafts else []

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """vLLM's: 1 + accepted / drafts, over the cycles that drafted (0 when none did)."""
        return 1 + self.accepted / self.drafts if self.drafts else 0.0

    @property
    def mean_nodes(self) -> float:
        """Draft tokens verified per cycle that drafted (a chain's mean length; a tree's mean size)."""
        return self.nodes / self.drafts if self.drafts else 0.0

    @property
    def tokens_per_cycle(self) -> float:
        """Tokens committed per target forward of decoding, over every cycle, plain ones included."""
        return 1 + self.accepted / self.cycles if self.cycles else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 4),
                "mean_nodes": round(self.mean_nodes, 4),
                "tokens_per_cycle": round(self.tokens_per_cycle, 4),
                "per_position_acceptance": [round(a, 4) for a in self.per_position_acceptance],
                "conditional_acceptance": [round(a, 4) for a in self.conditional_acceptance]}


@dataclass(frozen=True)
class TokenLogprob:
    """An emitted token's log-probability under the target, and the likeliest tokens at its row
    (SamplingParams.logprobs of them, best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "logprob": self.logprob, "top": [list(t) for t in self.top]}


@dataclass
class Output:
    """One finished generation. finish_reason: 'stop' (EOS, a stop token or string) or 'length'."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats = field(default_factory=Stats)
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when SamplingParams.logprobs asked
    more: list[Output] = field(default_factory=list)  # choices 1..n-1, when SamplingParams.n > 1

    @property
    def choices(self) -> list[Output]:
        """Every choice, this one (choice 0) first."""
        return [self, *self.more]

    def to_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
               "prompt_tokens": len(self.prompt_token_ids), "stats": self.stats.to_dict()}
        if self.logprobs is not None:
            out["logprobs"] = [t.to_dict() for t in self.logprobs]
        if self.more:
            out["more"] = [choice.to_dict() for choice in self.more]
        return out
