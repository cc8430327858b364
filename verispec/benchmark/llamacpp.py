"""llama.cpp (llama-cpp-python) as a baseline on the same GGUF and the same token ids: its plain greedy
decoding, its verify curve T(k) and its prefill, timed the way verispec's own are. An optional extra,
built from source with this machine's compiler:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e '.[llamacpp]'
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from verispec.engine.calibrate import paired_times_ms
from verispec.errors import InvalidInputError
from verispec.model.load import ModelSource

INSTALL = "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install 'verispec[llamacpp]'"


def available() -> bool:
    try:
        require()
    except InvalidInputError:
        return False
    return True


def require() -> ModuleType:
    """The llama_cpp module, or an error naming the extra that brings it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise InvalidInputError(f"the llama.cpp baseline needs llama-cpp-python, which is not installed ({e}): "
                                f"install the extra, built from source: {INSTALL}") from e
    return llama_cpp


class LlamaCpp:
    """One llama_cpp.Llama on a GGUF, fed our tokenizer's ids (the same file, so the same vocabulary).

    Every measurement goes through `Llama.eval`, which first drops the KV cache past `n_tokens`:
    setting `n_tokens` back is llama.cpp's rollback, as `KVCache.truncate` is ours."""

    def __init__(self, source: ModelSource, threads: int, n_ctx: int = 2048, n_batch: int = 512) -> None:
        if source.gguf_file is None:
            raise InvalidInputError(f"the llama.cpp baseline needs a .gguf model; {str(source.folder)!r} is a "
                                    "Hugging Face folder")
        llama_cpp = require()
        # logits_all: a verify forward needs every row's logits, as ours returns them; prefill asks
        # for the last row only (_eval's last_only), so it does not pay an LM head per prompt token
        self.llama: Any = llama_cpp.Llama(model_path=str(source.folder / source.gguf_file), n_threads=threads,
                                          n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_batch,
                                          logits_all=True, verbose=False)
        self.threads = threads
        self.n_ctx = n_ctx

    def _eval(self, token_ids: Sequence[int], start: int, last_only: bool = False) -> None:
        """Evaluate token_ids at positions start.. (the cache rolled back to start first)."""
        if start + len(token_ids) > self.n_ctx:
            raise InvalidInputError(f"{start} cached + {len(token_ids)} new tokens exceed llama.cpp's context of "
                                    f"{self.n_ctx} tokens")
        llama = self.llama
        llama.n_tokens = start
        if not last_only:
            llama.eval(token_ids)
            return
        # Llama.eval marks one output row (the last) and copies no logits when _logits_all is off
        llama._logits_all = False
        try:
            llama.eval(token_ids)
        finally:
            llama._logits_all = True

    def warm_up(self, seconds: float = 2.0) -> None:
        """Evaluate for `seconds`, as calibrate.warm_up does for ours: a fresh model's first evals
        page in the mapped weights and start the thread pool."""
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            self._eval([0] * 68, 0)

    def decode(self, prompt_ids: Sequence[int], tokens: int) -> tuple[float, list[int]]:
        """Greedy: (decode tok/s, the `tokens` new ids). As verispec's Stats.decode_tokens_per_s: the
        prompt but its last token is prefilled untimed, then `tokens` one-token evals, each the argmax
        of the previous row's logits; no stop at EOS."""
        if not prompt_ids or len(prompt_ids) + tokens > self.n_ctx:
            raise InvalidInputError(f"a prompt of {len(prompt_ids)} tokens + {tokens} new ones does not fit "
                                    f"llama.cpp's context of {self.n_ctx} tokens (the prompt must not be empty)")
        self._eval(prompt_ids[:-1], 0, last_only=True)
        pending, out = prompt_ids[-1], []
        start = time.perf_counter()
        for _ in range(tokens):
            self.llama.eval([pending])
            pending = int(np.argmax(self.llama.scores[self.llama.n_tokens - 1]))
            out.append(pending)
        elapsed = time.perf_counter() - start
        return tokens / elapsed, out

    def verify_curve_ms(self, max_k: int = 16, context: int = 128, repeats: int = 5) -> tuple[float, ...]:
        """(T(1), ..., T(max_k)) in ms: k tokens in one eval after `context` cached ones, rolled back
        after each, estimated as ours are (calibrate.paired_times_ms, the same zeros as input)."""
        self.warm_up()
        self._eval([0] * context, 0, last_only=True)

        def timed(k: int) -> float:
            start = time.perf_counter()
            self._eval([0] * k, context)
            return (time.perf_counter() - start) * 1e3
        return tuple(paired_times_ms([timed], range(1, max_k + 1), repeats)[0])

    def prefill_s(self, token_ids: Sequence[int], repeats: int = 3) -> float:
        """Seconds to evaluate token_ids into an empty cache (last row's logits only), median of
        `repeats` after one untimed run."""
        times = []
        for r in range(repeats + 1):
            start = time.perf_counter()
            self._eval(token_ids, 0, last_only=True)
            if r > 0:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def close(self) -> None:
        self.llama.close()
