"""The text side: tokenizers and chat templates (transformers), prompts, stop strings."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from verispec.errors import InvalidInputError, ModelLoadError, TokenizerMismatchError
from verispec.model.load import ModelSource

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]
ROLES = ("system", "user", "assistant", "tool")


def load_tokenizer(source: ModelSource, cache_root: Path) -> Any:
    """AutoTokenizer for a folder or a .gguf file; a GGUF's tokenizer is converted once, then cached."""
    from transformers import AutoTokenizer

    if source.gguf_file is None:
        try:
            return AutoTokenizer.from_pretrained(source.folder)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{source.folder}: no usable tokenizer files: {e}") from None
    path = source.folder / source.gguf_file
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_root / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    except Exception as e:  # transformers raises many kinds on a GGUF without a usable vocabulary
        raise ModelLoadError(f"{path}: cannot build a tokenizer from its metadata: {e}") from None
    try:
        tokenizer.save_pretrained(cached)
    except OSError:
        pass  # a read-only cache only costs the conversion next time
    return tokenizer


def eos_ids(tokenizer: Any, source: ModelSource) -> frozenset[int]:
    """EOS ids: the tokenizer's, plus generation_config.json's in a Hugging Face folder."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = source.folder / "generation_config.json"
    if source.gguf_file is None and config.exists():
        import json

        eos = json.loads(config.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return frozenset(ids)


def encode(tokenizer: Any, prompt: Prompt, vocab_size: int, chat: bool = False) -> list[int]:
    """A string (optionally wrapped in the chat template), token ids, or chat messages -> token ids."""
    if isinstance(prompt, str):
        _check_unicode(prompt, "the prompt", "prompt")
        if chat:
            return encode(tokenizer, [{"role": "user", "content": prompt}], vocab_size)
        return list(tokenizer(prompt)["input_ids"])
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        return _chat(tokenizer, items)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        bad = [t for t in items if not 0 <= t < vocab_size]
        if bad:
            raise InvalidInputError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        return items
    raise InvalidInputError("prompt must be a string, a list of token ids, or a list of chat messages "
                            "({'role': ..., 'content': ...})")


def _chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise InvalidInputError(f"messages[{i}].role={m.get('role')!r} is not allowed; allowed: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise InvalidInputError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")
        _check_unicode(m["content"], f"messages[{i}].content", f"messages.{i}.content")
    if not tokenizer.chat_template:
        raise InvalidInputError("this model has no chat template; pass a plain prompt instead of chat messages")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _check_unicode(text: str, name: str, param: str) -> None:
    """JSON can carry lone surrogates (\\ud800), which are no text a tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"{name} is not valid Unicode: {text[e.start:e.end]!r} at character {e.start} is a "
                                "lone surrogate; send UTF-8 text", param=param) from None


class StopStrings:
    """Detects stop strings in the decoded output, also across steps and inside multi-character tokens."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        # a stop string of c characters lies within its last c tokens; a few more cover partial UTF-8
        self.window = max(len(s) for s in self.stops) + 4

    def __call__(self, output_ids: Sequence[int]) -> bool:
        tail = self.tokenizer.decode(list(output_ids[-self.window:]), skip_special_tokens=True)
        return any(s in tail for s in self.stops)

    def cut(self, text: str) -> str:
        """The text before the first stop string."""
        at = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
        return text[:at]


def check_same_tokenizer(target: Any, draft: Any) -> None:
    """A draft model must share the target's tokenizer; else its ids mean other text and acceptance
    silently collapses. Compares the vocabulary size, the special tokens and every token string."""
    if len(target) != len(draft):
        raise TokenizerMismatchError(f"the draft tokenizer has {len(draft)} tokens, the target's {len(target)}: "
                                     "a draft model must use the target's tokenizer")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        t, d = getattr(target, name, None), getattr(draft, name, None)
        if t != d:
            raise TokenizerMismatchError(f"special token {name} differs: target {t!r}, draft {d!r}")
    t_vocab, d_vocab = target.get_vocab(), draft.get_vocab()
    if t_vocab != d_vocab:
        by_id = {i: s for s, i in d_vocab.items()}
        token, i = next(((s, i) for s, i in sorted(t_vocab.items(), key=lambda x: x[1]) if by_id.get(i) != s),
                        (None, None))
        raise TokenizerMismatchError(f"token {i} is {token!r} for the target but {by_id.get(i)!r} for the draft "
                                     "model: a draft model must use the target's tokenizer")


def token_texts(tokenizer: Any, ids: Sequence[int], before: Sequence[int] = ()) -> list[str]:
    """What each of ids adds to the decoded text after `before`: differences of decoded prefixes, so
    a SentencePiece token keeps its leading space, a special token adds nothing, and the texts
    concatenate to the decoded whole (quadratic in the length: for logprobs, not for every token)."""
    context, done, out = list(before), tokenizer.decode(list(before), skip_special_tokens=True), []
    for token in ids:
        context.append(token)
        now = tokenizer.decode(context, skip_special_tokens=True)
        out.append(now[len(done):])
        done = now
    return out


class Detokenizer:
    """A request's output as text: whole (`text`), or as the pieces that are certain so far (`new`).

    A piece holds back text that may still become a stop string, and an unfinished UTF-8 character;
    the pieces concatenate to `text`.
    """

    def __init__(self, tokenizer: Any, stops: StopStrings | None) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self._hold = max(len(s) for s in stops.stops) - 1 if stops else 0
        self._sent = 0

    def text(self, output_ids: Sequence[int], finish_reason: str | None) -> str:
        text = self.tokenizer.decode(list(output_ids), skip_special_tokens=True)
        return self.stops.cut(text) if self.stops is not None and finish_reason == "stop" else text

    def new(self, output_ids: Sequence[int], finish_reason: str | None) -> str:
        """The text that became certain since the last call (all the rest once finished)."""
        text = self.text(output_ids, finish_reason)
        end = len(text) if finish_reason is not None else len(text.rstrip("\ufffd")) - self._hold
        if end <= self._sent:
            return ""
        piece, self._sent = text[self._sent: end], end
        return piece
