"""Frozen, validated configuration: the single source for the API, the CLI and the server."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from verispec.errors import InvalidInputError

# Temperatures below this are greedy, as in vLLM: logits / 1e-40 overflow float32 and give NaN.
GREEDY_BELOW = 1e-5
# Seeds seed torch's CPU generator, a Mersenne Twister that keeps only 32 bits: larger seeds would
# collide (7 and 7 + 2**32 sampled alike), so they are refused.
MAX_SEED = 2**32 - 1
# Dividing logits by a smaller repetition penalty (or multiplying by a larger one) overflows float32.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
MAX_CHOICES = 16  # n
LOGPROBS_MODES = ("processed", "raw")


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidInputError(message, param=param)


def _is_text(value: object) -> bool:
    """A non-empty str that is valid Unicode (JSON can carry lone surrogates such as \ud800)."""
    if not isinstance(value, str) or not value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_real(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ResponseFormat:
    """What every output of a request must match (structured output, verispec/sampling/grammar.py):
    kind 'json_schema' (spec: a JSON schema as JSON text), 'regex' (spec: a regular expression the
    whole output matches) or 'grammar' (spec: a Lark grammar, llguidance's dialect)."""

    kind: str
    spec: str

    KINDS = ("json_schema", "regex", "grammar")

    def __post_init__(self) -> None:
        _require(self.kind in self.KINDS, "response_format",
                 f"response_format kind={self.kind!r} is not allowed; allowed: {', '.join(self.KINDS)}")
        _require(_is_text(self.spec), "response_format",
                 f"response_format's {self.kind} must be a non-empty string")

    @classmethod
    def parse(cls, value: ResponseFormat | dict[str, Any] | None) -> ResponseFormat | None:
        """OpenAI's response_format: {"type": "text"} (None: free text), {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}; and verispec's
        {"type": "regex", "regex": "..."} and {"type": "grammar", "grammar": "<lark>"}."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        _require(isinstance(value, dict), "response_format",
                 f"response_format={value!r} is not allowed: it must be an object with a 'type'")
        kind = value.get("type")
        allowed = ("text", "json_object") + cls.KINDS
        _require(kind in allowed, "response_format",
                 f"response_format.type={kind!r} is not allowed; allowed: {', '.join(allowed)}")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_schema", '{"type": "object"}')
        if kind == "json_schema":
            spec = value.get("json_schema")
            _require(isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict), "response_format",
                     "response_format.json_schema must be an object {\"name\": ..., \"schema\": {...}}")
            return cls(kind, json.dumps(spec.get("schema", {})))
        _require(isinstance(value.get(kind), str), "response_format",
                 f"response_format.{kind} must be a string, got {type(value.get(kind)).__name__}")
        return cls(kind, value[kind])


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens and when it stops.

    temperature 0 (or below GREEDY_BELOW) means greedy. top_k 0 and top_p 1 and min_p 0 switch
    those filters off. seed: 0..MAX_SEED.
    Penalties follow vLLM and OpenAI: repetition_penalty (1 = off) divides positive logits and
    multiplies negative ones of every token seen in the prompt or the output; frequency_penalty and
    presence_penalty (0 = off) subtract count * f + (count > 0) * p for tokens of the output.
    suffix_global (the suffix drafter): False keeps this request out of the global tree over past
    responses, so that it neither reads other requests' outputs nor adds its own (drafts only:
    outputs never depend on it).
    logit_bias: (token id, bias) pairs, each bias in [-100, 100] added to that token's logit before
    anything else (OpenAI's; -100 all but bans a token, +100 all but forces it).
    logprobs: None, or 0..MAX_LOGPROBS: each emitted token's log-probability under the target, with
    that many likeliest alternatives. logprobs_mode "processed" (the default) reports the
    distribution the token is drawn from (penalties, temperature, top-k/top-p/min-p applied; when
    greedy, the softmax of the penalized logits at temperature 1); "raw", the model's own
    log-softmax. Both come from the target's verify rows, so speculation reports what plain decoding does.
    response_format: a ResponseFormat, or OpenAI's dict for one (ResponseFormat.parse): every output
    token is drawn from the target's distribution restricted to what the format allows, and the
    request stops when the format is complete.
    n: choices of the prompt (1..MAX_CHOICES), each sampled on its own (choice j of a seeded request
    with seed + j, so it equals that request alone), the prompt prefilled once for all.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    suffix_global: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    logprobs_mode: str = "processed"
    response_format: ResponseFormat | None = None
    n: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "response_format", ResponseFormat.parse(self.response_format))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple(tuple(pair) for pair in self.logit_bias))
        _require(
            isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
            "max_tokens", f"max_tokens={self.max_tokens!r} is not allowed: it must be an integer >= 1",
        )
        _require(
            _is_real(self.temperature) and self.temperature >= 0,
            "temperature", f"temperature={self.temperature!r} is not allowed: it must be a finite number >= 0 (0 means greedy)",
        )
        _require(
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
            "top_k", f"top_k={self.top_k!r} is not allowed: it must be an integer >= 0 (0 means off)",
        )
        _require(
            _is_real(self.top_p) and 0 < self.top_p <= 1,
            "top_p", f"top_p={self.top_p!r} is not allowed: it must be in (0, 1] (1 means off)",
        )
        _require(
            _is_real(self.min_p) and 0 <= self.min_p < 1,
            "min_p", f"min_p={self.min_p!r} is not allowed: it must be in [0, 1) (0 means off)",
        )
        _require(
            self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                  and 0 <= self.seed <= MAX_SEED),
            "seed", f"seed={self.seed!r} is not allowed: it must be an integer in [0, {MAX_SEED}] (2**32 - 1) or None",
        )
        _require(
            all(_is_text(s) for s in self.stop),
            "stop", f"stop={self.stop!r} is not allowed: stop strings must be non-empty, valid Unicode strings",
        )
        _require(
            all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", f"stop_token_ids={self.stop_token_ids!r} is not allowed: they must be token ids >= 0",
        )
        _require(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens", f"min_tokens={self.min_tokens!r} is not allowed: it must be an integer in [0, max_tokens={self.max_tokens}]",
        )
        low, high = REPETITION_PENALTY_RANGE
        _require(
            _is_real(self.repetition_penalty) and low <= self.repetition_penalty <= high,
            "repetition_penalty", f"repetition_penalty={self.repetition_penalty!r} is not allowed: it must be in "
                                  f"[{low}, {high}] (1 means off)",
        )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _require(_is_real(value) and -2 <= value <= 2, name,
                     f"{name}={value!r} is not allowed: it must be in [-2, 2] (0 means off)")
        _require(isinstance(self.suffix_global, bool), "suffix_global",
                 f"suffix_global={self.suffix_global!r} is not allowed: it must be true or false")
        _require(
            all(len(pair) == 2 and isinstance(pair[0], int) and not isinstance(pair[0], bool) and pair[0] >= 0
                and _is_real(pair[1]) and -100 <= pair[1] <= 100 for pair in self.logit_bias),
            "logit_bias", f"logit_bias={dict(self.logit_bias) if all(len(p) == 2 for p in self.logit_bias) else self.logit_bias!r} "
                          "is not allowed: it maps token ids >= 0 to biases in [-100, 100]",
        )
        _require(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                           and 0 <= self.logprobs <= MAX_LOGPROBS),
                 "logprobs", f"logprobs={self.logprobs!r} is not allowed: it must be an integer in [0, {MAX_LOGPROBS}] or None")
        _require(self.logprobs_mode in LOGPROBS_MODES, "logprobs_mode",
                 f"logprobs_mode={self.logprobs_mode!r} is not allowed; allowed: {', '.join(LOGPROBS_MODES)}")
        _require(isinstance(self.n, int) and not isinstance(self.n, bool) and 1 <= self.n <= MAX_CHOICES, "n",
                 f"n={self.n!r} is not allowed: it must be an integer in [1, {MAX_CHOICES}]")
        _require(self.response_format is None or self.min_tokens == 0, "min_tokens",
                 f"min_tokens={self.min_tokens} is not allowed with a response_format: the format decides where the "
                 "output ends")
        _require(self.response_format is None or not self.ignore_eos, "ignore_eos",
                 "ignore_eos=True is not allowed with a response_format: the format decides where the output ends")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how big the runtime is: the device, threads (of the native kernels' pool, torch then
    keeping one for sampling so the two never compete for cores; of torch with the torch backend),
    the KV cache's capacity in tokens, the backend that runs the forward ('native': the weights as in
    the file and C++ kernels, the CPU default; 'torch': fp32 torch ops, the reference and CUDA; None:
    native where it can run) and the native backend's activations ('exact' fp32, or 'int8':
    llama.cpp's numerics, faster, not bit-equal to exact)."""

    device: str = "auto"
    threads: int | None = None
    max_context: int | None = None
    backend: str | None = None
    activations: str = "exact"

    def __post_init__(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device", f"device={self.device!r} is not allowed: use 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )
        _require(
            self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
            "threads", f"threads={self.threads!r} is not allowed: it must be an integer >= 1 or None",
        )
        _require(
            self.max_context is None or (isinstance(self.max_context, int) and self.max_context >= 16),
            "max_context", f"max_context={self.max_context!r} is not allowed: it must be an integer >= 16 or None (the model's own)",
        )
        _require(self.backend in (None, "native", "torch"), "backend",
                 f"backend={self.backend!r} is not allowed: use 'native', 'torch' or None (native where it can run)")
        _require(self.activations in ("exact", "int8"), "activations",
                 f"activations={self.activations!r} is not allowed: use 'exact' or 'int8'")


@dataclass(frozen=True)
class ServeConfig:
    """The OpenAI-compatible server: where it listens, how many requests it runs at once (batched)
    and queues, the API key it demands (None: none), the largest request body it reads, how long
    a shutdown waits for open requests before it ends them with an error, and the share of greedy
    speculative requests decoded again plainly to check they are exact (engine/scheduler.py Audit)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrency: int = 8
    max_queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    served_model_name: str | None = None
    shutdown_timeout: float = 30.0
    audit_rate: float = 0.01

    def __post_init__(self) -> None:
        _require(isinstance(self.port, int) and 0 <= self.port <= 65535, "port",
                 f"port={self.port!r} is not allowed: it must be an integer in [0, 65535] (0: any free port)")
        for name in ("max_concurrency", "max_queue", "max_body_bytes"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                     f"{name}={value!r} is not allowed: it must be an integer >= 1")
        _require(_is_real(self.audit_rate) and 0 <= self.audit_rate <= 1, "audit_rate",
                 f"audit_rate={self.audit_rate!r} is not allowed: it must be a number in [0, 1]")
        _require(_is_real(self.shutdown_timeout) and self.shutdown_timeout >= 0, "shutdown_timeout",
                 f"shutdown_timeout={self.shutdown_timeout!r} is not allowed: it must be a number of seconds >= 0")
        _require(self.api_key is None or (isinstance(self.api_key, str) and self.api_key != ""), "api_key",
                 "api_key='' is not allowed: give a non-empty key, or none for an open server")


@dataclass(frozen=True)
class ReplicaConfig:
    """`verispec serve --replicas N` (verispec/server/replicas.py): N engine replicas on Ray Serve
    behind one OpenAI-compatible ingress; 0 is the single server, without Ray. With max_replicas
    above min_replicas Ray Serve scales between them on the requests each replica holds (queue
    depth), starting from replicas. ray_address joins a running cluster (`ray start --head`
    elsewhere); None starts a local Ray sized for this machine. A replica sends a stream in batches
    at most every stream_interval_ms after its first token (each crossing costs CPU the engines
    could use; Ray Serve LLM's stream batching does the same, also at 50 ms); 0 sends each chunk as
    it comes."""

    replicas: int = 0
    min_replicas: int | None = None
    max_replicas: int | None = None
    ray_address: str | None = None
    stream_interval_ms: float = 50.0

    def __post_init__(self) -> None:
        for name in ("replicas", "min_replicas", "max_replicas"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0), name,
                     f"{name}={value!r} is not allowed: it must be an integer >= 0")
        low, high = self.bounds
        _require(self.replicas == 0 or 1 <= low <= self.replicas <= high, "replicas",
                 f"min_replicas={low}, replicas={self.replicas}, max_replicas={high} are not allowed: they must "
                 "satisfy 1 <= min_replicas <= replicas <= max_replicas")
        _require(_is_real(self.stream_interval_ms) and self.stream_interval_ms >= 0, "stream_interval_ms",
                 f"stream_interval_ms={self.stream_interval_ms!r} is not allowed: it must be a number of "
                 "milliseconds >= 0")
        _require(self.replicas > 0 or (self.min_replicas is None and self.max_replicas is None
                                       and self.ray_address is None), "replicas",
                 "min_replicas, max_replicas and ray_address need replicas >= 1 (0 serves without Ray)")

    @property
    def bounds(self) -> tuple[int, int]:
        """(min_replicas, max_replicas), each defaulting to replicas: a fixed count."""
        return (self.replicas if self.min_replicas is None else self.min_replicas,
                self.replicas if self.max_replicas is None else self.max_replicas)


@dataclass(frozen=True)
class TrainConfig:
    """How `verispec train-drafter` trains an EAGLE-3 head (verispec/eagle/train.py)."""

    draft_vocab: int = 8192
    unroll: int = 5  # training-time-test steps
    decay: float = 0.8  # step j's loss weight is decay ** j
    lr: float = 5e-4
    batch_tokens: int = 2048  # positions per optimizer step
    minutes: float = 60.0  # the budget of training, data making aside
    held_out: float = 0.1  # the share of examples kept out for acceptance
    chain: int = 4  # held-out acceptance is the mean accepted length of chains this long
    evaluate_every_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("draft_vocab", 2), ("unroll", 1), ("batch_tokens", 1), ("chain", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(f"{name}={value!r} is not allowed: an integer >= {low}", param=name)
        for name, low, high in (("decay", 0.0, 1.0), ("held_out", 0.0, 0.9)):
            if not low < getattr(self, name) <= high:
                raise InvalidInputError(f"{name}={getattr(self, name)!r} is not allowed: in ({low}, {high}]", param=name)
        for name in ("lr", "minutes", "evaluate_every_s"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name}={getattr(self, name)!r} is not allowed: a number > 0", param=name)
