"""Open a model from a .gguf file or a Hugging Face folder."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from verispec.errors import InvalidInputError, ModelLoadError
from verispec.model.config import ModelConfig
from verispec.model.gguf_file import GGUFModel
from verispec.model.hf import load_weights, read_config
from verispec.model.transformer import Transformer
from verispec.model.weights import Weight

REQUIRED_LAYER_WEIGHTS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer live: a .gguf file, or a folder (gguf_file None)."""

    folder: Path
    gguf_file: str | None

    @classmethod
    def of(cls, path: str | Path) -> ModelSource:
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelLoadError(f"model path {str(path)!r} does not exist")
        if p.is_dir():
            return cls(p, None)
        if p.suffix != ".gguf":
            raise ModelLoadError(f"model path {str(path)!r} is neither a .gguf file nor a Hugging Face folder")
        return cls(p.parent, p.name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device={device!r} is not available: this machine has no CUDA device; use 'cpu'")
    return torch.device(device)


def load_model(source: ModelSource, max_context: int | None, device: torch.device, backend: str | None = None,
               activations: str = "exact") -> Transformer:
    """backend: 'native', 'torch', or None for native where it can run (a CPU with AVX2 and the
    extension built) and torch elsewhere; activations 'int8' needs the native backend."""
    if source.gguf_file is not None:
        gguf = GGUFModel(source.folder / source.gguf_file)
        config = gguf.config()
        weights = gguf.weights(config)
    else:
        config = read_config(source.folder)
        weights = load_weights(source.folder, config)
    _check_weights(config, weights, source)
    chosen = choose_backend(backend, device, config)
    if activations != "exact" and chosen != "native":
        raise InvalidInputError(f"activations={activations!r} needs backend='native' (this model runs on {chosen})",
                                param="activations")
    context = max_context or min(config.max_position, 8192)
    return Transformer(config, weights, context, device, chosen, activations)


def choose_backend(requested: str | None, device: torch.device, config: ModelConfig) -> str:
    from verispec.model import native
    from verispec.model.native.backend import unsupported_shape

    if requested == "torch":
        return "torch"
    if device.type != "cpu":
        if requested == "native":
            raise InvalidInputError(f"backend='native' runs on the CPU; device {device} needs backend='torch'",
                                    param="backend")
        return "torch"
    why = native.unavailable() or unsupported_shape(config)
    if why is None:
        return "native"
    if requested == "native":
        raise ModelLoadError(f"backend='native' cannot run here: {why}")
    warnings.warn(f"the native backend cannot run here ({why}): using the torch backend", stacklevel=3)
    return "torch"


def _check_weights(config: ModelConfig, weights: dict[str, Weight | torch.Tensor], source: ModelSource) -> None:
    required = [f"layers.{i}.{n}" for i in range(config.num_layers) for n in REQUIRED_LAYER_WEIGHTS]
    if config.qk_norm:
        required += [f"layers.{i}.{n}" for i in range(config.num_layers) for n in ("q_norm", "k_norm")]
    if config.sandwich_norms:
        required += [f"layers.{i}.{n}" for i in range(config.num_layers) for n in ("post_attn_norm", "post_mlp_norm")]
    missing = [n for n in required if n not in weights]
    if missing:
        raise ModelLoadError(f"{source.folder / (source.gguf_file or '')}: missing weights {missing[:5]} "
                             f"({len(missing)} in all) for a {config.architecture} model")
    expected = (config.num_heads * config.head_dim, config.hidden_size)
    if tuple(weights["layers.0.q"].shape) != expected:
        raise ModelLoadError(f"layers.0.q has shape {tuple(weights['layers.0.q'].shape)}, expected {expected}")
