"""The ``wisparse::sparse_linear_group`` op: one call equals its members' ``sparse_linear`` calls
concatenated, for every layout and route: float siblings (per member on the CPU, one Triton launch
over a fused weight), int8/int4 siblings (one C++ call, threads split across members included; the
prefill route), and bad operand lists are refused with the problem named.

(The fused Triton GEMV itself, segments and all, is tested in test_triton_sparse_gemv.py.)"""

import os
import subprocess
import sys

import pytest
import torch

from tests.kernels.operands import assert_matches, sibling_operands
from wisparse_compile.kernels import (
    sparse_gemv_fused,
    sparse_linear,
    sparse_linear_group,
    sparse_linear_group_reference,
    sparse_linear_reference,
)
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
from wisparse_compile.passes.fuse_siblings import fused_weight
from wisparse_compile.quant.primitives import quantize_int4, quantize_int8


def _float_group(x, ws, bs, ts, fw=None, rows=8):
    return sparse_linear_group(x, ws, bs, ts, rows, "float", [None] * len(ws), [w.shape[0] for w in ws], fw)


def _float_reference(x, ws, bs, ts):
    return sparse_linear_group_reference(x.float(), [w.float() for w in ws], [b.float() if b is not None else None for b in bs], ts)


@pytest.mark.parametrize("rows", [1, 12])
def test_float_group_on_cpu_equals_its_members(rows):
    x, ws, bs, ts = sibling_operands(rows, (24, 8, 8), 40, torch.float32)
    for fw in (None, fused_weight(ws, (False,) * 3)):  # the CPU runs members one by one either way
        out = _float_group(x, ws, bs, ts, fw)
        single = torch.cat([torch.ops.wisparse.sparse_linear(x, w, b, t, 8) for w, b, t in zip(ws, bs, ts)], -1)
        torch.testing.assert_close(out, single, rtol=0, atol=0)
        torch.testing.assert_close(out, _float_reference(x, ws, bs, ts), rtol=1e-5, atol=1e-5)


def test_fused_gemv_equals_the_group_reference():
    """The one-launch Triton route (interpreter) and the per-sibling CPU route give the same result."""
    x, ws, bs, ts = sibling_operands(3, (24, 8, 8), 40, torch.float32)
    fw = fused_weight(ws, (False,) * 3)
    torch.testing.assert_close(sparse_gemv_fused(x, fw, bs, ts, [24, 8, 8]), _float_group(x, ws, bs, ts, fw), rtol=1e-5, atol=1e-5)


def test_group_rejects_a_fused_weight_that_does_not_fit():
    x, ws, bs, ts = sibling_operands(1, (8, 8), 16, torch.float32)
    with pytest.raises(RuntimeError, match="fused weight must be"):
        _float_group(x, ws, bs, ts, torch.zeros(15, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the compiled Triton kernel: needs CUDA")
@pytest.mark.parametrize("op", ["single", "group"])
def test_inductor_inlines_the_triton_kernel_on_gpu(op):
    """On a GPU the generated code launches our kernel itself (not an opaque op call), and runs.

    Without a GPU, test_inductor_codegen.py checks the generated code (codegen only)."""
    from torch._inductor.utils import run_and_get_code

    x, ws, bs, ts = sibling_operands(1, (64, 32), 128, torch.float16)
    x, ws, bs, ts = x.cuda(), [w.cuda() for w in ws], [b.cuda() if b is not None else None for b in bs], [t.cuda() for t in ts]
    fw = fused_weight(ws, (False, False))

    def fn(x):
        if op == "single":
            return torch.ops.wisparse.sparse_linear(x, ws[0], bs[0], ts[0], 8)
        return torch.ops.wisparse.sparse_linear_group(x, ws, bs, ts, 8, "float", [None, None], [64, 32], fw)

    out, codes = run_and_get_code(torch.compile(fn), x)
    code = "\n".join(codes)
    assert "_sparse_gemv_kernel" in code
    assert "torch.ops.wisparse" not in code
    ref = _float_reference(x, ws, bs, ts)[:, : out.shape[-1]]
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


# ---- quantized siblings: one C++ call over each member's own storage ----

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
    group = sparse_linear_group(x, qs, biases, thresholds, 8, fmt, ss, list(OUTS))
    members = [sparse_linear(x, q, b, t, 8, fmt, s, n) for q, s, n, b, t in zip(qs, ss, OUTS, biases, thresholds)]
    return group, torch.cat(members, dim=-1)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 12])  # 12 > max_sparse_rows: the prefill route
def test_quantized_group_equals_its_members_concatenated(fmt, dtype, rows):
    assert cpu_kernel_available()
    quantized, biases, thresholds = _members(fmt, 200)
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(1)).to(dtype)
    biases = [b if b is None else b.to(dtype) for b in biases]  # a model's bias has its activations' dtype
    group, members = _group_and_members(fmt, x, quantized, biases, thresholds)
    assert group.shape == (rows, sum(OUTS)) and group.dtype == dtype
    torch.testing.assert_close(group, members, rtol=0, atol=0)  # one thread: the same sums in the same order
    qs, ss = [q for q, _ in quantized], [s for _, s in quantized]
    reference = sparse_linear_group_reference(x.float(), qs, [b if b is None else b.float() for b in biases], thresholds,
                                              fmt, ss, list(OUTS))
    assert_matches(group, reference, dtype)


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
        sparse_linear_group(x, [q1, q2], [None, None], [None, None], 8, "int8", [s1], [96, 33])
    with pytest.raises(RuntimeError, match="input has 64 channels, weight expects 32"):
        sparse_linear_group(x, [q1, q2[:32].contiguous()], [None, None], [None, None], 8, "int8", [s1, s2], [96, 33])
    with pytest.raises(RuntimeError, match="a weight has 33 outputs, out_features says 34"):
        sparse_linear_group(x, [q1, q2], [None, None], [None, None], 8, "int8", [s1, s2], [96, 34])
    with pytest.raises(RuntimeError, match="every weight must have 64 input channels"):
        torch.ops.wisparse_cpu.sparse_gemv_int8_group(x, [q1, q2[:32].contiguous()], [s1, s2], [None, None], [None, None])
    with pytest.raises(RuntimeError, match="one scale, bias \\(or None\\) and thresholds"):
        torch.ops.wisparse_cpu.sparse_gemv_int8_group(x, [q1, q2], [s1, s2], [None], [None, None])


_THREADED_CHECK = """
import torch
from tests.kernels.test_group_op import _group_and_members, _members
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


def test_quantized_group_split_between_threads_across_members():
    """WISPARSE_CPU_BYTES_PER_THREAD=1: three threads cut the kept rows of all three members by bytes,
    so pieces start and end inside members and a member's partials come from several threads."""
    env = {**os.environ, "WISPARSE_CPU_BYTES_PER_THREAD": "1"}
    done = subprocess.run([sys.executable, "-c", _THREADED_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "threaded ok" in done.stdout, done.stderr[-3000:]
