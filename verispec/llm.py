"""The user-facing facade: load a model by name or path, generate from text, ids or chat messages."""

from __future__ import annotations

import torch

from verispec import hub
from verispec.config import RuntimeConfig, SamplingParams
from verispec.drafters.select import make_drafter
from verispec.engine.generate import Engine
from verispec.engine.request import Request
from verispec.errors import InvalidInputError
from verispec.model.load import load_model, resolve_device
from verispec.text import Prompt, StopStrings, encode, eos_ids, load_tokenizer
from verispec.types import Output

# a verify forward carries the pending token plus the drafts: at most 16 rows, one kernel row group
MAX_DRAFT_TOKENS = 15


class LLM:
    """A target model with its tokenizer, ready to generate.

    >>> llm = LLM("smollm2-135m-instruct")
    >>> llm.generate([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32)).text
    """

    def __init__(self, model: str = hub.DEFAULT_MODEL, runtime: RuntimeConfig | None = None, *,
                 drafter: str | None = None, num_draft_tokens: int = 4) -> None:
        runtime = runtime or RuntimeConfig()
        if not isinstance(num_draft_tokens, int) or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidInputError(
                f"num_draft_tokens={num_draft_tokens!r} is not allowed: it must be an integer in [1, {MAX_DRAFT_TOKENS}]"
            )
        chosen = make_drafter(drafter)
        if runtime.threads:
            torch.set_num_threads(runtime.threads)
        self.source = hub.resolve(model)
        self.tokenizer = load_tokenizer(self.source, hub.cache_dir())
        self.target = load_model(self.source, runtime.max_context, resolve_device(runtime.device))
        self.eos_ids = eos_ids(self.tokenizer, self.source)
        self.engine = Engine(self.target, chosen, num_draft_tokens)

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        return encode(self.tokenizer, prompt, self.target.config.vocab_size, chat)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False,
                 speculative: bool = True) -> Output:
        """Generate for a string (wrapped in the chat template when chat=True), token ids, or chat messages.

        speculative=False runs plain decoding with the same target (for comparisons)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidInputError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt_ids = self.encode(prompt, chat)
        stops = StopStrings(self.tokenizer, params.stop) if params.stop else None
        request = Request(prompt_ids, params, self.eos_ids, self.engine.capacity, stops)
        stats = self.engine.run(request, speculative)
        text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        if stops is not None and request.finish_reason == "stop":
            text = stops.cut(text)
        return Output(text, list(request.output_ids), request.finish_reason or "length", stats, prompt_ids)
