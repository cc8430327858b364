"""A weight matrix as it lies in its file: GGUF blocks or a safetensors dtype, never converted at load.

The native backend computes with the bytes as they are; the torch backend dequantizes them to fp32
(gguf.quants, the reference dequantizer). Vectors (norms, biases) are always fp32 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from verispec.errors import ModelLoadError

Q = GGMLQuantizationType
TORCH_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}
# where each block keeps its float16 scales (d, and the minimum or dmin where there is one)
SCALE_OFFSETS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
                 Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@dataclass(frozen=True)
class Weight:
    """data: uint8 [rows, row bytes], rows of `cols` weights of ggml `type` each (shape [rows, cols])."""

    name: str
    data: np.ndarray
    type: GGMLQuantizationType
    rows: int
    cols: int

    @classmethod
    def of(cls, name: str, data: np.ndarray, type: GGMLQuantizationType, rows: int, cols: int) -> Weight:
        """Check that the bytes hold whole blocks of this shape, then keep them as [rows, row bytes]."""
        block, block_bytes = GGML_QUANT_SIZES[type]
        if cols % block:
            raise ModelLoadError(f"tensor {name!r}: a row of {cols} weights is not a whole number of {type.name} "
                                 f"blocks of {block}")
        row_bytes = cols // block * block_bytes
        raw = np.asarray(data).view(np.uint8).reshape(-1)
        if raw.size != rows * row_bytes:
            raise ModelLoadError(f"tensor {name!r}: {raw.size} bytes where a {rows} x {cols} {type.name} tensor has "
                                 f"{rows * row_bytes} (truncated or corrupt file?)")
        weight = cls(name, raw.reshape(rows, row_bytes), type, rows, cols)
        weight._check_scales()
        return weight

    @classmethod
    def of_tensor(cls, name: str, t: torch.Tensor) -> Weight:
        """A safetensors matrix in its own dtype (f32, f16, bf16; others become f32)."""
        if t.dtype not in TORCH_TYPES:
            t = t.float()
        t = t.contiguous()
        return cls.of(name, t.view(torch.uint8).numpy(), TORCH_TYPES[t.dtype], t.shape[0], t.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self) -> torch.Tensor:
        """fp32 [rows, cols], as gguf.quants computes it."""
        values = dequantize(self.data, self.type)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(self.rows, self.cols))

    def take_rows(self, order: np.ndarray) -> Weight:
        """The same weight with its rows reordered (rows are whole blocks, so any format allows it)."""
        return Weight(self.name, np.ascontiguousarray(self.data[order]), self.type, self.rows, self.cols)

    def _check_scales(self) -> None:
        """A block whose float16 scale is NaN or infinite is corrupt: refuse it now, naming the tensor,
        instead of computing garbage later."""
        offsets = SCALE_OFFSETS.get(self.type)
        if offsets is None or self.data.size == 0:
            return
        _, block_bytes = GGML_QUANT_SIZES[self.type]
        blocks = self.data.reshape(-1, block_bytes)
        for offset in offsets:
            scales = np.ascontiguousarray(blocks[:, offset: offset + 2]).view(np.float16)
            bad = ~np.isfinite(scales)
            if bad.any():
                index = int(np.argmax(bad.reshape(-1)))
                row = index // (self.data.shape[1] // block_bytes)
                raise ModelLoadError(f"tensor {self.name!r}: block {index} (row {row}) "
                                     f"has a non-finite scale; the file is corrupt")
