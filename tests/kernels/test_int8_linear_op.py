"""``wisparse::sparse_linear_int8`` and its kernels against the reference: the C++ int8 GEMV (every
row group size, dtype, sparsity, dense, split across threads), the Triton int8 GEMV under the
interpreter (one K slice and several, K/N not multiples of the blocks, 1-8 rows, dense), the
prefill route, and the route choice."""

import os
import subprocess
import sys

import pytest
import torch

from tests.kernels.operands import assert_matches, linear_operands
from wisparse_compile.kernels import routing, route_of_int8, sparse_linear_int8, sparse_linear_int8_reference
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
from wisparse_compile.kernels.int8_linear_op import masked_dense_int8, sparse_gemv_int8
from wisparse_compile.kernels.triton_sparse_gemv import Launch
from wisparse_compile.quantize import quantize_int8

LAUNCHES = {"autotuned": None, "split3": Launch(block_n=32, block_k=32, split_k=3), "split5": Launch(16, 32, 5, 8)}


def int8_operands(m, n, k, sparsity, dtype, seed=0):
    """x, int8 codes [k, n], fp32 scales [n], bias and thresholds (None: dense)."""
    x, w, b, t = linear_operands(m, n, k, 0.0 if sparsity is None else sparsity, dtype, seed=seed)
    q, s = quantize_int8(w.float())
    return x, q, s, b, (None if sparsity is None else t)


def _reference(x, q, s, b, t):
    return sparse_linear_int8_reference(x.float(), q, s, None if b is None else b.float(), t)


@pytest.fixture(scope="module")
def kernel():
    assert cpu_kernel_available(), "the C++ CPU kernel did not build on this machine"
    return torch.ops.wisparse_cpu.sparse_gemv_int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("sparsity", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("n,k", [(70, 45), (33, 130), (1041, 67), (40, 13)])
def test_cpu_kernel_matches_reference(kernel, dtype, m, sparsity, n, k):
    """k = 13, 45, 67, 130: eight-row groups, a four-row group and single rows all run; n past the
    32-/16-wide vector steps runs the scalar tail."""
    x, q, s, b, t = int8_operands(m, n, k, sparsity, dtype)
    out = kernel(x, q, s, b, t)
    assert_matches(out, _reference(x, q, s, b, t), dtype)
    if sparsity == 1.0:
        assert torch.equal(out, b.expand(m, n))


def test_cpu_kernel_without_bias_and_nan_input(kernel):
    x, q, s, _b, t = int8_operands(2, 40, 50, 0.5, torch.float32)
    x[0, 3] = float("nan")  # kept (mask.py), so its outputs are NaN in every route
    out = kernel(x, q, s, None, t)
    assert_matches(out, _reference(x, q, s, None, t), torch.float32)
    assert out[0].isnan().all() and not out[1].isnan().any()


_THREADED_CHECK = """
import torch
from tests.kernels.test_int8_linear_op import int8_operands, _reference
from tests.kernels.operands import assert_matches
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
assert cpu_kernel_available()
torch.set_num_threads(3)
for dtype in (torch.float32, torch.bfloat16):
    for m, n, k, s in ((1, 70, 130, 0.3), (3, 1041, 67, None), (8, 33, 200, 0.5)):
        x, q, sc, b, t = int8_operands(m, n, k, s, dtype)
        assert_matches(torch.ops.wisparse_cpu.sparse_gemv_int8(x, q, sc, b, t), _reference(x, q, sc, b, t), dtype)
print("threaded ok")
"""


def test_cpu_kernel_split_across_threads_matches_reference(kernel):
    env = {**os.environ, "WISPARSE_CPU_BYTES_PER_THREAD": "1"}
    done = subprocess.run([sys.executable, "-c", _THREADED_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "threaded ok" in done.stdout, done.stderr[-3000:]


def test_cpu_kernel_rejects_bad_operands(kernel):
    x, q, s, b, t = int8_operands(1, 16, 24, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match="int8 input-major"):
        kernel(x, q.float(), s, b, t)
    with pytest.raises(RuntimeError, match="scale must have 16"):
        kernel(x, q, s[:8], b, t)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        kernel(torch.randn(9, 24), q, s, b, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_routes_decode_to_kernel_and_prefill_to_masked_dense(kernel, dtype):
    x, q, s, b, t = int8_operands(2, 40, 50, 0.5, dtype)
    assert route_of_int8(x, 8) == routing.CPU_KERNEL
    assert route_of_int8(x, 1) == routing.MASKED_DENSE
    assert route_of_int8(x.half(), 8) == routing.MASKED_DENSE  # no fp16 CPU kernel
    assert_matches(sparse_linear_int8(x, q, s, b, t), _reference(x, q, s, b, t), dtype)
    prefill, *_ = int8_operands(12, 40, 50, 0.5, dtype, seed=2)
    assert route_of_int8(prefill, 8) == routing.MASKED_DENSE
    for thresholds in (t, None):
        assert_matches(sparse_linear_int8(prefill, q, s, b, thresholds), _reference(prefill, q, s, b, thresholds), dtype)
        assert_matches(masked_dense_int8(prefill, q, s, b, thresholds), _reference(prefill, q, s, b, thresholds), dtype)


def test_op_takes_leading_dims_and_checks_operands(kernel):
    x, q, s, b, t = int8_operands(4, 24, 32, 0.5, torch.float32)
    x3 = x.reshape(2, 2, 32)
    assert_matches(sparse_linear_int8(x3, q, s, b, t), _reference(x, q, s, b, t).reshape(2, 2, 24), torch.float32)
    with pytest.raises(RuntimeError, match="int8"):
        sparse_linear_int8(x, q.float(), s, b, t)
    with pytest.raises(RuntimeError, match="input has 32 channels, weight expects 31"):
        sparse_linear_int8(x, q[:31].contiguous(), s, b, t[:31])
    with pytest.raises(RuntimeError, match="thresholds must be 1-D of length 32"):
        sparse_linear_int8(x, q, s, b, t[:5])


# ---- Triton (interpreter) ----

@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_triton_int8_matches_reference(launch, dtype, m):
    """(97, 301): K and N not multiples of any block; split3/split5 run several K slices, each scaled."""
    x, q, s, b, t = int8_operands(m, 97, 301, 0.5, dtype)
    out = sparse_gemv_int8(x, q, s, b, t, launch=LAUNCHES[launch])
    assert_matches(out, _reference(x, q, s, b, t), dtype)


@pytest.mark.parametrize("launch", ["autotuned", "split3"])
def test_triton_int8_dense_and_no_bias(launch):
    x, q, s, b, _t = int8_operands(2, 70, 45, None, torch.float32)
    assert_matches(sparse_gemv_int8(x, q, s, b, None, launch=LAUNCHES[launch]), _reference(x, q, s, b, None), torch.float32)
    x, q, s, _b, t = int8_operands(2, 70, 45, 0.5, torch.float32)
    assert_matches(sparse_gemv_int8(x, q, s, None, t, launch=LAUNCHES[launch]), _reference(x, q, s, None, t), torch.float32)


def test_triton_int8_rejects_a_row_major_weight():
    x, q, s, b, t = int8_operands(1, 24, 24, 0.5, torch.float32)
    with pytest.raises(ValueError, match="int8 \\[in, out\\]"):
        sparse_gemv_int8(x, q.t(), s, b, t)
