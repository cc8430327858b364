"""An EAGLE-3 head (Li et al., 2025): it drafts from the target's own hidden states.

    g_0 = fc([x_a; x_b; x_c])           the target's residual stream entering three layers (low, mid, high)
    h   = g + attn([norm(emb(token)); norm(g)]) ; h = h + mlp(norm(h))    one decoder layer, 2H -> H
    q   = softmax(lm_head(norm(h)))     over the draft vocabulary (d2t: draft id -> target id offset)

Pair t of a sequence is (the target's features at position t, the token at t + 1), at position t; its
h predicts the token at t + 2, and feeds the next pair as g (the head runs on its own features past
the target's). The layout is the one SGLang and vLLM load (LlamaForCausalLMEagle3); the embedding
is the target's own and is not stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from verispec.errors import InvalidInputError, ModelLoadError
from verispec.model import kernels
from verispec.model.cache import KVCache
from verispec.model.config import ModelConfig
from verispec.model.transformer import rope_table
from verispec.model.weights import Weight

ARCHITECTURE = "LlamaForCausalLMEagle3"
BUILTIN = "smollm2-135m-instruct"  # the model whose head ships in verispec/data/eagle


def aux_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's choice: the inputs of layers 2, L/2 and L - 3 (vLLM's default), within 0..L."""
    return tuple(min(max(i, 0), num_layers) for i in (2, num_layers // 2, num_layers - 3))


@dataclass(frozen=True)
class HeadConfig:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    vocab: int  # the target's
    draft_vocab: int
    layers: tuple[int, ...]  # the target layers whose input it fuses (eagle_aux_hidden_state_layer_ids)
    max_position: int

    @classmethod
    def for_target(cls, c: ModelConfig, draft_vocab: int) -> HeadConfig:
        return cls(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                   c.rope_theta, c.vocab_size, min(draft_vocab, c.vocab_size), aux_layers(c.num_layers),
                   c.max_position)

    def to_hf(self) -> dict:
        """config.json as SGLang's and vLLM's Eagle3 loaders read it."""
        return {"architectures": [ARCHITECTURE], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "num_hidden_layers": 1,
                "rms_norm_eps": self.eps, "rope_theta": self.rope_theta, "vocab_size": self.vocab,
                "draft_vocab_size": self.draft_vocab, "max_position_embeddings": self.max_position,
                "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16",
                "eagle_aux_hidden_state_layer_ids": list(self.layers),
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.layers)}}

    @classmethod
    def from_hf(cls, d: dict, num_target_layers: int) -> HeadConfig:
        if ARCHITECTURE not in d.get("architectures", []):
            raise ModelLoadError(f"architectures={d.get('architectures')}: an EAGLE-3 head has {ARCHITECTURE!r}")
        layers = d.get("eagle_aux_hidden_state_layer_ids") or d.get("eagle_config", {}).get(
            "eagle_aux_hidden_state_layer_ids") or aux_layers(num_target_layers)
        heads = d["num_attention_heads"]
        return cls(d["hidden_size"], d["intermediate_size"], heads, d.get("num_key_value_heads", heads),
                   d.get("head_dim") or d["hidden_size"] // heads, d.get("rms_norm_eps", 1e-6),
                   d.get("rope_theta", 10000.0), d["vocab_size"], d.get("draft_vocab_size", d["vocab_size"]),
                   tuple(layers), d.get("max_position_embeddings", 2048))


