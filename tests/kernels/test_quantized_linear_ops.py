"""``wisparse::sparse_linear`` on int8 and int4 weights (``layout="int8"``/``"int4"``) and their kernels against the
references, one test per concern over both weight formats (``FORMATS``): the C++ GEMV (every row
group size 8/4/1, 1-8 token rows, fp32 and bf16, sparse and dense, out not a multiple of the
vector steps or of int4's 32-output blocks, NaN input, bad operands, split across threads), the
prefill route and the route choice. Then what one format alone has: the Triton int8 GEMV under the
interpreter (one K slice and several, K/N not multiples of the blocks, 1-8 rows, dense), and int4's
output counts and group scales. (Routes, the int4 Triton route among them: test_sparse_kernels.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from tests.kernels.operands import assert_matches, linear_operands
from wisparse_compile.kernels import (
    Layout,
    Route,
    formats,
    route_of,
    sparse_gemv_int8,
    sparse_linear,
    sparse_linear_reference,
)
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
from wisparse_compile.kernels.triton_sparse_gemv import Launch
from wisparse_compile.quant.primitives import quantize_int4, quantize_int8


@dataclass(frozen=True)
class WeightFormat:
    """One weight format as the shared tests use it. A quantized weight travels as the tuple of the
    op's weight arguments: ``(codes, scales)`` for int8, ``(codes, scales, out_features)`` for int4
    (two outputs a byte: the codes alone do not say whether the last nibble is an output)."""

    name: str
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    kernel_name: str  # in torch.ops.wisparse_cpu, called (x, *weight, bias, thresholds)
    takes_out_features: bool
    wrong_codes: Callable[[torch.Tensor], torch.Tensor]  # the codes in a dtype this format refuses
    kernel_codes_error: str
    op_codes_error: str
    kernel_scale_error: str  # for scales cut to 5 input rows/entries, operands (1, 40, 24)
    op_scale_error: str  # the same, operands (4, 24, 32)

    def operands(self, m, n, k, sparsity, dtype, seed=0):
        """x, the weight tuple, bias and thresholds (None: dense)."""
        x, w, b, t = linear_operands(m, n, k, 0.0 if sparsity is None else sparsity, dtype, seed=seed)
        q, s = self.quantize(w.float())
        weight = (q, s, n) if self.takes_out_features else (q, s)
        return x, weight, b, (None if sparsity is None else t)

    def expected(self, x, weight, b, t):
        """The fp32 reference of (x, weight, b, t) in any dtype."""
        return self.reference(x.float(), *weight, None if b is None else b.float(), t)

    def kernel(self) -> Callable[..., torch.Tensor]:
        return getattr(torch.ops.wisparse_cpu, self.kernel_name)

    def op(self, x, q, s, *rest):
        """``sparse_linear`` on this layout, called as the kernel is: (x, q, s, [n,] bias, thresholds)."""
        *out_features, b, t = rest
        return sparse_linear(x, q, b, t, 8, self.name, s, *out_features)

    def reference(self, x, q, s, *rest):
        *out_features, b, t = rest
        return sparse_linear_reference(x, q, b, t, self.name, s, *out_features)

    def masked_dense(self, x, q, s, *rest):
        *out_features, b, t = rest
        return formats.masked_dense(x, q, b, t, Layout(self.name), s, *out_features)

    def route_of(self, x, rows):
        return route_of(x, x.new_empty(0, dtype=torch.int8 if self.name == "int8" else torch.uint8), self.name, rows)


FORMATS = {
    "int8": WeightFormat(
        "int8", quantize_int8, "sparse_gemv_int8", takes_out_features=False,
        wrong_codes=lambda q: q.float(),
        kernel_codes_error="contiguous int8 input-major weight", op_codes_error="expects an int8 \\[in, out\\] weight",
        kernel_scale_error="scale must have 40 entries", op_scale_error="scale must be 1-D of length 24",
    ),
    "int4": WeightFormat(
        "int4", quantize_int4, "sparse_gemv_int4", takes_out_features=True,
        wrong_codes=lambda q: q.to(torch.int8),
        kernel_codes_error="contiguous uint8 input-major codes", op_codes_error="packed uint8",
        kernel_scale_error="scale must be \\[24, 2\\]", op_scale_error="scale must be \\[32, 1\\]",
    ),
}


@pytest.fixture(params=list(FORMATS.values()), ids=list(FORMATS))
def fmt(request) -> WeightFormat:
    assert cpu_kernel_available(), "the C++ CPU kernel did not build on this machine"
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("sparsity", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("n,k", [(70, 45), (33, 130), (1041, 67), (40, 13), (96, 8), (200, 8), (15, 21)])
def test_cpu_kernel_matches_reference(fmt, dtype, m, sparsity, n, k):
    """k = 8, 13, 21, 45, 67, 130: eight-row groups, a four-row group and single rows all run. n past
    the 32-/16-wide vector steps runs the scalar tail; for int4, n = 96 is whole 32-output blocks,
    70/40/1041/33 end in a partial block (1041 and 33 odd: a spare nibble), 15 is a partial block alone."""
    x, w, b, t = fmt.operands(m, n, k, sparsity, dtype)
    out = fmt.kernel()(x, *w, b, t)
    assert_matches(out, fmt.expected(x, w, b, t), dtype)
    if sparsity == 1.0:
        assert torch.equal(out, b.expand(m, n))


def test_cpu_kernel_without_bias_and_nan_input(fmt):
    x, w, _b, t = fmt.operands(2, 40, 50, 0.5, torch.float32)
    x[0, 3] = float("nan")  # kept (mask.py), so its outputs are NaN in every route
    out = fmt.kernel()(x, *w, None, t)
    assert_matches(out, fmt.expected(x, w, None, t), torch.float32)
    assert out[0].isnan().all() and not out[1].isnan().any()


_THREADED_CHECK = """
import sys
import torch
from tests.kernels.test_quantized_linear_ops import FORMATS
from tests.kernels.operands import assert_matches
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
assert cpu_kernel_available()
fmt = FORMATS[sys.argv[1]]
torch.set_num_threads(3)
for dtype in (torch.float32, torch.bfloat16):
    for m, n, k, s in ((1, 70, 130, 0.3), (3, 1041, 67, None), (8, 33, 200, 0.5)):
        x, w, b, t = fmt.operands(m, n, k, s, dtype)
        assert_matches(fmt.kernel()(x, *w, b, t), fmt.expected(x, w, b, t), dtype)
