"""One decoder for llama, qwen2, qwen3 and gemma3 over a static KV cache; a backend runs its forward.

Backends: "native" (the weights as they lie in the file, C++ kernels, exact or int8 activations; the
CPU default) and "torch" (fp32 weights and torch ops; the reference, and CUDA). Both are row-invariant:
a sequence's logits do not depend on how many rows, or which other sequences, a forward carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from verispec import tree
from verispec.model.cache import KVCache
from verispec.model.config import ModelConfig, RopeScaling
from verispec.model.segment import Segment
from verispec.model.weights import Weight

__all__ = ["Segment", "Transformer"]


class Backend(Protocol):
    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (the embedding row lookup is negligible)."""

    def forward_many(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """Logits per segment (see Transformer.forward_many); writes each segment's keys and values at
        cache.length onwards, leaving the lengths to the caller."""


class Transformer:
    """forward(token_ids, positions, cache) -> logits, with the cache holding every earlier position.

    weights: canonical names (see model/load.py) -> Weight (matrices, as in the file) or fp32 vectors.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, Weight | torch.Tensor], max_context: int,
                 device: torch.device, backend: str = "torch", activations: str = "exact") -> None:
        self.config = config
        self.device = device
        self.max_context = max_context
        global_rope = rope_table(config.rope_theta, config.head_dim, max_context, config.rope_scaling, device)
        local_rope = (rope_table(config.rope_local_theta, config.head_dim, max_context, None, device)
                      if config.rope_local_theta else global_rope)
        rope = {False: global_rope, True: local_rope}
        self.backend_name = backend
        self.activations = activations
        self._output = {name: weights[name] for name in ("embed", "lm_head", "final_norm") if name in weights}
        self._dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.backend: Backend
        if backend == "native":
            from verispec.model.native.backend import NativeBackend

            self.backend = NativeBackend(config, weights, rope, activations)
        else:
            from verispec.model.torch_backend import TorchBackend

            self.backend = TorchBackend(config, weights, rope, device)

    def output_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding [vocab, hidden], LM head [vocab, hidden], final norm [hidden]) in fp32 on the CPU,
        dequantized once: what an EAGLE head shares with its target and trains against."""
        def dense(w: Weight | torch.Tensor) -> torch.Tensor:
            return (w.dequantize() if isinstance(w, Weight) else w).to("cpu", torch.float32)

        if self._dense is None:
            embed = dense(self._output["embed"])
            head = dense(self._output["lm_head"]) if "lm_head" in self._output else embed
            self._dense = embed, head, dense(self._output["final_norm"])
        return self._dense

    def features(self, token_ids: Sequence[int], layers: tuple[int, ...], chunk: int = 256) -> torch.Tensor:
        """The hidden states (Segment.capture) of every position of token_ids, from a prefill of its
        own: [n, len(layers), hidden]."""
        cache = self.new_cache(len(token_ids))
        parts = []
        for start in range(0, len(token_ids), chunk):
            segment = Segment(torch.tensor(list(token_ids[start: start + chunk]), device=self.device), cache, "none",
                              capture=layers)
            self.forward_many([segment])
            parts.append(segment.features.clone())
        return torch.cat(parts)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A cache for `capacity` positions (at most max_context, the default)."""
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, min(capacity or self.max_context, self.max_context),
                       torch.float32, self.device)

    @property
    def weight_bytes_per_token(self) -> int:
        return self.backend.weight_bytes_per_token

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, *,
                last_only: bool = False) -> torch.Tensor:
        """Run n new tokens at `positions` (which must continue the cache) and extend the cache.

        token_ids, positions: [n]. Returns logits [n, vocab] ([1, vocab] when last_only).
        """
        start = cache.length
        n = token_ids.shape[0]
        if n == 0 or int(positions[0]) != start or int(positions[-1]) != start + n - 1:
            raise ValueError(f"positions must continue the cache: expected {start}..{start + n - 1}")
        logits = self.forward_many([Segment(token_ids, cache, "last" if last_only else "all")])[0]
        assert logits is not None
        return logits

    @torch.inference_mode()
    def forward_many(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """One forward over the new tokens of several sequences, each continuing its own cache.

        A sequence's logits are bitwise those of a forward over it alone, so batching never changes an
        output. Returns per segment logits [n, vocab], [1, vocab] ("last") or None ("none").
        """
        for seg in segments:
            seg.cache.reserve(seg.token_ids.shape[0])
            if seg.parents is not None:
                tree.check(seg.parents, seg.token_ids.shape[0] - 1)
        logits = self.backend.forward_many(segments)
        for seg in segments:
            seg.cache.length += seg.token_ids.shape[0]
        cap = self.config.final_logit_softcap
        if cap:
            logits = [None if t is None else torch.tanh(t / cap) * cap for t in logits]
        return logits


def rope_table(theta: float, dim: int, length: int, scaling: RopeScaling | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, dim] in the rotate-half layout, computed as transformers does (float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
