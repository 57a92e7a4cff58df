"""The ``wisparse::sparse_linear_fused`` op: equal to the per-sibling ops on every route.

(The fused Triton GEMV itself, segments and all, is tested in test_triton_sparse_gemv.py.)"""

import pytest
import torch

from tests.kernels.operands import sibling_operands
from wisparse_compile.kernels import sparse_gemv_fused, sparse_linear_fused, sparse_linear_reference
from wisparse_compile.passes.fuse_siblings import fused_weight


def _reference(x, ws, bs, ts):
    return torch.cat([sparse_linear_reference(x.float(), w.float(), b.float() if b is not None else None, t)
                      for w, b, t in zip(ws, bs, ts)], dim=-1)


@pytest.mark.parametrize("rows", [1, 12])
def test_fused_op_on_cpu_equals_per_sibling_ops(rows):
    x, ws, bs, ts = sibling_operands(rows, (24, 8, 8), 40, torch.float32)
    out = sparse_linear_fused(x, ws, bs, ts, fused_weight(ws, (False,) * 3), 8)
    single = torch.cat([torch.ops.wisparse.sparse_linear(x, w, b, t, 8) for w, b, t in zip(ws, bs, ts)], -1)
    torch.testing.assert_close(out, single, rtol=0, atol=0)
    torch.testing.assert_close(out, _reference(x, ws, bs, ts), rtol=1e-5, atol=1e-5)


def test_fused_gemv_equals_fused_op_reference_route():
    """The one-launch Triton route (interpreter) and the per-sibling CPU route give the same result."""
    x, ws, bs, ts = sibling_operands(3, (24, 8, 8), 40, torch.float32)
    fw = fused_weight(ws, (False,) * 3)
    torch.testing.assert_close(
        sparse_gemv_fused(x, fw, bs, ts, [24, 8, 8]), sparse_linear_fused(x, ws, bs, ts, fw, 8), rtol=1e-5, atol=1e-5
    )


def test_fused_op_rejects_a_fused_weight_that_does_not_fit():
    x, ws, bs, ts = sibling_operands(1, (8, 8), 16, torch.float32)
    with pytest.raises(RuntimeError, match="fused weight must be"):
        sparse_linear_fused(x, ws, bs, ts, torch.zeros(15, 16), 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the compiled Triton kernel: needs CUDA")
@pytest.mark.parametrize("op", ["single", "fused"])
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
        return torch.ops.wisparse.sparse_linear_fused(x, ws, bs, ts, fw, 8)

    out, codes = run_and_get_code(torch.compile(fn), x)
    code = "\n".join(codes)
    assert "_sparse_gemv_kernel" in code
    assert "torch.ops.wisparse" not in code
    ref = _reference(x, ws, bs, ts)[:, : out.shape[-1]]
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)
