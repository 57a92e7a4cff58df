"""The fused (multi-segment) Triton sparse GEMV under the interpreter, and the fused op's routes."""

import pytest
import torch

from wisparse_compile.kernels import sparse_gemv_fused, sparse_linear_fused, sparse_linear_reference
from wisparse_compile.kernels.sparse_gemv import autotune_configs, sparse_gemv_into
from wisparse_compile.passes.fuse_siblings import fused_weight

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _siblings(m, splits, k, dtype, sparsity=0.5, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    ws, bs, ts = [], [], []
    for i, n in enumerate(splits):
        w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
        norms = w.float().norm(dim=0)
        # weight-aware thresholds: a different mask per sibling
        t = torch.quantile((x.abs().float() * norms).flatten(), sparsity) / norms
        ws.append(w.t().contiguous().t())
        bs.append(torch.randn(n, generator=g).to(dtype) if bias and i != 1 else None)
        ts.append(t)
    return x, ws, bs, ts


def _reference(x, ws, bs, ts):
    return torch.cat([sparse_linear_reference(x.float(), w.float(), b.float() if b is not None else None, t)
                      for w, b, t in zip(ws, bs, ts)], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("splits", [(70,), (40, 24, 24), (70, 70), (16, 16, 16, 30)])  # (70,): plain GEMV
def test_fused_kernel_matches_per_sibling_reference(dtype, m, splits):
    x, ws, bs, ts = _siblings(m, splits, 96, dtype)
    masks = [(x.abs().float() > t) for t in ts]
    assert len(ts) == 1 or not torch.equal(masks[0], masks[1])  # the siblings really prune differently
    out = sparse_gemv_fused(x, fused_weight(ws, (False,) * len(ws)), bs, ts, list(splits))
    ref = _reference(x, ws, bs, ts)
    assert out.dtype == dtype and out.shape == (m, sum(splits))
    err = (out.float() - ref).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(1.0, ref.abs().max().item()), err


def test_fused_kernel_union_of_masks_loads_row_each_segment_masks_its_own():
    """Channel 0 is kept by sibling 0 only: sibling 1 must not see it even though its row is loaded."""
    x = torch.tensor([[1.0, 2.0]])
    ws = [torch.tensor([[1.0, 10.0]]), torch.tensor([[100.0, 1.0]])]
    ts = [torch.tensor([0.5, 0.5]), torch.tensor([1.5, 0.5])]
    out = sparse_gemv_fused(x, fused_weight(ws, (False, False)), [None, None], ts, [1, 1])
    assert out.tolist() == [[21.0, 2.0]]


def test_bad_splits_name_the_problem():
    x, ws, bs, ts = _siblings(1, (8, 8), 16, torch.float32)
    out = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="threshold tensors for output splits"):
        sparse_gemv_into(x, fused_weight(ws, (False, False)), ts[:1], out, lambda k: k, splits=[8, 8])


def test_interpreter_uses_one_autotune_config():
    assert len(autotune_configs()) == 1


@pytest.mark.parametrize("rows", [1, 12])
def test_fused_op_on_cpu_equals_per_sibling_ops(rows):
    x, ws, bs, ts = _siblings(rows, (24, 8, 8), 40, torch.float32)
    out = sparse_linear_fused(x, ws, bs, ts, fused_weight(ws, (False,) * 3), 8)
    single = torch.cat([torch.ops.wisparse.sparse_linear(x, w, b, t, 8) for w, b, t in zip(ws, bs, ts)], -1)
    torch.testing.assert_close(out, single, rtol=0, atol=0)
    torch.testing.assert_close(out, _reference(x, ws, bs, ts), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the compiled Triton kernel: needs CUDA")
@pytest.mark.parametrize("op", ["single", "fused"])
def test_inductor_inlines_the_triton_kernel_on_gpu(op):
    """On a GPU the generated code launches our kernel itself (not an opaque op call), and runs.

    Without a GPU, test_inductor_codegen.py checks the generated code (codegen only)."""
    from torch._inductor.utils import run_and_get_code

    x, ws, bs, ts = _siblings(1, (64, 32), 128, torch.float16)
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
