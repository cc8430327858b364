"""Structured output: a format (JSON schema, regular expression, Lark grammar) that every output
token must follow, matched by llguidance.

The grammar moves with committed tokens only. To mask a cycle's rows it consumes the drafts on the
way to each row, reads the row's mask, and rolls them back before it returns, so a rejected draft
leaves no state behind and the next cycle starts from the committed output (the cache rolls back by
a length change; the grammar by never keeping a draft). The sampler applies the masks to the
target's rows and to a draft model's q alike; a proposal is cut at the first draft the grammar
refuses (p = 0 there: verifying it would only spend rows).

llguidance was measured against xgrammar on SmolLM2's vocabulary (docs/server.md): both compute a
JSON-schema mask in microseconds against a 4 ms step; xgrammar needs triton (1 GB) on this platform,
llguidance nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from verispec import tree
from verispec.config import ResponseFormat
from verispec.errors import GrammarError, InvalidInputError

log = logging.getLogger(__name__)

# JSON on one line, laid out as json.dumps does: with free whitespace a small model can pad an
# object with newlines up to max_tokens; a schema's "x-guidance" options override this.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Compiles a request's ResponseFormat into its Grammar, against one tokenizer and vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._hf, self.vocab_size = tokenizer, vocab_size
        self._tokenizer: Any = None  # llguidance's, made on first use (about 0.3 s)
        self._beginnings: list[int] = []  # every id but EOS: what a format's first token must be among
        self._lock = threading.Lock()

    def compile(self, fmt: ResponseFormat) -> Grammar:
        import llguidance

        with self._lock:  # the server compiles on worker threads
            if self._tokenizer is None:
                self._tokenizer = _llg_tokenizer(self._hf, self.vocab_size)
                self._beginnings = sorted(set(range(self.vocab_size)) - set(self._tokenizer.eos_tokens))
        try:
            if fmt.kind == "json_schema":
                text = llguidance.LLMatcher.grammar_from_json_schema(fmt.spec, defaults=JSON_LAYOUT)
            elif fmt.kind == "regex":
                text = llguidance.LLMatcher.grammar_from_regex(fmt.spec)
            else:
                text = llguidance.LLMatcher.grammar_from_lark(fmt.spec)
        except ValueError as e:
            raise InvalidInputError(f"response_format: the {fmt.kind} is not valid: {e}", param="response_format") from None
        problem = llguidance.LLMatcher.validate_grammar(text, self._tokenizer)
        if problem and not problem.startswith("WARNING"):
            raise InvalidInputError(f"response_format: the {fmt.kind} is not valid: {problem}", param="response_format")
        eos = frozenset(self._tokenizer.eos_tokens)
        special = sorted(set(self._hf.all_special_ids) - eos)
        grammar = Grammar(llguidance.LLMatcher(self._tokenizer, text, log_level=0), self.vocab_size, eos, special)
        if grammar.masks((), (), None, 1)[0, self._beginnings].all():
            raise InvalidInputError(f"response_format: no token of this model's vocabulary can begin the {fmt.kind}",
                                    param="response_format")
        return grammar


class Grammar:
    """One request's matcher, positioned after its committed output."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: frozenset[int], special: Sequence[int] = ()) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self.eos_ids = eos_ids  # a row after an EOS draft is never read; llguidance cannot roll EOS back
        self.special = list(special)  # special tokens but EOS (<unk>, <|im_start|>): never part of a format
        self.committed = 0  # output tokens consumed
        self._special_words = _bits(self.special, vocab_size)  # the special tokens' bits, cleared from every mask
        self._eos_words = _bits(eos_ids, vocab_size)

    def fresh(self) -> Grammar:
        """The same grammar at the start of an output (the audit's plain rerun)."""
        matcher = self.matcher.deep_copy()
        matcher.reset()
        return Grammar(matcher, self.vocab_size, self.eos_ids, self.special)

    @property
    def stopped(self) -> bool:
        """The format is complete and allows no more tokens."""
        return self.matcher.is_stopped()

    def commit(self, token: int) -> None:
        """A token the request kept; it was drawn from masked rows, so the grammar allows it."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused committed token {token}: {self.matcher.get_error()}")
        self.committed += 1

    def fit(self, history: Sequence[int], drafts: Sequence[int], parents: Sequence[int] | None) -> list[int]:
        """The draft nodes (1-based) whose whole path the grammar allows after `history` (the
        committed output); a chain keeps a prefix."""
        parents = tree.chain(len(drafts)) if parents is None else parents
        extra = self._enter(history)
        kept, valid = [], [True]  # valid[j]: node j's path is allowed
        for j, parent in enumerate(parents, start=1):
            path = [drafts[n - 1] for n in tree.path(parents, j)]
            valid.append(valid[parent] and self.matcher.validate_tokens(path) == len(path))
            if valid[j]:
                kept.append(j)
        self.matcher.rollback(extra)
        return kept

    def masks(self, history: Sequence[int], drafts: Sequence[int], parents: Sequence[int] | None,
              rows: int) -> torch.Tensor:
        """[rows, V] bool, True where the format refuses the token: row i follows `history` + the
        drafts on the path to node i (a chain's drafts[:i]). A row behind a refused draft cannot be
        reached by the verifier, nor a row after an EOS draft (EOS ends the request); it refuses
        nothing, so that it stays a distribution. Where the grammar could go on but with no token of
        the vocabulary, it allows EOS, so the output ends there."""
        parents = tree.chain(rows - 1) if parents is None else list(parents[: rows - 1])
        words = np.zeros((rows, self._special_words.size), dtype=np.int32)  # llguidance's: bit t % 32 of word t // 32
        extra = self._enter(history)
        stack: list[int] = []  # the draft nodes the matcher holds beyond history
        reachable = [True] * rows
        for j in range(rows):
            path = tree.path(parents, j)
            shared = 0
            while shared < min(len(stack), len(path)) and stack[shared] == path[shared]:
                shared += 1
            self.matcher.rollback(len(stack) - shared)
            del stack[shared:]
            for node in path[shared:]:
                token, above = drafts[node - 1], parents[node - 1]
                if not (reachable[above] and _allowed(words[above], token)) or token in self.eos_ids:
                    reachable[j] = False
                    break
                self.matcher.consume_token(token)
                stack.append(node)
            if reachable[j]:
                self.matcher.unsafe_compute_mask_ptr(words[j].ctypes.data, words[j].nbytes)
            else:
                words[j] = -1
        self.matcher.rollback(len(stack) + extra)
        self._check()
        # on the packed words (a 32nd of the vocabulary), then one unpacking: these rows come right
        # after a forward, with cold caches, where every pass over V costs tens of microseconds
        words &= ~self._special_words
        words[~words.any(axis=1)] |= self._eos_words
        refused = np.unpackbits((~words).view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size]
        return torch.from_numpy(refused.view(np.bool_))

    def _check(self) -> None:
        """llguidance's errors (a limit hit mid-output, a refused token) are sticky and show as an
        empty mask; raise rather than end the output as if the format were complete."""
        if self.matcher.is_error():
            raise GrammarError(f"the response format's matcher failed: {self.matcher.get_error()}")

    def _enter(self, history: Sequence[int]) -> int:
        """Consume history's tokens past the committed output (a draft model's drafts so far);
        returns how many, for the caller to roll back."""
        extra = list(history[self.committed:])
        if extra and not self.matcher.consume_tokens(extra):
            raise GrammarError(f"the grammar refused drafted tokens {extra}: {self.matcher.get_error()}")
        return len(extra)


def _llg_tokenizer(hf: Any, vocab_size: int) -> Any:
    """llguidance's view of the tokenizer: read from the Rust tokenizer where llguidance knows its
    decoder (byte-level BPE, SentencePiece), else from each token's decoded bytes."""
    import llguidance
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)
    except ValueError as e:
        log.warning("llguidance cannot read this tokenizer (%s): formats match each token's decoded text, which "
                    "can differ from its bytes (SentencePiece spaces, byte-fallback tokens)", e)

    class Vocabulary:
        eos_token_id, bos_token_id = hf.eos_token_id, hf.bos_token_id
        special_token_ids = list(hf.all_special_ids)
        tokens = [hf.decode([i]).encode("utf-8") for i in range(len(hf))]

        def __call__(self, text: str) -> list[int]:
            return hf(text, add_special_tokens=False)["input_ids"]

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=vocab_size)


def _bits(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """ids -> llguidance's packed mask [ceil(V / 32)] int32 with their bits set."""
    bits = np.zeros(-(-vocab_size // 32) * 32, dtype=np.uint8)
    bits[list(ids)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


def _allowed(words: np.ndarray, token: int) -> bool:
    return 0 <= token < words.size * 32 and bool((int(words[token // 32]) >> (token % 32)) & 1)
