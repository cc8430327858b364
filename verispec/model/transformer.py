"""One readable decoder for llama, qwen2, qwen3 and gemma3, over a static KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from verispec.model import kernels
from verispec.model.cache import KVCache
from verispec.model.config import ModelConfig, RopeScaling


@dataclass
class Layer:
    """One decoder layer's weights, transposed to [in, out] for kernels.linear; QKV and gate/up fused."""

    attn_norm: torch.Tensor
    qkv_t: torch.Tensor  # [hidden, (heads + 2 * kv_heads) * head_dim]
    qkv_bias: torch.Tensor | None
    o_t: torch.Tensor  # [heads * head_dim, hidden]
    mlp_norm: torch.Tensor
    gate_up_t: torch.Tensor  # [hidden, 2 * intermediate]
    down_t: torch.Tensor  # [intermediate, hidden]
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_attn_norm: torch.Tensor | None
    post_mlp_norm: torch.Tensor | None
    sliding: bool


@dataclass
class Segment:
    """One sequence's part of a batched forward: its new tokens continue its cache.

    logits: which rows to return, "all" (verify), "last" (the end of a draft model's feed) or
    "none" (a prefill chunk).
    """

    token_ids: torch.Tensor  # [n]
    cache: KVCache
    logits: Literal["all", "last", "none"] = "all"


