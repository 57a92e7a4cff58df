"""The C++ CPU sparse GEMV against the reference, its routing in compiled models, its build cache
key, and its fallback where no compiler exists."""

import logging
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.overrides import TorchFunctionMode

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.helpers import MaskingHooks
from tests.kernels.operands import linear_operands as _operands
from wisparse_compile.kernels import cpu_sparse_gemv as cpu_kernel
from wisparse_compile.kernels import Layout, formats, sparse_linear, sparse_linear_reference
from wisparse_compile.kernels.cpu_sparse_gemv import (
    cpu_kernel_available,
    extension_name,
    input_major_gemm_is_slow,
    uses_cpu_kernel,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def kernel():
    """The built kernel (a one-time ~45 s build, cached by torch across runs)."""
    assert cpu_kernel_available(), "the C++ CPU kernel did not build on this machine"
    return torch.ops.wisparse_cpu.sparse_gemv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n,k", [(70, 45), (33, 130), (1041, 67)])
def test_kernel_matches_reference(kernel, dtype, m, sparsity, n, k):
    x, w, b, t = _operands(m, n, k, sparsity, dtype)
    out = kernel(x, w.t(), b, t)
    ref = sparse_linear_reference(x.float(), w.float(), b.float(), t)
    assert out.dtype == dtype and out.shape == (m, n)
    # bf16: the kernel accumulates in fp32 like the reference; only the final rounding differs
    torch.testing.assert_close(out.float(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    if sparsity == 1.0:
        torch.testing.assert_close(out.float(), b.float().expand(m, n).to(dtype).float(), rtol=0, atol=0)


_THREADED_CHECK = """
import torch
from tests.kernels.operands import linear_operands as _operands
from wisparse_compile.kernels import sparse_linear_reference
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
assert cpu_kernel_available()
torch.set_num_threads(3)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
    for m, n, k in ((1, 70, 130), (3, 1041, 67), (8, 33, 200)):
        x, w, b, t = _operands(m, n, k, 0.3, dtype)
        out = torch.ops.wisparse_cpu.sparse_gemv(x, w.t(), b, t)
        ref = sparse_linear_reference(x.float(), w.float(), b.float(), t)
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
print("threaded ok")
"""


def test_kernel_split_across_threads_matches_reference(kernel):
    """WISPARSE_CPU_BYTES_PER_THREAD=1 splits even small calls between threads (one partial each)."""
    import os
    import subprocess

    env = {**os.environ, "WISPARSE_CPU_BYTES_PER_THREAD": "1"}
    done = subprocess.run([sys.executable, "-c", _THREADED_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "threaded ok" in done.stdout, done.stderr[-3000:]


def test_kernel_splits_really_run_on_several_threads(kernel):
    """The extension is built with OpenMP: without it ATen's parallel_for is a serial loop and a
    "split" call ran its chunks one after another (the C++ kernel was single-threaded until session 7)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.wisparse_cpu.parallel_threads(4) == 2
        assert torch.ops.wisparse_cpu.parallel_threads(1) == 1
    finally:
        torch.set_num_threads(threads)


def test_build_without_openmp_falls_back_to_one_thread(monkeypatch, caplog):
    """A toolchain without OpenMP (clang lacking libomp) builds the kernel again without it, and says so."""
    import torch.utils.cpp_extension as cpp_extension

    builds = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, **kwargs):
        builds.append((name, tuple(extra_cflags), tuple(extra_ldflags)))
        if "-fopenmp" in extra_ldflags:
            raise RuntimeError("ld: library not found for -lomp")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        cpu_kernel._build()
    assert [b[1:] for b in builds] == [(cpu_kernel.CFLAGS + ("-fopenmp",), ("-fopenmp",)), (cpu_kernel.CFLAGS, ())]
    assert builds[0][0] != builds[1][0]  # two cache entries, never one binary for both flag sets
    assert "single-threaded" in caplog.text


def test_kernel_threshold_rule_and_per_row_masks(kernel):
    """Kept iff |x| > t strictly (fp32); each row uses its own mask even when another row keeps a channel."""
    x = torch.tensor([[0.5, 2.0, -3.0], [1.0, 0.1, -0.5]])
    w = torch.tensor([[1.0, 10.0, 100.0]])
    t = torch.tensor([0.5, 0.5, 0.5])
    out = kernel(x, w.t().contiguous(), None, t)
    assert out[:, 0].tolist() == [20.0 - 300.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [16, 37, 64])
def test_one_row_scan_keeps_exactly_the_mask_rule(kernel, dtype, k):
    """A single row takes the vectorised scan (16 channels per step, scalar tail): |x| == t is pruned,
    NaN kept (the output goes NaN as in the dense op), -Inf kept, NaN thresholds prune; both kernels."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, k, generator=g).to(dtype)
    t = x.abs().float()[0].clone()
    t[::3] = 0.0  # every third channel kept, the others exactly at threshold: pruned
    t[1] = float("nan")
    x[0, 2], t[2] = -float("inf"), 1.0  # kept
    w = (torch.randn(20, k, generator=g) / k**0.5).to(dtype).t().contiguous().t()
    b = torch.randn(20, generator=g).to(dtype)
    for nan_at in (None, k - 2):
        xi = x.clone()
        if nan_at is not None:
            xi[0, nan_at] = float("nan")
        out = kernel(xi, w.t(), b, t).float()
        ref = sparse_linear_reference(xi.float(), w.float(), b.float(), t).to(dtype).float()
        torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], equal_nan=True)
        assert out.isnan().all() == (nan_at is not None)
    # the int8 kernel shares the scan: finite row, kept set = every third channel
    from wisparse_compile.quant.primitives import quantize_int8

    q, s = quantize_int8(w.float())
    xf = x.clone()
    xf[0, 2] = 0.0
    out8 = torch.ops.wisparse_cpu.sparse_gemv_int8(xf, q, s, b, t).float()
    ref8 = sparse_linear_reference(xf.float(), q, b.float(), t, "int8", s).to(dtype).float()
    torch.testing.assert_close(out8, ref8, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_op_routes_decode_to_kernel_and_prefill_to_reference(kernel):
    x, w, b, t = _operands(2, 40, 50, 0.5, torch.float32)
    assert uses_cpu_kernel(x, w, max_sparse_rows=8)
    assert not uses_cpu_kernel(torch.randn(9, 50), w, max_sparse_rows=8)  # prefill
    assert not uses_cpu_kernel(x, w, max_sparse_rows=1)
    assert not uses_cpu_kernel(x.half(), w.half(), max_sparse_rows=8)  # fp16: no CPU kernel
    torch.testing.assert_close(sparse_linear(x, w, b, t), sparse_linear_reference(x, w, b, t))


def test_output_major_weight_takes_reference_route_and_logs(kernel, caplog):
    x, w, b, t = _operands(1, 24, 31, 0.5, torch.float32, input_major=False)
    with caplog.at_level(logging.INFO, logger=cpu_kernel.__name__):
        assert not uses_cpu_kernel(x, w, max_sparse_rows=8)
    assert "not input-major" in caplog.text
    torch.testing.assert_close(sparse_linear(x, w, b, t), sparse_linear_reference(x, w, b, t))


def _compiled_decode(sparsity=0.5):
    model = tiny_llama()
    plan = wsc.calibrate(model, token_batches(2), wsc.SparsityConfig(sparsity=sparsity))
    wsc.attach(model, plan)
    ids = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, codes = run_and_get_code(lambda: torch.compile(model, backend="wisparse")(ids).logits)
        with MaskingHooks(model, plan.channel_thresholds):
            ref = model(ids).logits
    return out, ref, "\n".join(codes)


def test_compiled_tiny_model_decodes_through_kernel(kernel):
    out, ref, code = _compiled_decode()
    assert code.count("torch.ops.wisparse_cpu.sparse_gemv.default(") == 14  # every planned linear
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_fallback_when_kernel_unavailable(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpu_kernel, "_load", no_compiler)
    monkeypatch.setitem(cpu_kernel._state, "tried", False)
    monkeypatch.setitem(cpu_kernel._state, "ok", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, ref, code = _compiled_decode()
        assert not cpu_kernel_available()
    messages = [str(w.message) for w in caught if "C++ CPU sparse kernel is unavailable" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0]
    assert "wisparse_cpu" not in code
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


class _LinearOperandDtypes(TorchFunctionMode):
    """Records the weight dtype of every F.linear call."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.dtypes.append(args[1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("input_major", [True, False])
def test_reduced_precision_prefill_widens_to_fp32_on_input_major_weights(input_major):
    """Prefill (more rows than the kernel takes) over a bf16 input-major weight runs its dense
    matmul in fp32 where PyTorch's bf16 CPU GEMM has no fast path for that layout (AVX2: 20-40x
    slower); row-major weights, and CPUs with native bf16 GEMM, keep bf16. Same result either way."""
    x, w, b, t = _operands(16, 96, 80, 0.5, torch.bfloat16, input_major=input_major)
    with _LinearOperandDtypes() as seen:
        out = formats.masked_dense(x, w, b, t, Layout.FLOAT)
    widened = input_major and input_major_gemm_is_slow(w)
    assert seen.dtypes == [torch.float32 if widened else torch.bfloat16]
    ref = sparse_linear_reference(x.float(), w.float(), b.float(), t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    compiled = torch.compile(lambda *a: sparse_linear(*a, max_sparse_rows=8))
    torch.testing.assert_close(compiled(x, w, b, t).float(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(sparse_linear(x, w, b, t).float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_nan_and_inf_rows_match_the_dense_op(kernel, dtype):
    """NaN is kept (a NaN row is all NaN, as in the dense linear) and Inf gives the dense op's
    Inf/NaN pattern, also where another row prunes that channel; other rows stay finite."""
    x, w, b, t = _operands(4, 40, 67, 0.5, dtype)
    x[1, 7], x[2, 30], x[3, 0] = float("nan"), float("inf"), float("-inf")
    t[7] = 1e9
    out = kernel(x, w.t(), b, t).float()
    dense = F.linear(x.float(), w.float(), b.float())
    assert out[1].isnan().all() and dense[1].isnan().all()
    for row in (2, 3):
        assert torch.equal(out[row].isinf(), dense[row].isinf()) and torch.equal(out[row].isnan(), dense[row].isnan())
    assert out[0].isfinite().all()
    ref = sparse_linear_reference(x.float(), w.float(), b.float(), t).to(dtype).float()
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], equal_nan=True)


def test_extension_name_is_keyed_on_flags_features_and_source(tmp_path):
    """A build cache on shared storage never hands a CPU a binary built for other features or flags."""
    base = extension_name(("-O3", "-march=native"), "avx avx2 fma")
    assert base == extension_name(("-O3", "-march=native"), "avx avx2 fma")
    assert base != extension_name(("-O3", "-march=native"), "avx avx2 avx512f fma")
    assert base != extension_name(("-O2", "-march=native"), "avx avx2 fma")
    edited = tmp_path / "edited.cpp"
    edited.write_bytes(open(cpu_kernel._SOURCE, "rb").read() + b"// edited\n")
    assert base != extension_name(("-O3", "-march=native"), "avx avx2 fma", source=str(edited))
    assert extension_name().startswith("wisparse_cpu_sparse_gemv_")
    assert cpu_kernel.cpu_features()  # this machine's features are read


_NO_COMPILER_CHECK = """
import warnings
import torch
from tests.kernels.operands import linear_operands
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import wisparse_compile  # noqa: F401
    from wisparse_compile.kernels import cpu_kernel_available, sparse_linear_reference
    for seed in range(3):
        for dtype in (torch.float32, torch.bfloat16):
            x, w, b, t = linear_operands(2, 24, 40, 0.5, dtype, seed=seed)
            out = torch.ops.wisparse.sparse_linear(x, w, b, t, 8)
            assert torch.equal(out, sparse_linear_reference(x, w, b, t)), "not the reference route"
    assert not cpu_kernel_available()
messages = [str(w.message) for w in caught if "C++ CPU sparse kernel is unavailable" in str(w.message)]
assert len(messages) == 1, messages
print("fallback ok:", messages[0])
"""


def test_no_compiler_falls_back_to_the_reference_with_one_warning(tmp_path):
    """CXX names a missing binary, PATH has no c++/g++ (only ninja), a fresh TORCH_EXTENSIONS_DIR: one
    warning, every decode call equals the reference exactly."""
    import os
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[2]
    import shutil

    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    if shutil.which("ninja"):  # keep ninja, so that the missing compiler is what fails
        (empty_bin / "ninja").symlink_to(shutil.which("ninja"))
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "TORCH_EXTENSIONS_DIR")}
    env.update(CXX=str(tmp_path / "no-such-compiler"), PATH=str(empty_bin), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", _NO_COMPILER_CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stderr[-3000:]
    assert "Install a C++ compiler" in done.stdout
