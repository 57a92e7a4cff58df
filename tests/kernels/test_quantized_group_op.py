"""``sparse_linear_int8_group`` / ``sparse_linear_int4_group``: one call equals the members' ops
concatenated, on the C++ route (threads split across members included) and the prefill route, and
bad operand lists are refused with the problem named."""

import os
import subprocess
import sys

import pytest
import torch

from wisparse_compile.kernels import (
    sparse_linear_int4,
    sparse_linear_int4_group,
    sparse_linear_int8,
    sparse_linear_int8_group,
)
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
from wisparse_compile.quantize import quantize_int4, quantize_int8

OUTS = (96, 33, 130)  # an odd int4 count (a spare nibble) and a partial 32-output block


def _members(fmt: str, k: int, seed: int = 0):
    """Three sibling weights with a mix of biases and thresholds (None: a dense member; inf: all pruned)."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, k, generator=g) for n in OUTS]
    quantized = [quantize_int8(w) if fmt == "int8" else quantize_int4(w) for w in weights]
    biases = [torch.randn(OUTS[0], generator=g), None, torch.randn(OUTS[2], generator=g)]
    thresholds = [torch.rand(k, generator=g), None, torch.full((k,), 0.7)]
    return quantized, biases, thresholds


def _group_and_members(fmt, x, quantized, biases, thresholds):
    qs, ss = [q for q, _ in quantized], [s for _, s in quantized]
    if fmt == "int8":
        group = sparse_linear_int8_group(x, qs, ss, biases, thresholds)
        members = [sparse_linear_int8(x, q, s, b, t) for q, s, b, t in zip(qs, ss, biases, thresholds)]
    else:
        group = sparse_linear_int4_group(x, qs, ss, list(OUTS), biases, thresholds)
        members = [sparse_linear_int4(x, q, s, n, b, t) for q, s, n, b, t in zip(qs, ss, OUTS, biases, thresholds)]
    return group, torch.cat(members, dim=-1)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 12])  # 12 > max_sparse_rows: the prefill route
def test_group_equals_its_members_concatenated(fmt, dtype, rows):
    assert cpu_kernel_available()
    quantized, biases, thresholds = _members(fmt, 200)
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(1)).to(dtype)
    biases = [b if b is None else b.to(dtype) for b in biases]  # a model's bias has its activations' dtype
    group, members = _group_and_members(fmt, x, quantized, biases, thresholds)
    assert group.shape == (rows, sum(OUTS)) and group.dtype == dtype
    torch.testing.assert_close(group, members, rtol=0, atol=0)  # one thread: the same sums in the same order


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_every_channel_pruned_leaves_the_bias(fmt):
    quantized, biases, _ = _members(fmt, 64)
    thresholds = [torch.full((64,), float("inf"))] * 3
    x = torch.randn(1, 64)
    group, members = _group_and_members(fmt, x, quantized, biases, thresholds)
    torch.testing.assert_close(group, members)
    assert torch.equal(group[0, : OUTS[0]], biases[0]) and torch.equal(group[0, OUTS[0] : OUTS[0] + OUTS[1]], torch.zeros(OUTS[1]))


def test_bad_operand_lists_are_refused_naming_the_problem():
    (q1, s1), (q2, s2), _ = _members("int8", 64)[0]
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="one entry per weight"):
        sparse_linear_int8_group(x, [q1, q2], [s1], [None, None], [None, None])
    with pytest.raises(RuntimeError, match="input has 64 channels, weight expects 32"):
        sparse_linear_int8_group(x, [q1, q2[:32].contiguous()], [s1, s2], [None, None], [None, None])
    with pytest.raises(RuntimeError, match="every weight must have 64 input channels"):
        torch.ops.wisparse_cpu.sparse_gemv_int8_group(x, [q1, q2[:32].contiguous()], [s1, s2], [None, None], [None, None])
    with pytest.raises(RuntimeError, match="one scale, bias \\(or None\\) and thresholds"):
        torch.ops.wisparse_cpu.sparse_gemv_int8_group(x, [q1, q2], [s1, s2], [None], [None, None])


_THREADED_CHECK = """
import torch
from tests.kernels.test_quantized_group_op import _group_and_members, _members
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
assert cpu_kernel_available()
torch.set_num_threads(3)
assert torch.ops.wisparse_cpu.parallel_threads(3) == 3
for fmt in ("int8", "int4"):
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 3):
            quantized, biases, thresholds = _members(fmt, 300, seed=rows)
            x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(2)).to(dtype)
            biases = [b if b is None else b.to(dtype) for b in biases]
            group, members = _group_and_members(fmt, x, quantized, biases, thresholds)
            tol = 1e-4 if dtype == torch.float32 else 2e-2  # the threads' partial sums add in another order
            torch.testing.assert_close(group.float(), members.float(), rtol=tol, atol=tol)
print("threaded ok")
"""


def test_group_split_between_threads_across_members():
    """WISPARSE_CPU_BYTES_PER_THREAD=1: three threads cut the kept rows of all three members by bytes,
    so pieces start and end inside members and a member's partials come from several threads."""
    env = {**os.environ, "WISPARSE_CPU_BYTES_PER_THREAD": "1"}
    done = subprocess.run([sys.executable, "-c", _THREADED_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "threaded ok" in done.stdout, done.stderr[-3000:]