print("threaded ok")
"""


def test_cpu_kernel_split_across_threads_matches_reference(fmt):
    """WISPARSE_CPU_BYTES_PER_THREAD=1 splits even small calls between threads (OpenMP: they run in parallel)."""
    env = {**os.environ, "WISPARSE_CPU_BYTES_PER_THREAD": "1"}
    done = subprocess.run([sys.executable, "-c", _THREADED_CHECK, fmt.name], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "threaded ok" in done.stdout, done.stderr[-3000:]


def test_cpu_kernel_rejects_bad_operands(fmt):
    x, w, b, t = fmt.operands(1, 40, 24, 0.5, torch.float32)
    q, s, *out_features = w
    kernel = fmt.kernel()
    with pytest.raises(RuntimeError, match=fmt.kernel_codes_error):
        kernel(x, fmt.wrong_codes(q), s, *out_features, b, t)
    with pytest.raises(RuntimeError, match=fmt.kernel_scale_error):
        kernel(x, q, s[:5].contiguous(), *out_features, b, t)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        kernel(torch.randn(9, 24), *w, b, t)
    with pytest.raises(RuntimeError, match="thresholds must have 24"):
        kernel(x, *w, b, t[:5])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel(x.half(), *w, b, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_routes_decode_to_kernel_and_prefill_to_masked_dense(fmt, dtype):
    x, w, b, t = fmt.operands(2, 40, 50, 0.5, dtype)
    assert fmt.route_of(x, 8) == Route.CPU_KERNEL
    assert fmt.route_of(x, 1) == Route.MASKED_DENSE
    assert fmt.route_of(x.half(), 8) == Route.MASKED_DENSE  # no fp16 CPU kernel
    assert_matches(fmt.op(x, *w, b, t), fmt.expected(x, w, b, t), dtype)
    prefill, *_ = fmt.operands(12, 40, 50, 0.5, dtype, seed=2)
    assert fmt.route_of(prefill, 8) == Route.MASKED_DENSE
    for thresholds in (t, None):
        ref = fmt.expected(prefill, w, b, thresholds)
        assert_matches(fmt.op(prefill, *w, b, thresholds), ref, dtype)
        assert_matches(fmt.masked_dense(prefill, *w, b, thresholds), ref, dtype)


def test_op_takes_leading_dims_and_checks_operands(fmt):
    x, w, b, t = fmt.operands(4, 24, 32, 0.5, torch.float32)
    q, s, *out_features = w
    x3 = x.reshape(2, 2, 32)
    assert_matches(fmt.op(x3, *w, b, t), fmt.expected(x, w, b, t).reshape(2, 2, 24), torch.float32)
    with pytest.raises(RuntimeError, match=fmt.op_codes_error):
        fmt.op(x, fmt.wrong_codes(q), s, *out_features, b, t)
    first_31_inputs = s[:31] if s.dim() == 2 else s  # int4 scales are per input channel too
    with pytest.raises(RuntimeError, match="input has 32 channels, weight expects 31"):
        fmt.op(x, q[:31].contiguous(), first_31_inputs, *out_features, b, t[:31])
    with pytest.raises(RuntimeError, match=fmt.op_scale_error):
        fmt.op(x, q, s[:5].contiguous(), *out_features, b, t)
    with pytest.raises(RuntimeError, match="thresholds must be 1-D of length 32"):
        fmt.op(x, *w, b, t[:5])


# ---- int4 alone: output counts, group scales ----

INT4 = FORMATS["int4"]


def test_int4_checks_the_output_count_and_the_group_scales():
    """Two outputs a byte and one scale per 32 outputs: the count and the groups must agree with the codes."""
    x, (q, s, n), b, t = INT4.operands(1, 40, 24, 0.5, torch.float32)
    kernel = INT4.kernel()
    with pytest.raises(RuntimeError, match="41 outputs need 21"):
        kernel(x, q, s, 41, b, t)
    with pytest.raises(RuntimeError, match="scale must be \\[24, 2\\]"):
        kernel(x, q, s[:, :1], n, b, t)
    x, (q, s, n), b, t = INT4.operands(4, 24, 32, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match="30 outputs take 15 bytes per row, the codes have 12"):
        INT4.op(x, q, s, 30, b, t)
    with pytest.raises(RuntimeError, match="scale must be \\[32, 1\\]"):
        INT4.op(x, q, s.t(), n, b, t)


# ---- int8 alone: the Triton GEMV (interpreter) ----

INT8 = FORMATS["int8"]
LAUNCHES = {"autotuned": None, "split3": Launch(block_n=32, block_k=32, split_k=3), "split5": Launch(16, 32, 5, 8)}


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_triton_int8_matches_reference(launch, dtype, m):
    """(97, 301): K and N not multiples of any block; split3/split5 run several K slices, each scaled."""
    x, w, b, t = INT8.operands(m, 97, 301, 0.5, dtype)
    out = sparse_gemv_int8(x, *w, b, t, launch=LAUNCHES[launch])
    assert_matches(out, INT8.expected(x, w, b, t), dtype)


@pytest.mark.parametrize("launch", ["autotuned", "split3"])
def test_triton_int8_dense_and_no_bias(launch):
    x, w, b, _t = INT8.operands(2, 70, 45, None, torch.float32)
    assert_matches(sparse_gemv_int8(x, *w, b, None, launch=LAUNCHES[launch]), INT8.expected(x, w, b, None), torch.float32)
    x, w, _b, t = INT8.operands(2, 70, 45, 0.5, torch.float32)
    assert_matches(sparse_gemv_int8(x, *w, None, t, launch=LAUNCHES[launch]), INT8.expected(x, w, None, t), torch.float32)


def test_triton_int8_rejects_a_row_major_weight():
    x, (q, s), b, t = INT8.operands(1, 24, 24, 0.5, torch.float32)
    with pytest.raises(ValueError, match="int8 \\[in, out\\]"):
        sparse_gemv_int8(x, q.t(), s, b, t)
