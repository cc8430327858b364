"""The torch backend: fp32 weights (dequantized at load) and torch ops; the reference, and the path
for CUDA. Rows are made invariant by shape: every sequence's rows are padded with copies of its last
row to whole groups of ROWS, and every op runs on groups of exactly ROWS, so a row never sees a
GEMM of another shape (kernels.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from verispec import tree
from verispec.model import kernels
from verispec.model.config import ModelConfig
from verispec.model.segment import Segment
from verispec.model.weights import Weight

ROWS = kernels.ROWS


class DenseLinear:
    """y = x W^T (+ b) in fp32 on torch, over groups of exactly ROWS rows (x's rows a multiple of ROWS)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight_t = weight.t().contiguous()  # [in, out]
        self.bias = bias

    @classmethod
    def stack(cls, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None) -> DenseLinear:
        """One linear for several matrices over the same input, outputs side by side (q k v; gate up)."""
        return cls(torch.cat(list(weights)), None if biases is None else torch.cat(list(biases)))

    @property
    def nbytes(self) -> int:
        return self.weight_t.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([part @ self.weight_t for part in x.split(ROWS)]) if x.shape[0] > ROWS else x @ self.weight_t
        return y if self.bias is None else y + self.bias


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: DenseLinear  # -> [rows, (heads + 2 * kv_heads) * head_dim]
    o: DenseLinear
    mlp_norm: torch.Tensor
    gate_up: DenseLinear  # -> [rows, 2 * intermediate]
    down: DenseLinear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_attn_norm: torch.Tensor | None
    post_mlp_norm: torch.Tensor | None
    sliding: bool


class TorchBackend:
    def __init__(self, config: ModelConfig, weights: dict[str, Weight | torch.Tensor],
                 rope: dict[bool, tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.config, self.device, self._rope = config, device, rope
        w = {name: (t.dequantize() if isinstance(t, Weight) else t).to(device=device, dtype=torch.float32)
             for name, t in weights.items()}
        self.embed = w["embed"]  # [vocab, hidden]
        self.lm_head = DenseLinear(w.get("lm_head", self.embed))
        self.final_norm = w["final_norm"]
        self.layers = [self._layer(w, i) for i in range(config.num_layers)]
        self._kinds = set(config.sliding_layers)  # which of global (False) and sliding (True) layers occur

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> Layer:
        p = f"layers.{i}."
        biases = [w[p + n] for n in ("q_bias", "k_bias", "v_bias")] if self.config.qkv_bias else None
        return Layer(
            attn_norm=w[p + "attn_norm"],
            qkv=DenseLinear.stack([w[p + "q"], w[p + "k"], w[p + "v"]], biases),
            o=DenseLinear(w[p + "o"]),
            mlp_norm=w[p + "mlp_norm"],
            gate_up=DenseLinear.stack([w[p + "gate"], w[p + "up"]]),
            down=DenseLinear(w[p + "down"]),
            q_norm=w.get(p + "q_norm"), k_norm=w.get(p + "k_norm"),
            post_attn_norm=w.get(p + "post_attn_norm"), post_mlp_norm=w.get(p + "post_mlp_norm"),
            sliding=self.config.sliding_layers[i],
        )

    @property
    def weight_bytes_per_token(self) -> int:
        per_layer = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return sum(lin.nbytes for lin in per_layer) + self.lm_head.nbytes

    def forward_many(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        c = self.config
        spans: list[tuple[int, int]] = []  # each segment's rows in the batch, its padding included
        ids, positions = [], []
        paths: list[list[list[int]] | None] = []  # per tree segment, each padded row's slots from the root
        row = 0
        for seg in segments:
            n = seg.token_ids.shape[0]
            pad = -n % ROWS  # copies of the last row: same token, position and path, so the same cache entry
            pos = torch.tensor(seg.positions(), device=self.device)
            ids.append(torch.cat([seg.token_ids, seg.token_ids[-1:].repeat(pad)]))
            positions.append(torch.cat([pos, pos[-1:].repeat(pad)]))
            paths.append(None if seg.parents is None else
                         [[seg.cache.length + j for j in [0] + tree.path(seg.parents, min(r, n - 1))]
                          for r in range(n + pad)])
            spans.append((row, row + n + pad))
            row += n + pad
        pos_all = torch.cat(positions)  # [rows]
        # cos, sin [rows, 1, head_dim] of each RoPE table (global, local), looked up once for all layers
        rope = {sliding: tuple(t[pos_all].unsqueeze(1) for t in self._rope[sliding]) for sliding in self._kinds}
        group = c.num_heads // c.num_kv_heads
        masks = [{sliding: kernels.attention_masks(pos, group, c.sliding_window if sliding else None)
                  for sliding in self._kinds} for pos in positions]
        x = self.embed[torch.cat(ids)] * c.embed_scale  # [rows, hidden]
        capture = next((seg.capture for seg in segments if seg.capture), ())
        taken: dict[int, torch.Tensor] = {}  # layer -> the residual stream entering it [rows, hidden]
        for i, layer in enumerate(self.layers):
            if i in capture:
                taken[i] = x
            x = x + self._attention(layer, i, x, rope[layer.sliding], [m[layer.sliding] for m in masks], segments,
                                    spans, paths)
            x = x + self._mlp(layer, x)
        taken[c.num_layers] = x
        for seg, (first, _) in zip(segments, spans):
            if seg.capture:
                seg.features = torch.stack([taken[i][first: first + seg.token_ids.shape[0]] for i in capture], dim=1)
        outputs = []
        for seg, (first, _) in zip(segments, spans):
            n = seg.token_ids.shape[0]
            if seg.logits == "all":
                outputs.append(x[first: first + n])
            elif seg.logits == "last":
                outputs.append(x[first + n - 1: first + n])
        if not outputs:
            return [None] * len(segments)
        out = torch.cat(outputs)  # [wanted rows, hidden]
        wanted = out.shape[0]
        out = torch.cat([out, out[-1:].repeat(-wanted % ROWS, 1)])
        logits = self.lm_head(kernels.rms_norm(out, self.final_norm, c.rms_norm_eps))[:wanted]
        parts = iter(logits.split([o.shape[0] for o in outputs]))
        return [None if seg.logits == "none" else next(parts) for seg in segments]

    def _attention(self, layer: Layer, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   masks: list[list[tuple[int, torch.Tensor]]], segments: Sequence[Segment],
                   spans: list[tuple[int, int]], paths: list[list[list[int]] | None]) -> torch.Tensor:
        c = self.config
        rows, heads = x.shape[0], c.num_heads
        qkv = layer.qkv(kernels.rms_norm(x, layer.attn_norm, c.rms_norm_eps))
        q_size, kv_size = heads * c.head_dim, c.num_kv_heads * c.head_dim
        qk = qkv[:, : q_size + kv_size].view(rows, heads + c.num_kv_heads, c.head_dim)  # query heads, then key heads
        v = qkv[:, q_size + kv_size:].view(rows, c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None:
            qk = torch.cat([kernels.rms_norm(qk[:, :heads], layer.q_norm, c.rms_norm_eps),
                            kernels.rms_norm(qk[:, heads:], layer.k_norm, c.rms_norm_eps)], dim=1)
        qk = kernels.rope(qk, *rope)  # queries and keys rotated in one pass
        q, k = qk[:, :heads], qk[:, heads:]
        parts = []
        for seg, (first, last), seg_masks, seg_paths in zip(segments, spans, masks, paths):
            # padding rows equal the last row bit for bit: the first n rows hold every new entry
            cache, start, n = seg.cache, seg.cache.length, seg.token_ids.shape[0]
            cache.k[i][:, start: start + n] = k[first: first + n].transpose(0, 1)
            cache.v[i][:, start: start + n] = v[first: first + n].transpose(0, 1)
            if seg_paths is None:
                parts.append(kernels.attention(q[first:last], cache.k[i], cache.v[i], seg_masks, c.query_scale))
            else:
                parts.append(kernels.tree_attention(q[first:last], cache.k[i], cache.v[i], seg_masks, c.query_scale,
                                                    start, seg_paths))
        a = layer.o(parts[0] if len(parts) == 1 else torch.cat(parts))
        return a if layer.post_attn_norm is None else kernels.rms_norm(a, layer.post_attn_norm, c.rms_norm_eps)

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        gate, up = layer.gate_up(kernels.rms_norm(x, layer.mlp_norm, c.rms_norm_eps)).chunk(2, dim=-1)
        m = layer.down(kernels.activation(c.activation, gate) * up)
        return m if layer.post_mlp_norm is None else kernels.rms_norm(m, layer.post_mlp_norm, c.rms_norm_eps)
