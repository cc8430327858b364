"""The native kernels against references: every format's reader against gguf.quants' dequantizer,
y = x W^T against dequantize-then-matmul, and bitwise row invariance in both activation modes."""

from __future__ import annotations

import pytest
import torch

from quant import FORMATS, random_weight
from verispec.model import native

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"native kernels: {native.unavailable()}")

# K formats need whole 256-weight blocks per row; 37 outputs is odd on purpose (column tiles' edges)
ROWS, COLS = 37, 512
MODES = [False, True]  # exact, int8


@pytest.fixture(params=FORMATS)
def weight(request):
    return random_weight(request.param, ROWS, COLS, seed=FORMATS.index(request.param))


@pytest.fixture(params=["avx2", "avx512"], autouse=True)
def width(request):
    """Every test on both widths of the exact kernels: 8 lanes (AVX2), and 16 (AVX-512) where the CPU
    has it; the CPU's own choice is restored after."""
    default = native.set_wide(True)
    if request.param == "avx512" and not default:
        pytest.skip("this CPU has no AVX-512")
    native.set_wide(request.param == "avx512")
    yield request.param
    native.set_wide(default)


def test_readers_equal_the_reference_dequantizer_bitwise(weight):
    assert torch.equal(native.decode(weight), weight.dequantize())


@pytest.mark.parametrize("rows", [1, 8, 16, 24, 40],
                         ids=["one row", "decoded tiles", "chunks of tiles", "chunks of tiles at most", "decoded panel"])
def test_exact_kernels_read_every_weight_as_the_reference_dequantizer(weight, rows):
    """One-hot rows pick single weights out exactly (w * 1 plus zeros), so each kernel path's own
    decoding (registers per tile, a panel beyond) is compared bitwise, not within a tolerance."""
    eye = torch.eye(COLS)
    picked = torch.cat([native.matmul(weight, eye[m: m + rows]) for m in range(0, COLS, rows)])
    assert torch.equal(picked, weight.dequantize().T)


def test_exact_matmul_matches_dequantize_then_matmul(weight):
    x = torch.randn(40, COLS, generator=torch.Generator().manual_seed(1))
    reference = (x.double() @ weight.dequantize().double().T)
    for m in range(1, 41):
        got = native.matmul(weight, x[:m])
        assert (got.double() - reference[:m]).abs().max() <= 1e-5 * reference.abs().max(), f"{m} rows"


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 kernels see it: per row and group of 32, d = max|x| / 127 and q = round(x / d)
    (to nearest even, through x * (1 / d) in float32), back as d * q."""
    g = x.reshape(x.shape[0], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    q = torch.round(g * torch.where(d == 0, 0, 1 / d))
    return (q.double() * d.double()).reshape(x.shape)


@pytest.mark.parametrize("cols", [COLS, 480], ids=["even groups", "odd groups"])
def test_int8_matmul_is_the_dot_of_the_weights_and_quantized_activations(weight, cols):
    """Per group the kernels take an integer dot and scale it: in exact arithmetic that is
    sum_k w_k * d q_k, so they equal it up to float32 rounding (a wrong scale or lane is far off).
    F32, F16 and BF16 weights keep the activations as they are."""
    if cols != COLS:
        if weight.type.name.endswith("_K"):
            pytest.skip("K formats need whole 256-weight blocks")
        weight = random_weight(weight.type.name, ROWS, cols, seed=7)
    x = torch.randn(20, cols, generator=torch.Generator().manual_seed(2))
    seen = quantized_activations(x) if weight.type.name[0] == "Q" else x.double()
    w = weight.dequantize().double()
    reference, scale = seen @ w.T, seen.abs() @ w.abs().T
    for m in (1, 2, 5, 16, 20):
        got = native.matmul(weight, x[:m], int8=True).double()
        assert ((got - reference[:m]).abs() <= 1e-5 * scale[:m]).all(), f"{m} rows"


def rows_alone_equal_rows_together(weight, int8: bool) -> bool:
    x = torch.randn(40, COLS, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([native.matmul(weight, x[i: i + 1], int8) for i in range(40)])
    return all(torch.equal(native.matmul(weight, x[:m], int8), alone[:m]) for m in range(1, 41))


@pytest.mark.parametrize("int8", MODES, ids=["exact", "int8"])
def test_rows_are_invariant_bitwise(weight, int8):
    assert rows_alone_equal_rows_together(weight, int8)


@pytest.mark.parametrize("int8", MODES, ids=["exact", "int8"])
def test_a_planted_order_change_fails_the_invariance_check(int8):
    """Negative control: the kernels with groups summed in reverse for tiles of several rows."""
    weight = random_weight("Q4_1", ROWS, COLS)
    native.lib().vs_plant_order_bug(1)
    try:
        assert not rows_alone_equal_rows_together(weight, int8)
    finally:
        native.lib().vs_plant_order_bug(0)
    assert rows_alone_equal_rows_together(weight, int8)


def test_threads_do_not_change_results():
    weight = random_weight("Q4_K", 300, 512)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(4))
    native.set_threads(1)
    one = native.matmul(weight, x)
    native.set_threads(2)
    assert torch.equal(native.matmul(weight, x), one)

