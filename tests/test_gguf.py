"""GGUF loading: llama.cpp's tensor names and Q/K row order, quantized tensors, and bad files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import EXACT_BACKENDS, backend_args, tiny_hf_model
from quant import FORMATS, blocks
from verispec.errors import ModelLoadError
from verispec.model.gguf_file import GGUFModel
from verispec.model.load import ModelSource, load_model
from verispec.model.weights import Weight

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert permute of Q/K rows (the loader must undo it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(path: Path, hf, quant: str = "F32", arch: str = "llama") -> Path:
    """Write a transformers llama/qwen2 model as llama.cpp would, its 2-D weights in format `quant`
    (quantized where gguf.quants can, random blocks for the K formats). The weights of `hf` become the
    file's dequantized ones, so `hf` is then the exact fp32 model of the file."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    qtype = gguf.GGMLQuantizationType[quant]
    rng = np.random.default_rng(0)

    def add(name: str, t: torch.Tensor) -> torch.Tensor:
        """Write t; return the values the file now holds for it."""
        a = t.detach().float().numpy()
        if a.ndim != 2 or quant == "F32":
            w.add_tensor(name, a)
            return t
        data = blocks(quant, a, rng, scale=2e-5)
        w.add_tensor(name, data, raw_shape=a.shape if quant == "F16" else None, raw_dtype=qtype)
        return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(a.shape))

    sd = hf.state_dict()
    with torch.no_grad():
        sd["model.embed_tokens.weight"].copy_(add("token_embd.weight", sd["model.embed_tokens.weight"]))
        add("output_norm.weight", sd["model.norm.weight"])
        sd["lm_head.weight"].copy_(add("output.weight", sd["lm_head.weight"]))
        for i in range(c.num_hidden_layers):
            for hf_name, g_name in NAMES.items():
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.{hf_name}.{kind}"
                    if key not in sd:
                        continue
                    t = sd[key]
                    if arch == "llama" and g_name in ("attn_q", "attn_k"):
                        heads = c.num_attention_heads if g_name == "attn_q" else c.num_key_value_heads
                        held = add(f"blk.{i}.{g_name}.{kind}", torch.from_numpy(_permute(t.numpy(), heads)))
                        t.copy_(torch.from_numpy(_unpermute(held.numpy(), heads)))
                    else:
                        t.copy_(add(f"blk.{i}.{g_name}.{kind}", t))
    _finish(w)
    return path


def test_a_format_without_a_kernel_is_dequantized_with_one_warning(tmp_path):
    hf = tiny_hf_model("llama", hidden_size=256, intermediate_size=512)
    path = write_gguf(tmp_path / "m.gguf", hf, "Q2_K")
    with pytest.warns(UserWarning, match="Q2_K weights have no native kernel") as caught:
        ours = load_model(ModelSource.of(path), 128, torch.device("cpu"), *backend_args("native"))
    assert sum("no native kernel" in str(w.message) for w in caught) == 1
    ids = torch.arange(3, 43)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    assert (ours.forward(ids, torch.arange(40), ours.new_cache()) - expected).abs().max() < 1e-4


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("quant", FORMATS)
def test_every_format_gives_the_logits_of_its_dequantized_model(tmp_path, quant, backend):
    """The file's weights as they are (native) or dequantized (torch) give transformers' logits of the
    dequantized model (rows of 256 weights: whole blocks of every format)."""
    hf = tiny_hf_model("llama", hidden_size=256, intermediate_size=512)
    path = write_gguf(tmp_path / "m.gguf", hf, quant)
    ours = load_model(ModelSource.of(path), 128, torch.device("cpu"), *backend_args(backend))
    ids = torch.arange(3, 43)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    error = (ours.forward(ids, torch.arange(40), ours.new_cache()) - expected).abs().max().item()
    assert error < 1e-4, f"{error:.2e} (logits up to {expected.abs().max().item():.1f})"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_matches_the_model_it_was_written_from(tmp_path, arch):
    hf = tiny_hf_model(arch)
    path = write_gguf(tmp_path / "m.gguf", hf, arch=arch)
    ours = load_model(ModelSource.of(path), 128, torch.device("cpu"))
    ids = torch.arange(3, 43)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    error = (ours.forward(ids, torch.arange(40), ours.new_cache()) - expected).abs().max().item()
    assert error < 1e-4, f"{error:.2e} (logits up to {expected.abs().max().item():.1f})"


