"""verispec's native CPU kernels (csrc/, C++ with AVX2/FMA intrinsics), bound through a C ABI with ctypes.

`pip install` builds them (setup.py) as the extension module verispec.model.native._native. They run
where the CPU has AVX2, FMA and F16C; `unavailable()` says why not elsewhere, and the torch backend
serves instead.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_float, c_int32, c_int64, c_void_p
from functools import cache

import numpy as np
import torch

from verispec.model.weights import Weight

NATIVE_TYPES = {0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30}  # F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K BF16
_threads_set = False


class Matrix(ctypes.Structure):
    _fields_ = [("data", c_void_p), ("type", c_int32), ("rows", c_int32), ("cols", c_int32), ("row_bytes", c_int64)]


class LayerWeights(ctypes.Structure):
    _fields_ = [(n, Matrix) for n in ("q", "k", "v", "o", "gate", "up", "down")] + [
        (n, POINTER(c_float)) for n in ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm",
                                        "post_mlp_norm", "q_bias", "k_bias", "v_bias", "rope_cos", "rope_sin")
    ] + [("window", c_int32)]


class Model(ctypes.Structure):
    _fields_ = [(n, c_int32) for n in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab",
                                       "activation")] + [
        (n, c_float) for n in ("eps", "embed_scale", "query_scale")
    ] + [("embed", Matrix), ("lm_head", Matrix), ("final_norm", POINTER(c_float)),
         ("layer", POINTER(LayerWeights))]


class Batch(ctypes.Structure):
    _fields_ = [("rows", c_int32), ("segments", c_int32), ("token_ids", POINTER(c_int32)),
                ("positions", POINTER(c_int32)), ("first_row", POINTER(c_int32)),
                ("k_cache", POINTER(c_void_p)), ("v_cache", POINTER(c_void_p)), ("stride", POINTER(c_int32)),
                ("outputs", c_int32), ("output_rows", POINTER(c_int32)), ("logits", POINTER(c_float)),
                ("int8", c_int32), ("parent", POINTER(c_int32)), ("slot", POINTER(c_int32)),
                ("captures", c_int32), ("capture_layers", POINTER(c_int32)), ("features", POINTER(c_float))]


@cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"this CPU lacks AVX2/FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
    try:
        from verispec.model.native import _native
    except ImportError as e:
        return None, f"the native extension was not built ({e}); reinstall verispec with a C++ compiler"
    lib = ctypes.CDLL(_native.__file__)
    lib.vs_forward.argtypes = [POINTER(Model), POINTER(Batch)]
    lib.vs_matmul.argtypes = [POINTER(Matrix), c_int32, c_void_p, c_void_p, c_int32]
    lib.vs_decode_rows.argtypes = [POINTER(Matrix), c_int32, c_int32, c_void_p]
    lib.vs_set_threads.argtypes = [c_int32]
    lib.vs_plant_order_bug.argtypes = [c_int32]
    lib.vs_set_wide.argtypes = [c_int32]
    return lib, None


def unavailable() -> str | None:
    """None where the native kernels can run here; otherwise why not."""
    return _load()[1]


def lib() -> ctypes.CDLL:
    found, why = _load()
    if found is None:
        raise RuntimeError(f"the native backend is unavailable: {why}")
    return found


def set_threads(n: int) -> None:
    """Threads of the kernels' pool (RuntimeConfig.threads; torch then keeps one, see ensure_threads)."""
    global _threads_set
    lib().vs_set_threads(n)
    _threads_set = True


def set_wide(on: bool) -> bool:
    """Use the 16-lane (AVX-512) exact kernels where the CPU has them (the default there); returns
    whether they are in use. The two widths round differently: a machine should keep one."""
    return bool(lib().vs_set_wide(int(on)))


def matrix(w: Weight) -> Matrix:
    """The C view of a weight; the caller keeps `w` alive while the view is used."""
    if int(w.type) not in NATIVE_TYPES:
        raise ValueError(f"{w.name}: no native kernel for {w.type.name}")
    return Matrix(w.data.ctypes.data, int(w.type), w.rows, w.cols, w.data.shape[1])


def float_ptr(t: torch.Tensor | None) -> ctypes._Pointer | None:
    if t is None:
        return None
    assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    return ctypes.cast(t.data_ptr(), POINTER(c_float))


def matmul(w: Weight, x: torch.Tensor, int8: bool = False) -> torch.Tensor:
    """x [M, cols] fp32 -> x W^T [M, rows] with the native kernels (exact or int8 activations)."""
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], w.rows)
    m = matrix(w)
    lib().vs_matmul(ctypes.byref(m), x.shape[0], x.data_ptr(), y.data_ptr(), int(int8))
    return y


def decode(w: Weight) -> torch.Tensor:
    """Every row of w as fp32 [rows, cols], decoded by the kernels' own readers."""
    out = torch.empty(w.rows, w.cols)
    m = matrix(w)
    lib().vs_decode_rows(ctypes.byref(m), 0, w.rows, out.data_ptr())
    return out


def int32_array(values: list[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int32)


def ensure_threads() -> None:
    """The pool gets torch's thread count unless set_threads chose one, and torch keeps one thread:
    beside the native kernels it only samples, and its own pool waiting on the cores that the kernels'
    workers hold made plain decoding 6x slower (12 against 72 tok/s, SmolLM2, 2 threads)."""
    if not _threads_set:
        set_threads(torch.get_num_threads())
    torch.set_num_threads(1)
