"""Hugging Face folders: config.json + *.safetensors, mapped to verispec's canonical weight names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from verispec.errors import ModelLoadError
from verispec.model.config import ARCHITECTURES, ModelConfig, RopeScaling
from verispec.model.weights import Weight

# model_type in config.json -> our architecture
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma3_text": "gemma3", "gemma3": "gemma3"}

# canonical name -> name inside model.layers.{i}.
LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
    "o": "self_attn.o_proj.weight",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
}
# The norm before the MLP is post_attention_layernorm in llama and qwen; gemma3 names its four norms.
PLAIN_NORMS = {"mlp_norm": "post_attention_layernorm.weight"}
GEMMA_NORMS = {"post_attn_norm": "post_attention_layernorm.weight", "mlp_norm": "pre_feedforward_layernorm.weight",
               "post_mlp_norm": "post_feedforward_layernorm.weight"}


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} has no config.json; a Hugging Face model folder needs one") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    cfg = raw.get("text_config", raw) if raw.get("model_type") == "gemma3" else raw
    model_type = cfg.get("model_type", raw.get("model_type"))
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} in {path} is not supported; supported architectures: {', '.join(ARCHITECTURES)}"
        )
    arch = MODEL_TYPES[model_type]
    if arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise ModelLoadError(f"{path}: use_sliding_window=true is not supported for {arch}")
    heads = cfg["num_attention_heads"]
    full, local = _rope_parameters(cfg)
    layer_types = cfg.get("layer_types") or []
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(full.get("rope_theta", 10000.0)),
        max_position=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=bool(raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", arch == "gemma3"))),
        rope_scaling=_scaling(full, path),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias")),
        sliding_window=cfg.get("sliding_window") if arch == "gemma3" else None,
        sliding_layers=tuple(t == "sliding_attention" for t in layer_types) if arch == "gemma3" else (),
        rope_local_theta=float(local["rope_theta"]) if local else None,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
    )


def _rope_parameters(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(global, local) RoPE parameters, from transformers 5's rope_parameters or the older keys."""
    params = cfg.get("rope_parameters")
    if params and "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    if params:
        return params, None
    full = dict(cfg.get("rope_scaling") or {})
    full["rope_theta"] = cfg.get("rope_theta", 10000.0)
    local = {"rope_theta": cfg["rope_local_base_freq"]} if "rope_local_base_freq" in cfg else None
    return full, local


def _scaling(params: dict[str, Any], path: Path) -> RopeScaling | None:
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                           float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    raise ModelLoadError(f"{path}: rope type {kind!r} is not supported; supported: default, linear, llama3")


def load_weights(folder: Path, config: ModelConfig) -> dict[str, Weight | torch.Tensor]:
    """Matrices in their safetensors dtype (f32, f16 or bf16), vectors as fp32."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except SafetensorError as e:
            raise ModelLoadError(f"{f} is not a readable safetensors file: {e}") from None
    tensors = {name.removeprefix("language_model.").removeprefix("model.language_model.")
               .removeprefix("model."): t for name, t in tensors.items()}
    gemma = config.architecture == "gemma3"
    names = {**LAYER_NAMES, **(GEMMA_NORMS if gemma else PLAIN_NORMS)}
    w = {"embed": _take(tensors, "embed_tokens.weight", folder), "final_norm": _take(tensors, "norm.weight", folder)}
    if not config.tie_embeddings:
        w["lm_head"] = _take(tensors, "lm_head.weight", folder)
    for i in range(config.num_layers):
        for canonical, name in names.items():
            key = f"layers.{i}.{name}"
            if key in tensors:
                w[f"layers.{i}.{canonical}"] = tensors[key]
    for name in [n for n in w if n.endswith("norm")] if gemma else []:
        w[name] = w[name].float() + 1.0  # gemma stores the norm scale as w, applied as 1 + w
    return {name: Weight.of_tensor(name, t) if t.dim() == 2 else t.float() for name, t in w.items()}


def _take(tensors: dict[str, torch.Tensor], name: str, folder: Path) -> torch.Tensor:
    if name not in tensors:
        raise ModelLoadError(f"{folder}: tensor {name!r} is missing from the safetensors files")
    return tensors[name]