@pytest.mark.parametrize("quant", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_quantized_weights_dequantize_close_to_the_originals(tmp_path, quant):
    hf = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "m.gguf", hf, quant)
    model = GGUFModel(path)
    original = hf.state_dict()["model.layers.0.mlp.down_proj.weight"]
    got = model.weights(model.config())["layers.0.down"].dequantize()
    scale = original.abs().max()
    tolerance = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q5_0": 0.1, "Q4_0": 0.2, "Q4_1": 0.2}[quant]
    assert (got - original).abs().max() / scale < tolerance


def test_missing_truncated_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelSource.of(tmp_path / "absent.gguf")
    good = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(ModelSource.of(truncated), 128, torch.device("cpu"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(ModelSource.of(garbage), 128, torch.device("cpu"))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    _finish(w)
    with pytest.raises(ModelLoadError, match="'mamba' is not supported; supported: llama, qwen2, qwen3, gemma3"):
        load_model(ModelSource.of(tmp_path / "m.gguf"), 128, torch.device("cpu"))


def test_unsupported_quant_type_names_it(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    # 4 rows of 256 IQ4_NL values: 8 blocks of 18 bytes each
    w.add_tensor("token_embd.weight", np.zeros((4, 144), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    _finish(w)
    with pytest.raises(ModelLoadError, match="IQ4_NL, which is not supported"):
        load_model(ModelSource.of(tmp_path / "iq.gguf"), 128, torch.device("cpu"))


def test_a_block_with_a_non_finite_scale_is_refused_naming_the_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"), "Q8_0")
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    block = 3  # its float16 scale becomes +inf
    data[tensor.data_offset + 34 * block: tensor.data_offset + 34 * block + 2] = np.float16(np.inf).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_up\.weight.*block 3 .*non-finite scale"):
        load_model(ModelSource.of(path), 128, torch.device("cpu"))


def test_rows_that_are_not_whole_blocks_or_bytes_are_refused_naming_the_tensor():
    with pytest.raises(ModelLoadError, match="'blk.0.attn_q.weight'.*48 weights is not a whole number of Q8_0 blocks"):
        Weight.of("blk.0.attn_q.weight", np.zeros(2 * 51, np.uint8), gguf.GGMLQuantizationType.Q8_0, rows=2, cols=48)
    with pytest.raises(ModelLoadError, match="'output.weight': 60 bytes where a 2 x 32 Q8_0 tensor has 68"):
        Weight.of("output.weight", np.zeros(60, np.uint8), gguf.GGMLQuantizationType.Q8_0, rows=2, cols=32)


def header_of_the_gguf_package(path: Path) -> tuple[dict, list]:
    """gguf.GGUFReader's view of a file in gguf_header's terms: scalars and strings as they are,
    numeric arrays as lists, string arrays as their length."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for the header's counts
            continue
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        strings = array and f.types[-1] == gguf.GGUFValueType.STRING
        fields[key] = len(f.data) if strings else list(f.contents()) if array else f.contents()
    tensors = [(t.name, tuple(int(d) for d in t.shape), t.tensor_type, bytes(t.data.view(np.uint8).reshape(-1)))
               for t in reader.tensors]
    return fields, tensors


def header_of_ours(path: Path) -> tuple[dict, list]:
    from verispec.model.gguf_header import Strings, read_header

    fields, tensors = read_header(path)
    fields = {k: v.count if isinstance(v, Strings) else list(v) if isinstance(v, np.ndarray) else v
              for k, v in fields.items()}
    return fields, [(t.name, t.dims, t.type, bytes(t.data)) for t in tensors]


@pytest.mark.parametrize("quant", ["F32", "Q4_1", "Q8_0"])
def test_the_header_reader_reads_what_the_gguf_package_reads(tmp_path, quant):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_uint32("test.count", 7)
    w.add_array("test.numbers", [1, 2, 3])
    w.add_array("test.words", ["a", "bc", "déf"])
    w.add_float32("test.real", 0.25)
    w.add_bool("test.flag", True)
    _finish(w)
    path = write_gguf(tmp_path / f"{quant}.gguf", tiny_hf_model("llama"), quant)
    for p in (tmp_path / "m.gguf", path):
        assert header_of_ours(p) == header_of_the_gguf_package(p)


def test_the_header_reader_reads_the_built_in_models_as_the_gguf_package_does():
    from verispec import hub

    paths = [hub.model_path(name) for name in hub.BUILTINS if hub.is_fetched(name)]
    if not paths:
        pytest.skip("no built-in model is cached")
    for path in paths:
        ours, theirs = header_of_ours(path), header_of_the_gguf_package(path)
        assert ours[0] == theirs[0]
        assert [t[:3] for t in ours[1]] == [t[:3] for t in theirs[1]]
        assert all(a[3][:4096] == b[3][:4096] for a, b in zip(ours[1], theirs[1])), "the same bytes"
