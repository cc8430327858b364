"""Random weights in every GGUF format the native kernels read, with sane scales."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import quantize

from verispec.model.weights import Weight

FORMATS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZABLE = {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}  # gguf.quants can quantize these; K formats: random blocks
SCALES = {Q.Q2_K: (80, 82), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of each block's float16 scales


def blocks(kind: str, values: np.ndarray, rng: np.random.Generator, scale: float = 1e-3) -> np.ndarray:
    """values [rows, cols] in format `kind` as bytes [rows, row bytes]: quantized where gguf.quants can,
    random blocks (random bits, float16 scales around `scale`) for the K formats."""
    t = Q[kind]
    rows, cols = values.shape
    if t == Q.F32:
        return values.astype(np.float32).view(np.uint8)
    if t == Q.F16:
        return values.astype(np.float16)
    if t == Q.BF16:
        return torch.from_numpy(values.astype(np.float32)).bfloat16().view(torch.uint8).numpy()
    if t in QUANTIZABLE:
        return quantize(values.astype(np.float32), t)
    block, block_bytes = GGML_QUANT_SIZES[t]
    data = rng.integers(0, 256, (rows * cols // block, block_bytes), dtype=np.uint8)
    for offset in SCALES[t]:
        d = (np.abs(rng.standard_normal(data.shape[0])) * scale + scale / 10).astype(np.float16)
        data[:, offset: offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def random_weight(kind: str, rows: int, cols: int, seed: int = 0) -> Weight:
    rng = np.random.default_rng(seed)
    return Weight.of(f"random {kind}", blocks(kind, rng.standard_normal((rows, cols)), rng), Q[kind], rows, cols)
