"""The user-facing facade: load a model by name or path, generate from text, ids or chat messages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from verispec import hub
from verispec.config import MAX_SEED, RuntimeConfig, SamplingParams
from verispec.drafters import DraftModelDrafter, Drafter, NgramDrafter, SuffixDrafter
from verispec.drafters.base import feature_layers
from verispec.drafters.eagle import EagleDrafter
from verispec.drafters.suffix import BUDGET, History
from verispec.drafters.select import TREE, parse_drafter
from verispec.engine.calibrate import (Calibration, after_a_forward, calibration_path, drafter_costs_ms,
                                       load_calibration, overhead_ms, save_calibration, verify_curve_ms)
from verispec.engine.controller import Controller
from verispec.engine.generate import Engine, Sequence, step
from verispec.engine.load import BatchPlanner
from verispec.engine.request import Request
from verispec.engine.scheduler import Audit, Scheduler
from verispec.eagle.head import Head, builtin_head, tokenizer_hash
from verispec.eagle.head import load as load_head
from verispec.engine.trace import TraceWriter
from verispec.errors import InvalidInputError, TokenizerMismatchError
from verispec.model import native
from verispec.model.load import load_model, resolve_device
from verispec.model.transformer import Transformer
from verispec.sampling.grammar import Grammars
from verispec.text import Detokenizer, Prompt, StopStrings, check_same_tokenizer, encode, eos_ids, load_tokenizer
from verispec.types import Output

CALIBRATION_TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
                    "single step. To be or not to be, that is the question. ")
# a verify forward carries the pending token plus the drafts: at most 16 rows, one kernel row group
MAX_DRAFT_TOKENS = 15
AUTO = "auto"


def check_num_draft_tokens(value: int | str) -> None:
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DRAFT_TOKENS:
        raise InvalidInputError(f"num_draft_tokens={value!r} is not allowed: use 'auto' or an integer in "
                                f"[1, {MAX_DRAFT_TOKENS}]")


class LLM:
    """A target model with its tokenizer, ready to generate.

    >>> llm = LLM("smollm2-135m-instruct")
    >>> llm.generate([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32)).text

    suffix_global (drafter 'suffix'): keep a global tree over past responses, shared by every
    request of this LLM and its scheduler, of at most suffix_budget tokens (oldest responses
    evicted first); False gives each request only its own prompt and output.
    """

    def __init__(self, model: str = hub.DEFAULT_MODEL, runtime: RuntimeConfig | None = None, *,
                 drafter: str | None = None, num_draft_tokens: int | str = AUTO, suffix_global: bool = True,
                 suffix_budget: int = BUDGET) -> None:
        runtime = runtime or RuntimeConfig()
        check_num_draft_tokens(num_draft_tokens)
        if not isinstance(suffix_global, bool):
            raise InvalidInputError(f"suffix_global={suffix_global!r} is not allowed: it must be True or False")
        History(suffix_budget)  # a bad budget fails before any model loads
        self.suffix_global, self.suffix_budget = suffix_global, suffix_budget
        parse_drafter(drafter)  # a bad name fails before any model loads
        if runtime.threads:
            torch.set_num_threads(runtime.threads)
        self.runtime = runtime
        self.source = hub.resolve(model)
        self.tokenizer = load_tokenizer(self.source, hub.cache_dir())
        self.target = load_model(self.source, runtime.max_context, resolve_device(runtime.device), runtime.backend,
                                 runtime.activations)
        if self.target.backend_name == "native" and runtime.threads:  # the backend took torch's count once
            native.set_threads(runtime.threads)
        self.eos_ids = eos_ids(self.tokenizer, self.source)
        self.grammars = Grammars(self.tokenizer, self.target.config.vocab_size)
        self.drafter_name = drafter or "none"
        self.engine = Engine(self.target, self.make_drafter(drafter))
        self.use_tau(num_draft_tokens)

    def use_tau(self, num_draft_tokens: int | str) -> None:
        """A fixed τ, or 'auto': a controller picks τ every cycle, starting from this machine's
        calibration when `calibrate` stored one."""
        check_num_draft_tokens(num_draft_tokens)
        self.auto = num_draft_tokens == AUTO
        if self.auto:
            self.engine.use(self.engine.drafter, 0, self.new_controller())
        else:
            self.engine.use(self.engine.drafter, int(num_draft_tokens))

    def new_controller(self) -> Controller | None:
        """A controller for one more sequence with τ 'auto' (None with a fixed τ)."""
        if not self.auto:
            return None
        stored = load_calibration(self.calibration_path)
        return Controller(stored.cost_model() if stored is not None else None)

    def scheduler(self, max_batch: int = 8, max_queue: int = 64, audit_rate: float = 0.01) -> Scheduler:
        """Serve many requests at once, batched, on an engine thread (started here) with this target,
        drafter kind and τ (with τ 'auto', a planner caps the batch's τ by the step's goodput);
        audit_rate of the greedy speculative requests are decoded again plainly."""
        drafter = self.engine.drafter
        stored = load_calibration(self.calibration_path) if self.auto else None
        planner = BatchPlanner(stored.cost_model().curve if stored is not None else None) if self.auto else None
        scheduler = Scheduler(self.target, (lambda: drafter.fork()) if drafter is not None else (lambda: None),
                              self.engine.num_draft_tokens, self.new_controller, max_batch, max_queue,
                              audit=Audit(audit_rate), planner=planner)
        scheduler.start()
        return scheduler

    def make_drafter(self, name: str | None) -> Drafter | None:
        """A drafter for this target from its name: 'none', 'ngram', 'suffix' (their '-tree' forms
        propose trees), 'draft:MODEL' or 'eagle[:DIR]'. Each suffix drafter made here has a global tree of its own
        (its forks share it)."""
        kind, draft_model = parse_drafter(name)
        tree = kind.endswith(TREE)
        if kind.startswith("ngram"):
            return NgramDrafter(tree=tree)
        if kind.startswith("suffix"):
            return SuffixDrafter(History(self.suffix_budget) if self.suffix_global else None, tree=tree)
        if kind == "draft":
            return DraftModelDrafter(self._load_draft_model(draft_model))
        if kind.startswith("eagle"):
            return EagleDrafter(self._load_head(draft_model), self.target.max_context, tree=tree)
        return None

    def _load_head(self, folder: str | None) -> Head:
        """An EAGLE-3 head for this target: the one in `folder`, or the default model's built-in one."""
        if folder is None:
            folder = builtin_head()
        embed = self.target.output_weights()[0]
        head = load_head(Path(folder).expanduser(), self.target.config, embed, tokenizer_hash(self.tokenizer))
        if self.target.backend_name == "native":
            head.use_native()
        return head

    def _load_draft_model(self, name: str) -> Transformer:
        source = hub.resolve(name)
        check_same_tokenizer(self.tokenizer, load_tokenizer(source, hub.cache_dir()))
        model = load_model(source, self.target.max_context, self.target.device, self.target.backend_name,
                           self.target.activations)
        if model.config.vocab_size != self.target.config.vocab_size:
            raise TokenizerMismatchError(
                f"the draft model {name!r} has {model.config.vocab_size} logits, the target {self.target.config.vocab_size}: "
                "their distributions cannot be compared token by token")
        return model

    @property
    def calibration_path(self) -> Path:
        src = self.source
        # a curve belongs to the backend and activations it was timed with, as much as to the weights
        model_key = f"{(src.folder / (src.gguf_file or '')).resolve()}|{self.target.backend_name}|{self.target.activations}"
        return calibration_path(hub.cache_dir(), model_key, self.drafter_name)

    def calibrate(self, max_k: int = MAX_DRAFT_TOKENS + 1, repeats: int = 5) -> Calibration:
        """Measure T(k) for k = 1..max_k, the engine's overhead per cycle and the drafter's cost per token
        here; store them for later runs."""
        verify_ms = verify_curve_ms(self.target, self.engine.cache, max_k, repeats)
        calibration = Calibration(verify_ms, *self.drafter_costs(self.engine.drafter, repeats), self.overhead_ms())
        save_calibration(self.calibration_path, calibration)
        return calibration

    def drafter_costs(self, drafter: Drafter | None, repeats: int = 5) -> tuple[float, float]:
        """The drafter's costs here in ms, per proposed token and per token taken in before drafting
        (0 without a drafter), each timed right after a target forward, as in a cycle."""
        if drafter is None:
            return 0.0, 0.0
        context = self.encode(CALIBRATION_TEXT * 4)[:128]
        sampler = Request(context, SamplingParams(), self.eos_ids, self.engine.capacity).sampler
        layers = feature_layers(drafter)  # what the target's forward over the context hands an EAGLE head
        features = self.target.features(context[:-1], layers) if layers else None
        try:
            return drafter_costs_ms(drafter, context, sampler, repeats=repeats, features=features,
                                    between=after_a_forward(self.target, self.engine.cache))
        finally:
            self.engine.cache.truncate(0)

    def overhead_ms(self) -> float:
        """The engine's own time per cycle here, outside the target's forward (calibrate.overhead_ms)."""
        return overhead_ms(self.engine, self.encode(CALIBRATION_TEXT * 4)[:128])

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        return encode(self.tokenizer, prompt, self.target.config.vocab_size, chat)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False,
                 speculative: bool = True, trace: TraceWriter | None = None) -> Output:
        """Generate for a string (wrapped in the chat template when chat=True), token ids, or chat messages.

        speculative=False runs plain decoding with the same target (for comparisons); `trace` gets
        one line per cycle. With params.n > 1 the Output is choice 0 and Output.choices holds all n
        (batched, the prompt prefilled once; not traced)."""
        params = params or SamplingParams()
        if isinstance(params, SamplingParams) and params.n > 1:
            return self._choices(prompt, params, chat, speculative)
        request, text = self.prepare(prompt, params, chat)
        self.engine.run(request, speculative, trace)
        return self.output(request, text)

    def _choices(self, prompt: Prompt, params: SamplingParams, chat: bool, speculative: bool) -> Output:
        """params.n choices of one prompt, batched, each with its own cache (sized to the need),
        drafter and controller; the prompt enters the target once and is copied into the others."""
        prepared = [self.prepare(prompt, replace(params, n=1, seed=None if params.seed is None else
                                                 (params.seed + j) % (MAX_SEED + 1)), chat) for j in range(params.n)]
        sequences: list[Sequence] = []
        for j, (request, _) in enumerate(prepared):
            drafter = None if not speculative or self.engine.drafter is None else (
                self.engine.drafter if j == 0 else self.engine.drafter.fork())
            cache = self.target.new_cache(min(self.engine.capacity, len(request.prompt_ids) + params.max_tokens + 1))
            sequences.append(Sequence(request, cache, drafter, self.engine.num_draft_tokens,
                                      self.new_controller() if drafter is not None else None,
                                      monitor=self.engine.monitor, prefix_from=sequences[0] if sequences else None))
        while running := [seq for seq in sequences if not seq.request.finished]:
            step(self.target, running)
        first, *more = [self.output(request, text) for request, text in prepared]
        first.more = more
        return first

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False,
               speculative: bool = True, trace: TraceWriter | None = None) -> Iterator[str | Output]:
        """Like generate, but yields text as cycles commit it, then the Output (whose text is the
        concatenation of the pieces). Text that may still become a stop string or an unfinished
        UTF-8 character is held back until it is certain."""
        if params is not None and params.n > 1:
            raise InvalidInputError(f"n={params.n} cannot be streamed: generate returns every choice", param="n")
        request, text = self.prepare(prompt, params, chat)
        for _ in self.engine.steps(request, speculative, trace):
            piece = text.new(request.output_ids, request.finish_reason)
            if piece:
                yield piece
        yield self.output(request, text)

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False
                ) -> tuple[Request, Detokenizer]:
        """The engine's request for a prompt (stop strings included) and the text side of its output."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidInputError(f"params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.target.config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise InvalidInputError(f"{name} {outside[:5]} are outside the vocabulary [0, {vocab})", param=name)
        prompt_ids = self.encode(prompt, chat)
        stops = StopStrings(self.tokenizer, params.stop) if params.stop else None
        grammar = None if params.response_format is None else self.grammars.compile(params.response_format)
        return (Request(prompt_ids, params, self.eos_ids, self.engine.capacity, stops, grammar=grammar),
                Detokenizer(self.tokenizer, stops))

    @staticmethod
    def output(request: Request, text: Detokenizer) -> Output:
        return Output(text.text(request.output_ids, request.finish_reason), list(request.output_ids),
                      request.finish_reason or "length", request.stats, list(request.prompt_ids),
                      list(request.logprobs) if request.params.logprobs is not None else None)
