"""The ``wisparse::sparse_linear`` op on float weights: its routes honest under symbolic batch sizes,
and host code fit for CUDA graphs (no device-to-host sync on the decode route, no recompile on a
plan swap)."""

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.helpers import MaskingHooks
from tests.kernels.operands import linear_operands, sibling_operands
from wisparse_compile.kernels import keep_mask, sparse_linear, sparse_linear_reference
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
from wisparse_compile.passes.fuse_siblings import fused_weight

triton_route = sys.modules["wisparse_compile.kernels.triton_route"]


def test_keep_rule_is_strict_greater_and_keeps_nan():
    x = torch.tensor([0.5, -0.5, 0.6, 0.0, float("nan"), float("-inf")])
    t = torch.tensor([0.5, 0.4, 0.7, 0.0, 1e9, 1e9])
    assert keep_mask(x, t).tolist() == [False, True, False, False, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_on_cpu_matches_reference(dtype):
    x, w, b, t = linear_operands(2, 24, 40, 0.5, dtype)
    out = torch.ops.wisparse.sparse_linear(x, w, b, t, 8)  # decode-sized: the C++ kernel, fp32 accumulation
    ref = sparse_linear_reference(x.float(), w.float(), b.float(), t).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [2, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_nan_and_inf_rows_match_the_dense_op(rows, dtype):
    """Decode (C++ kernel) and prefill (masked dense) routes keep NaN and Inf as the dense op does."""
    x, w, b, t = linear_operands(rows, 24, 40, 0.5, dtype)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    t[3] = 1e9
    out = torch.ops.wisparse.sparse_linear(x, w, b, t, 8).float()
    dense = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert out[0].isnan().all() and dense[0].isnan().all()
    assert torch.equal(out[1].isinf(), dense[1].isinf()) and torch.equal(out[1].isnan(), dense[1].isnan())
    ref = sparse_linear_reference(x.float(), w.float(), b.float(), t).to(dtype).float()
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2, equal_nan=True)


def test_op_compiles_with_inductor_on_cpu():
    x, w, b, t = linear_operands(5, 24, 40, 0.5, torch.float32)
    fn = torch.compile(lambda x, w, b, t: torch.ops.wisparse.sparse_linear(x, w, b, t, 8), backend="inductor")
    torch.testing.assert_close(fn(x, w, b, t), sparse_linear_reference(x, w, b, t), rtol=1e-5, atol=1e-5)


def test_op_rejects_mismatched_operands():
    x, w, b, t = linear_operands(1, 24, 40, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.wisparse.sparse_linear(x[:, :30], w, b, t, 8)
    with pytest.raises(RuntimeError, match="thresholds must be 1-D"):
        torch.ops.wisparse.sparse_linear(x, w, b, t[:10], 8)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.wisparse.sparse_linear(x, w, b, (t * 100).to(torch.int64), 8)


class _CountKernelCalls(TorchFunctionMode):
    """Counts calls of the C++ kernel (its op overload) while compiled code runs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if "wisparse_cpu" in str(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not cpu_kernel_available(), reason="needs the C++ kernel built")
def test_symbolic_batch_keeps_the_cpu_kernel_and_recompiles_past_max_rows():
    """dynamic=True: batches 2 and 5 share one graph that calls the C++ kernel (guarded rows <= 8);
    a batch of 12 fails the guard and compiles the masked dense route."""
    x, w, b, t = linear_operands(12, 24, 40, 0.5, torch.float32)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append([tuple(e.shape) for e in example_inputs if isinstance(e, torch.Tensor)])
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    fn = torch.compile(lambda x: torch.ops.wisparse.sparse_linear(x, w, b, t, 8), backend=backend, dynamic=True)
    for rows, calls in ((2, 1), (5, 1), (12, 0)):
        with _CountKernelCalls() as seen:
            out = fn(x[:rows])
        assert seen.calls == calls, (rows, seen.calls)
        torch.testing.assert_close(out, sparse_linear_reference(x[:rows], w, b, t), rtol=1e-5, atol=1e-5)
    assert len(compiles) == 2  # one graph for rows <= 8, one for larger


@pytest.mark.skipif(not cpu_kernel_available(), reason="needs the C++ kernel built")
def test_compiled_decode_with_changing_batch_calls_the_cpu_kernel():
    """A tiny Llama decode step at batch 1, then 2 and 3 (automatic dynamic: a symbolic batch): every
    planned linear runs the C++ kernel in the dynamic graph too, matching the masked reference."""
    model = tiny_llama(layers=1)
    plan = wsc.calibrate(model, token_batches(1), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    wsc.attach(model, plan)
    compiled = torch.compile(model, backend="wisparse")
    codes = []
    with torch.no_grad():
        for batch in (1, 2, 3):
            ids = torch.randint(0, 256, (batch, 1), generator=torch.Generator().manual_seed(batch))
            out, code = _run_and_get_new_code(lambda: compiled(ids).logits)
            codes.append(code)
            with MaskingHooks(model, plan.channel_thresholds):
                ref = model(ids).logits
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert [c.count("torch.ops.wisparse_cpu.sparse_gemv.default(") for c in codes] == [7, 7, 0]  # batch 3: no recompile
    assert "s0" in codes[1] and "s0" not in codes[0]  # the second graph has a symbolic batch


def _run_and_get_new_code(fn):
    """``fn()`` and the code Inductor generated meanwhile ("" if nothing compiled); unlike
    ``run_and_get_code`` it keeps Dynamo's caches, so a reused graph shows as no code."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = fn()
    return out, "\n".join(codes)


class NoHostSync(TorchFunctionMode):
    """Fails on any call that reads a device value on the host (CUDA-graph capture forbids them)."""

    SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy", "any", "all"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS and not (name in ("any", "all") and kwargs and "dim" in kwargs):
            raise AssertionError(f"host sync on the decode route: {func}")
        return func(*args, **(kwargs or {}))


class _RecordingLauncher:
    """Stands in for ``wrap_triton``: records the launch and runs nothing (host code only)."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, len(args)))


def test_triton_decode_route_host_code_never_syncs(monkeypatch):
    """The op's host code on the Triton route (operand checks, config choice, output and
    workspace allocation, the planes' sum) reads no device value: single and fused."""
    launcher = _RecordingLauncher()
    monkeypatch.setattr(triton_route, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.library, "wrap_triton", launcher)
    x, w, b, t = linear_operands(3, 4096, 2048, 0.5, torch.float16)  # split-K > 1 (workspace route)
    xs, ws, bs, ts = sibling_operands(2, (64, 32, 32), 48, torch.float16)
    fw = fused_weight(ws, (False,) * 3)
    with NoHostSync():
        out = torch.ops.wisparse.sparse_linear(x, w, b, t, 8)
        fused = torch.ops.wisparse.sparse_linear_group(xs, ws, bs, ts, 8, "float", [None] * 3, [64, 32, 32], fw)
    assert out.shape == (3, 4096) and fused.shape == (2, 128)
    assert len(launcher.launches) == 2


def test_sync_detector_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"):
        with NoHostSync():
            torch.tensor([1, 2]).tolist()


@pytest.mark.skipif(not cpu_kernel_available(), reason="needs the C++ kernel built")
def test_plan_swap_compiles_nothing_and_uses_the_new_thresholds():
    """Thresholds are graph inputs: attaching another plan to a compiled model re-runs the same graph
    (no recompile, so a CUDA graph needs no re-record) with the new plan's thresholds (none stale)."""
    from torch._dynamo.utils import counters

    model = tiny_llama(layers=1)
    batches = token_batches(1)
    plans = [wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=s, method="teal")) for s in (0.3, 0.7)]
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(5))
    wsc.attach(model, plans[0])
    compiled = torch.compile(model, backend="wisparse")
    with torch.no_grad():
        compiled(ids)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1  # the counter sees compiles
        for plan in (plans[1], plans[0], plans[1]):
            wsc.attach(model, plan)
            out = compiled(ids).logits
            with MaskingHooks(model, plan.channel_thresholds):
                ref = model(ids).logits
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs
