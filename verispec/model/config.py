"""The shape of a decoder: one frozen dataclass that every loader fills and the transformer reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from verispec.errors import ModelLoadError

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class RopeScaling:
    """Position-frequency scaling. kind: 'linear' or 'llama3' (Llama 3.1's piecewise scaling)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    # gemma3: sliding-window layers with their own RoPE base, norms around attention and MLP,
    # embeddings scaled by sqrt(hidden), GELU(tanh), queries scaled by query_pre_attn_scalar.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ModelLoadError(
                f"architecture {self.architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (False,) * self.num_layers)
        if len(self.sliding_layers) != self.num_layers:
            raise ModelLoadError(f"{len(self.sliding_layers)} sliding-layer flags for {self.num_layers} layers")

    @property
    def qk_norm(self) -> bool:
        return self.architecture in ("qwen3", "gemma3")

    @property
    def sandwich_norms(self) -> bool:
        return self.architecture == "gemma3"

    @property
    def activation(self) -> str:
        return "gelu_tanh" if self.architecture == "gemma3" else "silu"

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size) if self.architecture == "gemma3" else 1.0

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5
