"""The Triton sparse GEMV (interpreter) and the registered op against the plain-torch reference."""

import pytest
import torch

from tests.helpers import sqnr_db
from wisparse_compile.kernels import keep_mask, sparse_gemv, sparse_linear, sparse_linear_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _operands(m, n, k, sparsity, dtype, input_major=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    norms = torch.rand(k, generator=g) + 0.5
    scores = x.abs().float() * norms
    if sparsity >= 1.0:
        t = torch.full((k,), float("inf"))
    elif sparsity == 0.0:
        t = torch.zeros(k)
    else:
        t = torch.quantile(scores.flatten(), sparsity) / norms
    if input_major:
        w = w.t().contiguous().t()
    return x, w, b, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n,k", [(70, 45), (33, 130)])
def test_kernel_matches_reference(dtype, m, sparsity, n, k):
    x, w, b, t = _operands(m, n, k, sparsity, dtype)
    out = sparse_gemv(x, w, b, t)
    ref = sparse_linear_reference(x.float(), w.float(), b.float(), t)
    assert out.dtype == dtype and out.shape == (m, n)
    err = (out.float() - ref).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(1.0, ref.abs().max().item()), err
    if sparsity == 1.0:
        torch.testing.assert_close(out.float(), b.float().expand(m, n), rtol=0, atol=TOLERANCE[dtype])
    else:
        assert sqnr_db(ref, out.float()) > {torch.float32: 100, torch.float16: 50, torch.bfloat16: 35}[dtype]


def test_kernel_reads_any_weight_layout_and_leading_dims():
    x, w, b, t = _operands(3, 40, 50, 0.5, torch.float32, input_major=False)
    x3 = x.reshape(3, 1, 50)
    out = sparse_gemv(x3, w, None, t)
    assert out.shape == (3, 1, 40)
    torch.testing.assert_close(out, sparse_linear_reference(x3, w, None, t), rtol=1e-5, atol=1e-5)


def test_kernel_really_prunes():
    """A pruned channel contributes nothing, even if its weight row is huge."""
    x = torch.tensor([[1.0, 0.01, -2.0]])
    w = torch.tensor([[1.0, 1e6, 1.0]])
    t = torch.tensor([0.5, 0.5, 0.5])
    assert sparse_gemv(x, w, None, t).item() == pytest.approx(-1.0)


def test_keep_rule_is_strict_greater():
    x = torch.tensor([0.5, -0.5, 0.6, 0.0])
    t = torch.tensor([0.5, 0.4, 0.7, 0.0])
    assert keep_mask(x, t).tolist() == [False, True, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_on_cpu_is_the_reference(dtype):
    x, w, b, t = _operands(2, 24, 40, 0.5, dtype)
    out = torch.ops.wisparse.sparse_linear(x, w, b, t, 8)  # decode-sized: the C++ kernel, fp32 accumulation
    ref = sparse_linear_reference(x.float(), w.float(), b.float(), t).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert sparse_linear is not None


def test_op_compiles_with_inductor_on_cpu():
    x, w, b, t = _operands(5, 24, 40, 0.5, torch.float32)
    fn = torch.compile(lambda x, w, b, t: torch.ops.wisparse.sparse_linear(x, w, b, t, 8), backend="inductor")
    torch.testing.assert_close(fn(x, w, b, t), sparse_linear_reference(x, w, b, t), rtol=1e-5, atol=1e-5)


def test_op_rejects_mismatched_operands():
    x, w, b, t = _operands(1, 24, 40, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.wisparse.sparse_linear(x[:, :30], w, b, t, 8)
    with pytest.raises(RuntimeError, match="thresholds"):
        torch.ops.wisparse.sparse_linear(x, w, b, t[:10], 8)
