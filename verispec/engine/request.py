"""One request's token bookkeeping: committing any number of tokens at once, and every way to stop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from verispec.config import SamplingParams
from verispec.errors import ContextOverflowError
from verispec.sampling import Sampler
from verispec.sampling.grammar import Grammar
from verispec.types import Stats, TokenLogprob

# Given the output ids so far, does the text now contain a stop string? (the text layer supplies it)
StopCheck = Callable[[Sequence[int]], bool]


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    capacity: int
    stop_check: StopCheck | None = None
    grammar: Grammar | None = None  # params.response_format compiled (Grammars.compile)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id, when params.logprobs asks
    finish_reason: str | None = None
    stats: Stats = field(init=False)
    sampler: Sampler = field(init=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ContextOverflowError("the prompt is empty: it must have at least one token")
        if len(self.prompt_ids) >= self.capacity:
            raise ContextOverflowError(
                f"the prompt has {len(self.prompt_ids)} tokens; the context holds {self.capacity}, "
                f"so the prompt must have at most {self.capacity - 1}"
            )
        self.stats = Stats(prompt_tokens=len(self.prompt_ids))
        self.sampler = Sampler(self.params, self.prompt_ids, self.stop_ids, self.grammar)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_id(self) -> int:
        """The last token of prompt + output: the cycle's pending token, not yet in the cache."""
        return (self.output_ids or self.prompt_ids)[-1]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end the request when emitted (EOS unless ignore_eos, and stop_token_ids)."""
        eos = frozenset() if self.params.ignore_eos else self.eos_ids
        return eos | frozenset(self.params.stop_token_ids)

    def commit(self, token_ids: Sequence[int]) -> int:
        """Append tokens in order until one finishes the request; returns how many were kept.

        A stop id ends the request and is not kept; a stop string keeps the token that completed it
        (the text layer cuts the text), and so does the token that completes the response format;
        max_tokens and the context limit end with 'length'.
        """
        kept = 0
        for token in token_ids:
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            self.output_ids.append(int(token))
            kept += 1
            if self.grammar is not None:
                self.grammar.commit(int(token))
            if self.stop_check is not None and self.stop_check(self.output_ids) or (
                    self.grammar is not None and self.grammar.stopped):
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.params.max_tokens or self.length >= self.capacity:
                self.finish_reason = "length"
            if self.finished:
                break
        return kept
