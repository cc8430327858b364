"""GGUF files: metadata -> ModelConfig; matrices kept in their blocks (a memory map of the file),
vectors as fp32 (gguf.quants dequantizes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from verispec.errors import ModelLoadError
from verispec.model.config import ARCHITECTURES, ModelConfig, RopeScaling
from verispec.model.gguf_header import Tensor, read_header
from verispec.model.weights import Weight

# Quant types the loader accepts: those of the built-in models and the common ones.
SUPPORTED_QUANTS = {GGMLQuantizationType[n] for n in
                    ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                     "Q5_K", "Q6_K")}

# canonical name -> GGUF name inside blk.{i}.
LAYER_NAMES = {
    "attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
    "mlp_norm": "ffn_norm", "post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
}
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp's gemma3: every 6th layer is global, the others sliding
GEMMA3_LOCAL_THETA = 10000.0


class GGUFModel:
    """An opened GGUF file: its metadata fields and tensors."""

    def __init__(self, path: Path) -> None:
        try:
            self.fields, self.tensors = read_header(path)
        except FileNotFoundError:
            raise ModelLoadError(f"GGUF file {path} does not exist") from None
        except ValueError as e:  # GGUFFormatError, or a file too short to map
            raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
        self.path = path
        self.arch = str(self.field("general.architecture"))

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def config(self) -> ModelConfig:
        a = self.arch
        if a not in ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path}: architecture {a!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        hidden = self.field(f"{a}.embedding_length")
        heads = self.field(f"{a}.attention.head_count")
        layers = self.field(f"{a}.block_count")
        names = {t.name for t in self.tensors}
        embed = next(t for t in self.tensors if t.name == "token_embd.weight")
        window = self.field(f"{a}.attention.sliding_window") if a == "gemma3" else None
        scaling_kind = self.field(f"{a}.rope.scaling.type")
        scaling = None
        if scaling_kind == "linear":
            scaling = RopeScaling("linear", float(self.field(f"{a}.rope.scaling.factor")))
        elif scaling_kind not in (None, "none"):
            raise ModelLoadError(f"{self.path}: rope scaling {scaling_kind!r} is not supported; supported: linear")
        return ModelConfig(
            architecture=a,
            vocab_size=int(embed.dims[1]),
            hidden_size=hidden,
            intermediate_size=self.field(f"{a}.feed_forward_length"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=self.field(f"{a}.attention.head_count_kv", heads),
            head_dim=self.field(f"{a}.attention.key_length", hidden // heads),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            max_position=self.field(f"{a}.context_length", 2048),
            tie_embeddings="output.weight" not in names,
            rope_scaling=scaling,
            qkv_bias="blk.0.attn_q.bias" in names,
            sliding_window=window,
            sliding_layers=(tuple((i + 1) % GEMMA3_SLIDING_PATTERN != 0 for i in range(layers))
                            if window else ()),
            rope_local_theta=GEMMA3_LOCAL_THETA if a == "gemma3" else None,
            query_pre_attn_scalar=None,
            final_logit_softcap=self.field(f"{a}.final_logit_softcapping"),
        )

    def weights(self, config: ModelConfig) -> dict[str, Weight | torch.Tensor]:
        tensors = {t.name: t for t in self.tensors}
        w = {"embed": self._tensor(tensors, "token_embd.weight"), "final_norm": self._tensor(tensors, "output_norm.weight")}
        if "output.weight" in tensors:
            w["lm_head"] = self._tensor(tensors, "output.weight")
        for i in range(config.num_layers):
            for canonical, name in LAYER_NAMES.items():
                gguf_name = f"blk.{i}.{name}" + ("" if name.endswith(".bias") else ".weight")
                if gguf_name in tensors:
                    w[f"layers.{i}.{canonical}"] = self._tensor(tensors, gguf_name)
        if config.architecture == "llama":
            # llama.cpp stores llama's Q and K rows interleaved for its RoPE; restore the rotate-half order.
            for i in range(config.num_layers):
                w[f"layers.{i}.q"] = _unpermute(w[f"layers.{i}.q"], config.num_heads)
                w[f"layers.{i}.k"] = _unpermute(w[f"layers.{i}.k"], config.num_kv_heads)
        return w

    def _tensor(self, tensors: dict[str, Tensor], name: str) -> Weight | torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: tensor {name!r} is missing")
        if t.type not in SUPPORTED_QUANTS:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has quant type {t.type.name}, which is not supported; "
                f"supported: {', '.join(sorted(q.name for q in SUPPORTED_QUANTS))}"
            )
        dims = t.dims  # innermost first
        if len(dims) == 2:
            return Weight.of(f"{self.path.name}: {name}", t.data, t.type, rows=dims[1], cols=dims[0])
        try:
            data = dequantize(t.data, t.type)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: tensor {name!r} cannot be dequantized (corrupt file?): {e}") from None
        return torch.from_numpy(np.array(data, dtype=np.float32).reshape(tuple(reversed(dims))))  # a writable copy


def _unpermute(w: Weight, heads: int) -> Weight:
    """Undo llama.cpp's permute(): rows (head, pair, 2) back to (head, 2, pair)."""
    order = np.arange(w.rows).reshape(heads, w.rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)
    return w.take_rows(order)
