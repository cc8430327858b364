"""The OpenAI wire format: request bodies (validated by pydantic), responses, stream chunks, errors.

The sampling fields are derived from SamplingParams, so every engine parameter is a request field
(OpenAI's own plus top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids).
Defaults follow OpenAI where it has one: temperature 1, and max_tokens 16 for completions; chat
completions run to the end of the context unless max_tokens (or max_completion_tokens) is given.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from verispec.config import MAX_CHOICES, SamplingParams
from verispec.errors import InvalidInputError
from verispec.text import ROLES
from verispec.types import Stats, TokenLogprob

OPENAI_DEFAULTS = {"temperature": 1.0}
COMPLETION_MAX_TOKENS = 16

# SamplingParams annotations (as written in config.py) -> what a request may send
_WIRE_TYPES: dict[str, Any] = {
    "int": int, "float": float, "bool": bool, "int | None": int, "str": str,
    "tuple[str, ...]": str | list[str], "tuple[int, ...]": list[int],
    "tuple[tuple[int, float], ...]": dict[str, float],  # logit_bias: OpenAI's {"token id": bias}
    "ResponseFormat | None": dict[str, Any],  # OpenAI's {"type": ...} (ResponseFormat.parse)
}
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar"}  # vLLM's extension


class Body(BaseModel):
    # strict: a string is not a number; unknown fields are refused, so a typo is not silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")


Sampling = create_model(  # every SamplingParams field, None when the client leaves it out
    "Sampling", __base__=Body,
    **{f.name: (_WIRE_TYPES[str(f.type)] | None, None) for f in dataclasses.fields(SamplingParams)},
)


class StreamOptions(Body):
    include_usage: bool = False


class Common(Sampling):  # type: ignore[misc, valid-type]
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt, each sampled on its own")
    user: str | None = None
    return_token_ids: bool = Field(False, description="add each choice's (or chunk's) token ids (an extension)")
    guided_json: dict[str, Any] | None = Field(None, description="a JSON schema the output follows (vLLM's extension)")
    guided_regex: str | None = Field(None, description="a regular expression the whole output matches (an extension)")
    guided_grammar: str | None = Field(None, description="a Lark grammar the output follows (an extension)")


class CompletionRequest(Common):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="one prompt (text or token ids), or a list of them: a choice per prompt")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="candidates per prompt, of which the n with "
                                "the highest log-probability per token are returned (not streamed)")
    echo: bool = Field(False, description="the prompt before the completion, with its tokens' logprobs when asked; "
                                         "max_tokens 0 then scores the prompt alone")
    suffix: None = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False  # chat's switch; how many alternatives is top_logprobs
    top_logprobs: int | None = None
    # what OpenAI's SDKs send and OpenAI documents as no-ops here: accepted, ignored
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


def sampling_params(body: Common, prompt_tokens: int, capacity: int) -> SamplingParams:
    """The request's SamplingParams. An explicit max_tokens that does not fit beside the prompt is an
    error naming both; the default is clamped to the room left."""
    given = {f.name: getattr(body, f.name) for f in dataclasses.fields(SamplingParams)
             if getattr(body, f.name) is not None and f.name != "n"}  # n: the server makes each choice a request
    if "logit_bias" in given:
        try:
            given["logit_bias"] = tuple((int(k), v) for k, v in given["logit_bias"].items())
        except ValueError:
            raise InvalidInputError(f"logit_bias keys {list(given['logit_bias'])[:5]} are not allowed: they must be "
                                    "token ids written as strings, e.g. {\"42\": -100}", param="logit_bias") from None
    renamed: dict[str, str] = {}  # SamplingParams' name -> the field this client used, named in errors
    guided = [name for name in GUIDED if getattr(body, name) is not None]
    if given.get("response_format", {}).get("type") == "text":  # free text: no format at all
        given.pop("response_format")
    if len(guided) + ("response_format" in given) > 1:
        raise InvalidInputError(f"{' and '.join(guided + ['response_format'][: 'response_format' in given])} are "
                                "given together: ask for one format", param=guided[-1])
    for name in guided:
        kind = GUIDED[name]
        spec = {"name": name, "schema": body.guided_json} if kind == "json_schema" else getattr(body, name)
        given["response_format"], renamed["response_format"] = {"type": kind, kind: spec}, name
    if isinstance(body, ChatRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidInputError(f"top_logprobs={body.top_logprobs} is not allowed without logprobs: true",
                                    param="top_logprobs")
        given.pop("logprobs")
        if body.logprobs:
            given["logprobs"], renamed["logprobs"] = body.top_logprobs or 0, "top_logprobs"
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        given["max_tokens"], renamed["max_tokens"] = body.max_completion_tokens, "max_completion_tokens"
    name = renamed.get("max_tokens", "max_tokens")
    room = capacity - prompt_tokens
    if "max_tokens" in given and isinstance(given["max_tokens"], int) and given["max_tokens"] > room >= 1:
        raise InvalidInputError(
            f"{name}={given['max_tokens']} is not allowed: the prompt has {prompt_tokens} tokens and the context "
            f"holds {capacity}, so at most {room} can be generated", param=name)
    default = COMPLETION_MAX_TOKENS if isinstance(body, CompletionRequest) else room
    try:
        return SamplingParams(**{**OPENAI_DEFAULTS, "max_tokens": max(1, min(default, room)), **given})
    except InvalidInputError as e:
        if e.param not in renamed:
            raise
        raise InvalidInputError(str(e).replace(f"{e.param}=", f"{renamed[e.param]}=", 1), param=renamed[e.param]) from None


# --- responses ----------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, stats: Stats, taus: list[int]) -> dict[str, Any]:
    """OpenAI's usage, plus this request's speculation (usage.speculation)."""
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "speculation": {
            "cycles": stats.cycles, "drafts": stats.drafts, "drafted": stats.drafted, "accepted": stats.accepted,
            "acceptance_rate": round(stats.acceptance_rate, 4),
            "mean_accepted_length": round(stats.mean_accepted_length, 4),
            "tokens_per_cycle": round(stats.tokens_per_cycle, 4),
            "per_position_acceptance": [round(a, 4) for a in stats.per_position_acceptance],
            "conditional_acceptance": [round(a, 4) for a in stats.conditional_acceptance],
            "mean_tau": round(sum(taus) / len(taus), 3) if taus else 0.0,
        },
    }


def total_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """One usage for several choices: the counts summed, `speculation` a list with one per choice
    (one choice's usage is its own)."""
    if len(usages) == 1:
        return usages[0]
    out: dict[str, Any] = {k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    out["speculation"] = [u.get("speculation") for u in usages]
    return out


def choice(chat: bool, text: str, finish_reason: str | None, delta: bool, token_ids: list[int] | None,
           first: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One choice of a response (delta=False) or of a stream chunk (delta=True)."""
    out: dict[str, Any] = {"index": 0}
    if not chat:
        out["text"] = text
    elif delta:
        out["delta"] = ({"role": "assistant", "content": text} if first else {"content": text} if text else {})
    else:
        out["message"] = {"role": "assistant", "content": text}
    out["logprobs"] = logprobs
    out["finish_reason"] = finish_reason
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out


def logprobs(chat: bool, entries: list[TokenLogprob], texts: list[str], token_text: Callable[[int], str],
             offset: int = 0) -> dict[str, Any]:
    """Tokens' log-probabilities in OpenAI's shape: chat's `content` list (token, logprob, bytes,
    top_logprobs), or completions' parallel lists with each token's offset in the text (from
    `offset`). texts: what each token adds to the text (text.token_texts); an alternative, never
    emitted, is its own token_text."""
    def one(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    if chat:
        return {"content": [{**one(t, e.logprob), "top_logprobs": [one(token_text(i), lp) for i, lp in e.top]}
                            for e, t in zip(entries, texts)]}
    return {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(i): lp for i, lp in e.top} for e in entries],
            "text_offset": list(accumulate([len(t) for t in texts[:-1]], initial=offset)) if texts else []}


def with_prompt(texts: list[str], scored: list[TokenLogprob], token_text: Callable[[int], str],
                completion: dict[str, Any] | None) -> dict[str, Any]:
    """Completions' logprobs with the echoed prompt first (texts: each prompt token's): its first
    token has none (nothing precedes it), then ids[1:] as scored, then the completion's (whose
    offsets already count the prompt)."""
    rest = logprobs(False, scored, texts[1:], token_text, len(texts[0]))
    out = {"tokens": texts[:1] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
           "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}
    if completion is not None:
        for key in out:
            out[key] += completion[key]
    return out


def envelope(chat: bool, rid: str, model: str, created: int, choices: list[dict[str, Any]], chunk: bool,
             usage: dict[str, Any] | None = None, with_usage: bool = True) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    out: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = usage
    return out


def now() -> int:
    return int(time.time())


def error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def endpoint(path: str) -> str:
    """A request path as the request counters label it: one of ENDPOINTS, else 'other'."""
    return path if path in ENDPOINTS else "other"


def too_large(limit: int) -> str:
    """What a 413 says of a body over max_body_bytes."""
    return f"the request body is larger than {limit} bytes (max_body_bytes)"
