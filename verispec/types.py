"""Small value objects returned to users."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Stats:
    """What one generation cost: token counts and wall time split into prefill and decode."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    target_forwards: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes from the prefill; the rest from decode steps
        return max(self.completion_tokens - 1, 0) / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_tokens_per_s": round(self.decode_tokens_per_s, 3)}


@dataclass
class Output:
    """One finished generation. finish_reason: 'stop' (EOS, a stop token or string) or 'length'."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats = field(default_factory=Stats)
    prompt_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "prompt_tokens": len(self.prompt_token_ids), "stats": self.stats.to_dict()}
