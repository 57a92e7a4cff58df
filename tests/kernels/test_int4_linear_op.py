"""``wisparse::sparse_linear_int4`` and its C++ kernel against the reference: every row group size
(8/4/1), 1-8 token rows, fp32 and bf16, sparse and dense, out not a multiple of the 32-output block
(the scalar tail, odd counts with a spare nibble), NaN input, bad operands, split across threads;
the prefill route and the route choice (no Triton int4 kernel: Triton devices take masked dense)."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from tests.kernels.operands import assert_matches, linear_operands
from wisparse_compile.kernels import int4_linear_op, routing, route_of_int4, sparse_linear_int4, sparse_linear_int4_reference
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
from wisparse_compile.kernels.int4_linear_op import masked_dense_int4
from wisparse_compile.quantize import quantize_int4


def int4_operands(m, n, k, sparsity, dtype, seed=0):
    """x, packed codes [k, ceil(n/2)], fp32 scales [k, ceil(n/32)], bias and thresholds (None: dense)."""
    x, w, b, t = linear_operands(m, n, k, 0.0 if sparsity is None else sparsity, dtype, seed=seed)
    q, s = quantize_int4(w.float())
    return x, q, s, b, (None if sparsity is None else t)


def _reference(x, q, s, n, b, t):
    return sparse_linear_int4_reference(x.float(), q, s, n, None if b is None else b.float(), t)


@pytest.fixture(scope="module")
def kernel():
    assert cpu_kernel_available(), "the C++ CPU kernel did not build on this machine"
    return torch.ops.wisparse_cpu.sparse_gemv_int4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("sparsity", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("n,k", [(70, 45), (33, 130), (1041, 67), (40, 13), (96, 8), (200, 8), (15, 21)])
def test_cpu_kernel_matches_reference(kernel, dtype, m, sparsity, n, k):
    """k = 8, 13, 21, 45, 67, 130: eight-row groups, a four-row group and single rows all run; n =
    96 is whole 32-output blocks, 70/40/1041/33 end in a partial block (1041 and 33 odd: a spare
    nibble), 15 is a partial block alone."""
    x, q, s, b, t = int4_operands(m, n, k, sparsity, dtype)
    out = kernel(x, q, s, n, b, t)
    assert_matches(out, _reference(x, q, s, n, b, t), dtype)
    if sparsity == 1.0:
        assert torch.equal(out, b.expand(m, n))


def test_cpu_kernel_without_bias_and_nan_input(kernel):
    x, q, s, _b, t = int4_operands(2, 40, 50, 0.5, torch.float32)
    x[0, 3] = float("nan")  # kept (mask.py), so its outputs are NaN in every route
    out = kernel(x, q, s, 40, None, t)
    assert_matches(out, _reference(x, q, s, 40, None, t), torch.float32)
    assert out[0].isnan().all() and not out[1].isnan().any()


_THREADED_CHECK = """
import torch
from tests.kernels.test_int4_linear_op import int4_operands, _reference
from tests.kernels.operands import assert_matches
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
assert cpu_kernel_available()
torch.set_num_threads(3)
for dtype in (torch.float32, torch.bfloat16):
    for m, n, k, s in ((1, 70, 130, 0.3), (3, 1041, 67, None), (8, 33, 200, 0.5)):
        x, q, sc, b, t = int4_operands(m, n, k, s, dtype)
        assert_matches(torch.ops.wisparse_cpu.sparse_gemv_int4(x, q, sc, n, b, t), _reference(x, q, sc, n, b, t), dtype)
print("threaded ok")
"""


def test_cpu_kernel_split_across_threads_matches_reference(kernel):
    env = {**os.environ, "WISPARSE_CPU_BYTES_PER_THREAD": "1"}
    done = subprocess.run([sys.executable, "-c", _THREADED_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "threaded ok" in done.stdout, done.stderr[-3000:]


def test_cpu_kernel_rejects_bad_operands(kernel):
    x, q, s, b, t = int4_operands(1, 40, 24, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous uint8 input-major codes"):
        kernel(x, q.to(torch.int8), s, 40, b, t)
    with pytest.raises(RuntimeError, match="41 outputs need 21"):
        kernel(x, q, s, 41, b, t)
    with pytest.raises(RuntimeError, match="scale must be \\[24, 2\\]"):
        kernel(x, q, s[:, :1], 40, b, t)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        kernel(torch.randn(9, 24), q, s, 40, b, t)
    with pytest.raises(RuntimeError, match="thresholds must have 24"):
        kernel(x, q, s, 40, b, t[:5])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel(x.half(), q, s, 40, b, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_routes_decode_to_kernel_and_prefill_to_masked_dense(kernel, dtype):
    x, q, s, b, t = int4_operands(2, 40, 50, 0.5, dtype)
    assert route_of_int4(x, 8) == routing.CPU_KERNEL
    assert route_of_int4(x, 1) == routing.MASKED_DENSE
    assert route_of_int4(x.half(), 8) == routing.MASKED_DENSE  # no fp16 CPU kernel
    assert_matches(sparse_linear_int4(x, q, s, 40, b, t), _reference(x, q, s, 40, b, t), dtype)
    prefill, *_ = int4_operands(12, 40, 50, 0.5, dtype, seed=2)
    assert route_of_int4(prefill, 8) == routing.MASKED_DENSE
    for thresholds in (t, None):
        ref = _reference(prefill, q, s, 40, b, thresholds)
        assert_matches(sparse_linear_int4(prefill, q, s, 40, b, thresholds), ref, dtype)
        assert_matches(masked_dense_int4(prefill, q, s, 40, b, thresholds), ref, dtype)


def test_triton_devices_take_masked_dense_and_say_so_once(kernel, monkeypatch, caplog):
    """No Triton int4 kernel: where the int8 op would take its Triton GEMV, int4 masks and runs dense."""
    x, *_ = int4_operands(1, 40, 50, 0.5, torch.float32)
    monkeypatch.setattr(int4_linear_op, "route_by_device", lambda *a: routing.TRITON)
    monkeypatch.setattr(int4_linear_op, "_logged_no_triton", set())
    with caplog.at_level(logging.WARNING, logger="wisparse_compile.kernels.int4_linear_op"):
        assert route_of_int4(x, 8) == routing.MASKED_DENSE
        assert route_of_int4(x, 8) == routing.MASKED_DENSE
    assert caplog.text.count("no Triton int4 kernel exists yet") == 1


def test_op_takes_leading_dims_and_checks_operands(kernel):
    x, q, s, b, t = int4_operands(4, 24, 32, 0.5, torch.float32)
    x3 = x.reshape(2, 2, 32)
    assert_matches(sparse_linear_int4(x3, q, s, 24, b, t), _reference(x, q, s, 24, b, t).reshape(2, 2, 24), torch.float32)
    with pytest.raises(RuntimeError, match="packed uint8"):
        sparse_linear_int4(x, q.to(torch.int8), s, 24, b, t)
    with pytest.raises(RuntimeError, match="30 outputs take 15 bytes per row, the codes have 12"):
        sparse_linear_int4(x, q, s, 30, b, t)
    with pytest.raises(RuntimeError, match="input has 32 channels, weight expects 31"):
        sparse_linear_int4(x, q[:31].contiguous(), s[:31], 24, b, t[:31])
    with pytest.raises(RuntimeError, match="scale must be \\[32, 1\\]"):
        sparse_linear_int4(x, q, s.t(), 24, b, t)
    with pytest.raises(RuntimeError, match="thresholds must be 1-D of length 32"):
        sparse_linear_int4(x, q, s, 24, b, t[:5])
