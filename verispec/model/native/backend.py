"""The native backend: the weights as they lie in the file, a whole forward in one call to the C++
kernels (csrc/api.cpp), exact (fp32) or int8 activations."""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Sequence

import torch

from verispec.errors import ModelLoadError
from verispec.model import native
from verispec.model.config import ModelConfig
from verispec.model.native import Batch, LayerWeights, Model, float_ptr, int32_array, matrix
from verispec.model.segment import Segment
from verispec.model.weights import Weight

MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
VECTORS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm", "q_bias", "k_bias",
           "v_bias")


def unsupported_shape(config: ModelConfig) -> str | None:
    """Why the kernels cannot run this model's shapes (they read rows 32 weights at a time), or None."""
    c = config
    for name, value, multiple in (("hidden_size", c.hidden_size, 32), ("intermediate_size", c.intermediate_size, 32),
                                  ("heads * head_dim", c.num_heads * c.head_dim, 32), ("head_dim", c.head_dim, 16)):
        if value % multiple:
            return f"{name}={value} is not a multiple of {multiple}"
    return None


class NativeBackend:
    def __init__(self, config: ModelConfig, weights: dict[str, Weight | torch.Tensor],
                 rope: dict[bool, tuple[torch.Tensor, torch.Tensor]], activations: str) -> None:
        why = native.unavailable() or unsupported_shape(config)
        if why:
            raise ModelLoadError(f"the native backend cannot run this model: {why}; use backend='torch'")
        native.ensure_threads()
        self.config = config
        self.int8 = activations == "int8"
        self._keep: list[object] = []  # what the C structs point into must outlive them
        without = sorted({w.type.name for w in weights.values()
                          if isinstance(w, Weight) and int(w.type) not in native.NATIVE_TYPES})
        if without:
            warnings.warn(f"{', '.join(without)} weights have no native kernel: they are dequantized to F32 at "
                          f"load (more memory and slower than the formats with one)", stacklevel=3)
        mats = {name: self._matrix(w) for name, w in weights.items() if isinstance(w, Weight)}
        vecs = {name: self._vector(t) for name, t in weights.items() if not isinstance(t, Weight)}
        rope = {kind: tuple(self._vector(t) for t in tables) for kind, tables in rope.items()}
        layers = (LayerWeights * config.num_layers)()
        for i, layer in enumerate(layers):
            p = f"layers.{i}."
            for name in MATRICES:
                setattr(layer, name, matrix(mats[p + name]))
            for name in VECTORS:
                setattr(layer, name, vecs.get(p + name))
            sliding = config.sliding_layers[i]
            layer.rope_cos, layer.rope_sin = rope[sliding]
            layer.window = config.sliding_window if sliding and config.sliding_window else 0
        self._keep.append(layers)
        self._weights = mats
        head = mats.get("lm_head", mats["embed"])
        c = config
        self.model = Model(layers=c.num_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                           heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim, vocab=c.vocab_size,
                           activation=0 if c.activation == "silu" else 1, eps=c.rms_norm_eps,
                           embed_scale=c.embed_scale, query_scale=c.query_scale, embed=matrix(mats["embed"]),
                           lm_head=matrix(head), final_norm=vecs["final_norm"],
                           layer=ctypes.cast(layers, ctypes.POINTER(LayerWeights)))
        self._head = head

    def _matrix(self, w: Weight) -> Weight:
        return w if int(w.type) in native.NATIVE_TYPES else Weight.of_tensor(w.name, w.dequantize())

    def _vector(self, t: torch.Tensor) -> ctypes._Pointer:
        t = t.detach().to("cpu", torch.float32).contiguous()
        self._keep.append(t)
        return float_ptr(t)

    @property
    def weight_bytes_per_token(self) -> int:
        per_layer = [w for name, w in self._weights.items() if name.startswith("layers.")]
        return sum(w.nbytes for w in per_layer) + self._head.nbytes

    def forward_many(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        ids, positions, first_row, outputs = [], [], [0], []
        parent, slot = [], []  # rows of trees: the parent row in the batch (-1: a chain row) and the cache slot
        for seg in segments:
            n, start = seg.token_ids.shape[0], first_row[-1]
            ids += seg.token_ids.tolist()
            positions += seg.positions()
            parent += [-1] * n if seg.parents is None else [-1] + [start + p for p in seg.parents]
            slot += range(seg.cache.length, seg.cache.length + n)
            first_row.append(start + n)
            if seg.logits == "all":
                outputs += range(start, start + n)
            elif seg.logits == "last":
                outputs.append(start + n - 1)
        strides = [seg.cache.k.shape[2] for seg in segments]
        trees = any(seg.parents is not None for seg in segments)
        arrays = [int32_array(a) for a in (ids, positions, first_row, outputs, strides, parent, slot)]
        k = (ctypes.c_void_p * len(segments))(*[seg.cache.k.data_ptr() for seg in segments])
        v = (ctypes.c_void_p * len(segments))(*[seg.cache.v.data_ptr() for seg in segments])
        logits = torch.empty(len(outputs), self.config.vocab_size)  # [wanted rows, vocab]
        capture = next((seg.capture for seg in segments if seg.capture), ())
        features = torch.empty(len(ids) if capture else 0, len(capture), self.config.hidden_size)
        arrays.append(int32_array(list(capture)))
        i32 = ctypes.POINTER(ctypes.c_int32)
        batch = Batch(rows=len(ids), segments=len(segments), token_ids=arrays[0].ctypes.data_as(i32),
                      positions=arrays[1].ctypes.data_as(i32), first_row=arrays[2].ctypes.data_as(i32),
                      k_cache=ctypes.cast(k, ctypes.POINTER(ctypes.c_void_p)),
                      v_cache=ctypes.cast(v, ctypes.POINTER(ctypes.c_void_p)), stride=arrays[4].ctypes.data_as(i32),
                      outputs=len(outputs), output_rows=arrays[3].ctypes.data_as(i32), logits=float_ptr(logits),
                      int8=int(self.int8), parent=arrays[5].ctypes.data_as(i32) if trees else None,
                      slot=arrays[6].ctypes.data_as(i32) if trees else None, captures=len(capture),
                      capture_layers=arrays[7].ctypes.data_as(i32), features=float_ptr(features) if capture else None)
        native.lib().vs_forward(ctypes.byref(self.model), ctypes.byref(batch))
        for seg, first in zip(segments, first_row):
            if seg.capture:
                seg.features = features[first: first + seg.token_ids.shape[0]]
        parts = iter(logits.split([seg.token_ids.shape[0] if seg.logits == "all" else 1
                                   for seg in segments if seg.logits != "none"]))
        return [None if seg.logits == "none" else next(parts) for seg in segments]