class Head(nn.Module):
    """The head's weights and its forward; embed [vocab, hidden] is the target's (frozen, not saved)."""

    def __init__(self, config: HeadConfig, embed: torch.Tensor) -> None:
        super().__init__()
        c = self.config = config
        H, q_size, kv_size = c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim
        self.fc = nn.Linear(len(c.layers) * H, H, bias=False)
        self.q_proj = nn.Linear(2 * H, q_size, bias=False)
        self.k_proj = nn.Linear(2 * H, kv_size, bias=False)
        self.v_proj = nn.Linear(2 * H, kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, H, bias=False)
        self.gate_proj = nn.Linear(H, c.intermediate, bias=False)
        self.up_proj = nn.Linear(H, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, H, bias=False)
        self.input_norm = nn.Parameter(torch.ones(H))
        self.hidden_norm = nn.Parameter(torch.ones(H))
        self.post_norm = nn.Parameter(torch.ones(H))
        self.norm = nn.Parameter(torch.ones(H))
        self.lm_head = nn.Linear(H, c.draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab, dtype=torch.bool))
        self.embed = embed.detach()
        self._native: dict[str, Weight] = {}  # fused matrices for the native kernels (drafting), or none
        self._cos, self._sin = rope_table(c.rope_theta, c.head_dim, c.max_position, None, torch.device("cpu"))

    @property
    def draft_ids(self) -> torch.Tensor:
        """[draft_vocab]: the target id of each draft id."""
        return torch.arange(self.config.draft_vocab) + self.d2t

    def set_vocabulary(self, draft_ids: torch.Tensor) -> None:
        """draft_ids [draft_vocab], ascending target ids."""
        self.d2t.copy_(draft_ids - torch.arange(self.config.draft_vocab))
        self.t2d.zero_()
        self.t2d[draft_ids] = True

    def use_native(self, kind: GGMLQuantizationType = GGMLQuantizationType.Q8_0) -> None:
        """Draft through the native kernels, the matrices quantized to `kind` (q k v and gate up each
        one matrix): a draft step reads a quarter of the fp32 bytes. Training keeps torch's."""
        from gguf.quants import quantize

        from verispec.model import native

        if native.unavailable():
            return
        groups = {"fc": ("fc",), "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                  "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",), "lm_head": ("lm_head",)}
        for name, parts in groups.items():
            w = torch.cat([getattr(self, part).weight.detach().float() for part in parts]).numpy()
            self._native[name] = Weight.of(name, quantize(w, kind), kind, w.shape[0], w.shape[1])

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        from verispec.model import native

        return native.matmul(self._native[name], x)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, len(layers), hidden] (a Segment's capture) -> g [n, hidden]."""
        x = features.flatten(1)
        return self._linear("fc", x) if self._native else self.fc(x)

    def qkv(self, tokens: torch.Tensor, g: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [n], g [n, H], positions [n] -> q [n, heads, d], k, v [n, kv_heads, d] (RoPE applied)."""
        c = self.config
        x = torch.cat([kernels.rms_norm(self.embed[tokens], self.input_norm, c.eps),
                       kernels.rms_norm(g, self.hidden_norm, c.eps)], dim=-1)
        cos, sin = self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)
        if self._native:
            q, k, v = self._linear("qkv", x).split([c.heads * c.head_dim, c.kv_heads * c.head_dim,
                                                    c.kv_heads * c.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = kernels.rope(q.reshape(-1, c.heads, c.head_dim), cos, sin)
        k = kernels.rope(k.reshape(-1, c.kv_heads, c.head_dim), cos, sin)
        return q, k, v.reshape(-1, c.kv_heads, c.head_dim)

    def finish(self, g: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """g [n, H], attended [n, heads * d] -> h [n, H], the features the next pair reads."""
        if self._native:
            h = g + self._linear("o", attended)
            gate, up = self._linear("gate_up", kernels.rms_norm(h, self.post_norm, self.config.eps)).chunk(2, dim=-1)
            return h + self._linear("down", F.silu(gate) * up)
        h = g + self.o_proj(attended)
        m = kernels.rms_norm(h, self.post_norm, self.config.eps)
        return h + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, H] -> [n, draft_vocab]."""
        x = kernels.rms_norm(h, self.norm, self.config.eps)
        return self._linear("lm_head", x) if self._native else self.lm_head(x)

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, H] -> [n, vocab], -inf outside the draft vocabulary (so q is zero there)."""
        out = torch.full((h.shape[0], self.config.vocab), float("-inf"))
        out[:, self.draft_ids] = self.logits(h)
        return out

    def new_cache(self, capacity: int) -> KVCache:
        c = self.config
        return KVCache(1, c.kv_heads, c.head_dim, capacity, torch.float32, torch.device("cpu"))

    @torch.inference_mode()
    def step(self, parts: list[tuple[torch.Tensor, torch.Tensor, KVCache]]) -> list[torch.Tensor]:
        """Pairs of several sequences in one pass: (tokens [n], g [n, H], cache) each, at positions
        cache.length onwards, attending to the cache and causally to each other; the cache grows by n.
        Returns h [n, H] per part."""
        tokens = torch.cat([t for t, _, _ in parts])
        g = torch.cat([x for _, x, _ in parts])
        positions = torch.cat([torch.arange(cache.length, cache.length + len(t)) for t, _, cache in parts])
        q, k, v = self.qkv(tokens, g, positions)
        outs, row = [], 0
        for t, _, cache in parts:
            n, start = len(t), cache.length
            causal = torch.arange(start + n) <= torch.arange(start, start + n)[:, None]  # [n, start + n]
            outs.append(self._attend(q[row: row + n], k[row: row + n], v[row: row + n], cache, causal))
            row += n
        h = self.finish(g, torch.cat(outs))
        return list(h.split([len(t) for t, _, _ in parts]))

    @torch.inference_mode()
    def step_tree(self, tokens: torch.Tensor, g: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  visible: torch.Tensor) -> torch.Tensor:
        """Draft-tree pairs of one sequence: tokens [n], g [n, H] at `positions` [n] (their depths),
        written to slots cache.length onwards; visible [n, cache.length + n]: the slots each row sees
        (the committed pairs, its ancestors, itself). Returns h [n, H]; the cache grows by n."""
        q, k, v = self.qkv(tokens, g, positions)
        return self.finish(g, self._attend(q, k, v, cache, visible))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, visible: torch.Tensor
                ) -> torch.Tensor:
        """q [n, heads, d], k, v [n, kv_heads, d] of new rows, stored at cache.length onwards; visible
        [n, cache.length + n] -> [n, heads * d]. The cache grows by n."""
        n, start = q.shape[0], cache.length
        cache.reserve(n)
        cache.k[0][:, start: start + n] = k.transpose(0, 1)
        cache.v[0][:, start: start + n] = v.transpose(0, 1)
        keys, values = cache.k[0][:, : start + n], cache.v[0][:, : start + n]  # [kv_heads, len, d]
        a = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=visible, enable_gqa=True)
        cache.length += n
        return a.transpose(0, 1).reshape(n, -1)


WEIGHTS = {  # our parameter -> the name in the EAGLE-3 layout
    "fc": "fc.weight", "q_proj": "midlayer.self_attn.q_proj.weight", "k_proj": "midlayer.self_attn.k_proj.weight",
    "v_proj": "midlayer.self_attn.v_proj.weight", "o_proj": "midlayer.self_attn.o_proj.weight",
    "gate_proj": "midlayer.mlp.gate_proj.weight", "up_proj": "midlayer.mlp.up_proj.weight",
    "down_proj": "midlayer.mlp.down_proj.weight", "input_norm": "midlayer.input_layernorm.weight",
    "hidden_norm": "midlayer.hidden_norm.weight", "post_norm": "midlayer.post_attention_layernorm.weight",
    "norm": "norm.weight", "lm_head": "lm_head.weight", "d2t": "d2t", "t2d": "t2d",
}


def _tensor(head: Head, name: str) -> torch.Tensor:
    t = getattr(head, name)
    return t.weight if isinstance(t, nn.Linear) else t


def save(head: Head, folder: Path, summary: dict) -> None:
    """config.json, model.safetensors (fp16 weights, d2t and t2d as they are) and verispec.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, key in WEIGHTS.items():
        t = _tensor(head, name).detach()
        tensors[key] = (t.half() if t.is_floating_point() else t).contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(head.config.to_hf(), indent=2) + "\n")
    (folder / "verispec.json").write_text(json.dumps(summary, indent=2) + "\n")