class Transformer:
    """forward(token_ids, positions, cache) -> logits, with the cache holding every earlier position.

    Weights come as a dict of canonical names (see model/weights.py) in [out, in] layout.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], max_context: int,
                 device: torch.device) -> None:
        self.config = config
        self.device = device
        self.max_context = max_context
        w = {name: t.to(device=device, dtype=torch.float32) for name, t in weights.items()}
        self.embed = w["embed"]  # [vocab, hidden]
        self.lm_head_t = (w["lm_head"] if "lm_head" in w else self.embed).t().contiguous()  # [hidden, vocab]
        self.final_norm = w["final_norm"]
        self.layers = [self._layer(w, i) for i in range(config.num_layers)]
        global_rope = _rope_table(config.rope_theta, config.head_dim, max_context, config.rope_scaling, device)
        local_rope = (_rope_table(config.rope_local_theta, config.head_dim, max_context, None, device)
                      if config.rope_local_theta else global_rope)
        self._rope = {False: global_rope, True: local_rope}
        self._kinds = set(config.sliding_layers)  # which of global (False) and sliding (True) layers occur

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> Layer:
        c = self.config
        p = f"layers.{i}."

        def opt(name: str) -> torch.Tensor | None:
            return w.get(p + name)

        bias = (torch.cat([w[p + "q_bias"], w[p + "k_bias"], w[p + "v_bias"]]) if c.qkv_bias else None)
        return Layer(
            attn_norm=w[p + "attn_norm"],
            qkv_t=torch.cat([w[p + "q"], w[p + "k"], w[p + "v"]]).t().contiguous(),
            qkv_bias=bias,
            o_t=w[p + "o"].t().contiguous(),
            mlp_norm=w[p + "mlp_norm"],
            gate_up_t=torch.cat([w[p + "gate"], w[p + "up"]]).t().contiguous(),
            down_t=w[p + "down"].t().contiguous(),
            q_norm=opt("q_norm"),
            k_norm=opt("k_norm"),
            post_attn_norm=opt("post_attn_norm"),
            post_mlp_norm=opt("post_mlp_norm"),
            sliding=c.sliding_layers[i],
        )

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, self.max_context, torch.float32, self.device)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (the embedding row lookup is negligible)."""
        per_layer = [t for layer in self.layers for t in (layer.qkv_t, layer.o_t, layer.gate_up_t, layer.down_t)]
        return sum(t.nbytes for t in per_layer) + self.lm_head_t.nbytes

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

        Every linear layer runs once over all rows; attention runs per sequence over its cache. A
        sequence's logits are bitwise those of a forward over it alone (kernels are row-invariant),
        so batching never changes an output. Returns per segment logits [n, vocab], [1, vocab]
        ("last") or None ("none").
        """
        c = self.config
        spans: list[tuple[int, int]] = []  # each segment's rows in the batch, its duplicate included
        ids, positions = [], []
        row = 0
        for seg in segments:
            n = seg.token_ids.shape[0]
            seg.cache.reserve(n)
            pos = torch.arange(seg.cache.length, seg.cache.length + n, device=self.device)
            if n == 1:
                # A single row would take the GEMV path and round differently from a verify row;
                # the duplicate has the same token and position, so it writes the same cache entry.
                ids.append(seg.token_ids.repeat(2))
                pos = pos.repeat(2)
            else:
                ids.append(seg.token_ids)
            positions.append(pos)
            spans.append((row, row + len(pos)))
            row += len(pos)
        pos_all = torch.cat(positions)  # [rows]
        # cos, sin [rows, 1, head_dim] of each RoPE table (global, local), looked up once for all layers
        rope = {sliding: tuple(t[pos_all].unsqueeze(1) for t in self._rope[sliding]) for sliding in self._kinds}
        # per segment and kind of layer (global, sliding), the keys its queries must not see
        group = c.num_heads // c.num_kv_heads
        masks = [{sliding: kernels.attention_masks(pos, group, c.sliding_window if sliding else None)
                  for sliding in self._kinds} for pos in positions]
        x = self.embed[torch.cat(ids)] * c.embed_scale  # [rows, hidden]
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer, i, x, rope[layer.sliding], [m[layer.sliding] for m in masks], segments,
                                    spans)
            x = x + self._mlp(layer, x)
        outputs: list[torch.Tensor] = []
        for seg, (first, _) in zip(segments, spans):
            n = seg.token_ids.shape[0]
            seg.cache.length += n
            if seg.logits == "all":
                outputs.append(x[first: first + n])
            elif seg.logits == "last":
                outputs.append(x[first + n - 1: first + n])
        if not outputs:
            return [None] * len(segments)
        out = kernels.rms_norm(torch.cat(outputs), self.final_norm, c.rms_norm_eps)  # [wanted rows, hidden]
        logits = kernels.linear(out if out.shape[0] > 1 else out.repeat(2, 1), self.lm_head_t)[: out.shape[0]]
        if c.final_logit_softcap:
            logits = torch.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        parts = iter(logits.split([o.shape[0] for o in outputs]))
        return [None if seg.logits == "none" else next(parts) for seg in segments]

    def _attention(self, layer: Layer, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   masks: list[list[tuple[int, torch.Tensor]]], segments: Sequence[Segment],
                   spans: list[tuple[int, int]]) -> torch.Tensor:
        c = self.config
        rows, heads = x.shape[0], c.num_heads
        h = kernels.rms_norm(x, layer.attn_norm, c.rms_norm_eps)
        qkv = kernels.linear(h, layer.qkv_t, layer.qkv_bias)
        q_size, kv_size = heads * c.head_dim, c.num_kv_heads * c.head_dim
        qk = qkv[:, : q_size + kv_size].view(rows, heads + c.num_kv_heads, c.head_dim)  # query heads, then key heads
        v = qkv[:, q_size + kv_size:].view(rows, c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None:
            qk = torch.cat([kernels.rms_norm(qk[:, :heads], layer.q_norm, c.rms_norm_eps),
                            kernels.rms_norm(qk[:, heads:], layer.k_norm, c.rms_norm_eps)], dim=1)
        qk = kernels.rope(qk, *rope)  # queries and keys rotated in one pass
        q, k = qk[:, :heads], qk[:, heads:]
        parts = []
        for seg, (first, last), seg_masks in zip(segments, spans, masks):
            # a one-token segment's duplicate row equals its row bit for bit: the first n rows suffice
            cache, start, n = seg.cache, seg.cache.length, seg.token_ids.shape[0]
            cache.k[i][:, start: start + n] = k[first: first + n].transpose(0, 1)
            cache.v[i][:, start: start + n] = v[first: first + n].transpose(0, 1)
            parts.append(kernels.attention(q[first:last], cache.k[i], cache.v[i], seg_masks, c.query_scale))
        a = kernels.linear(parts[0] if len(parts) == 1 else torch.cat(parts), layer.o_t)
        return a if layer.post_attn_norm is None else kernels.rms_norm(a, layer.post_attn_norm, c.rms_norm_eps)

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = kernels.rms_norm(x, layer.mlp_norm, c.rms_norm_eps)
        gate, up = kernels.linear(h, layer.gate_up_t).chunk(2, dim=-1)
        m = kernels.linear(kernels.activation(c.activation, gate) * up, layer.down_t)
        return m if layer.post_mlp_norm is None else kernels.rms_norm(m, layer.post_mlp_norm, c.rms_norm_eps)


def _rope_table(theta: float, dim: int, length: int, scaling: RopeScaling | None,
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