def builtin_head() -> Path:
    """The head shipped for the default model (package data)."""
    folder = Path(str(resources.files("verispec.data"))) / "eagle" / BUILTIN
    if not (folder / "config.json").is_file():
        raise InvalidInputError("drafter='eagle': this installation has no built-in head; train one with "
                                "`verispec train-drafter --out DIR` and use drafter='eagle:DIR'", param="drafter")
    return folder


def load(folder: Path, target: ModelConfig, embed: torch.Tensor, tokenizer: str | None = None) -> Head:
    """The head in `folder`, checked against the target it will draft for (tokenizer: the target's
    tokenizer_hash, compared with the one the head was trained with when both are known)."""
    from safetensors.torch import load_file

    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ModelLoadError(f"{folder}: no {name}; an EAGLE-3 head folder holds config.json and "
                                 "model.safetensors (verispec train-drafter writes one)")
    summary = json.loads((folder / "verispec.json").read_text()) if (folder / "verispec.json").is_file() else {}
    if tokenizer and summary.get("tokenizer") and summary["tokenizer"] != tokenizer:
        raise ModelLoadError(f"the head in {folder} was trained with tokenizer {summary['tokenizer']}, the target's "
                             f"is {tokenizer}: its token ids mean other tokens")
    config = HeadConfig.from_hf(json.loads((folder / "config.json").read_text()), target.num_layers)
    ours = HeadConfig.for_target(target, config.draft_vocab)
    for field in ("hidden", "vocab", "heads", "kv_heads", "head_dim"):
        if getattr(config, field) != getattr(ours, field):
            raise ModelLoadError(f"the head in {folder} has {field}={getattr(config, field)}, the target "
                                 f"{getattr(ours, field)}: it was trained for another model")
    if any(not 0 <= layer <= target.num_layers for layer in config.layers):
        raise ModelLoadError(f"the head in {folder} reads layers {list(config.layers)}; the target has "
                             f"{target.num_layers}")
    head = Head(config, embed)
    tensors = load_file(str(folder / "model.safetensors"))  # a stored embed_tokens is ignored: the target's is used
    if config.draft_vocab == config.vocab and "d2t" not in tensors:  # a head over the whole vocabulary
        tensors["d2t"], tensors["t2d"] = torch.zeros(config.vocab, dtype=torch.long), torch.ones(config.vocab,
                                                                                               dtype=torch.bool)
    missing = [key for key in WEIGHTS.values() if key not in tensors]
    if missing:
        raise ModelLoadError(f"{folder / 'model.safetensors'} lacks {missing}")
    with torch.no_grad():
        for name, key in WEIGHTS.items():
            mine = _tensor(head, name)
            if tuple(tensors[key].shape) != tuple(mine.shape):
                raise ModelLoadError(f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(mine.shape)}")
            mine.copy_(tensors[key].to(mine.dtype))
    return head.eval()


def tokenizer_hash(tokenizer: Any) -> str:
    """A digest of a tokenizer's vocabulary (every token string and id) and special tokens: a head is
    tied to the ids it was trained on, whether the tokenizer came from a GGUF or tokenizer.json."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    text = json.dumps([vocab, sorted(map(str, tokenizer.all_special_tokens))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def summary_of(config: HeadConfig, **extra: object) -> dict:
    return {"format": "verispec-eagle3", **extra, "config": asdict(config)}
