"""The Triton sparse GEMV under the interpreter: every path of the kernel against the reference.

Paths: one K slice (the kernel adds the bias, casts and stores) and several (fp32 workspace planes
summed by the op, bias in slice 0); K and N not multiples of the blocks; fused segments whose
boundaries fall inside a block of columns; 1 to 8 token rows; fp32/fp16/bf16; NaN and Inf inputs;
thresholds that are non-contiguous or of the wrong dtype. Config pruning and the K-split choice
are checked as functions (what a GPU would compile and launch).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.operands import assert_matches, linear_operands, sibling_operands
from wisparse_compile.kernels import sparse_gemv, sparse_gemv_fused, sparse_linear_reference
from wisparse_compile.kernels.triton_sparse_gemv import (
    BLOCK_K_BY_ROWS,
    MAX_CONFIGS,
    MIN_K_PER_SPLIT,
    TARGET_WARPS_PER_SM,
    Launch,
    gemv_configs,
    sparse_gemv_triton,
    split_k_for,
)
from wisparse_compile.passes.fuse_siblings import fused_weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: The autotuned bucket's first config (one K slice where K < 128, more above); 16/32-wide blocks over 3-5 K slices.
LAUNCHES = {"autotuned": None, "split3": Launch(block_n=32, block_k=32, split_k=3), "split5": Launch(16, 32, 5, 8)}


def _reference(x, ws, bs, ts):
    return torch.cat([sparse_linear_reference(x.float(), w.float(), None if b is None else b.float(), t)
                      for w, b, t in zip(ws, bs, ts)], dim=-1)


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(70, 45), (97, 301)])
def test_kernel_matches_reference(launch, dtype, m, n, k):
    x, w, b, t = linear_operands(m, n, k, 0.5, dtype)
    out = sparse_gemv(x, w, b, t, launch=LAUNCHES[launch])
    assert_matches(out, sparse_linear_reference(x.float(), w.float(), b.float(), t), dtype)


@pytest.mark.parametrize("m", range(1, 9))
def test_every_row_count_up_to_max_sparse_rows(m):
    """BLOCK_M is the row count rounded up to a power of two: rows past M are masked off."""
    x, w, b, t = linear_operands(m, 33, 130, 0.5, torch.bfloat16)
    out = sparse_gemv(x, w, b, t, launch=LAUNCHES["split3"])
    assert_matches(out, sparse_linear_reference(x.float(), w.float(), b.float(), t), torch.bfloat16)


def test_split_k_really_splits():
    """The split configs above run several K slices (the workspace route), the autotuned one a single slice."""
    seen = []
    x, w, b, t = linear_operands(2, 33, 130, 0.5, torch.float32)

    def recording(kernel):
        def launch(grid):
            seen.append(grid)
            return kernel[grid]
        return type("L", (), {"__getitem__": lambda self, grid: launch(grid)})()

    sparse_gemv_triton(x, w, [t], [b], [33], recording, launch=LAUNCHES["split3"])
    sparse_gemv_triton(x, w, [t], [b], [33], recording, launch=LAUNCHES["split5"])
    sparse_gemv_triton(x, w, [t], [b], [33], recording)
    assert seen[0] == (2, 3) and seen[1] == (3, 5)  # ceil(33/32) x 3, ceil(33/16) x ceil(130/32)
    assert seen[2] == (1, 2)  # autotuned: one 1-warp block of 128 fp32 columns, 2 slices of >= 64 channels


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_bias_enters_once_at_any_split(launch, sparsity):
    """All channels pruned: the output is the bias exactly (not the bias times the K slices)."""
    x, w, b, t = linear_operands(3, 70, 301, sparsity, torch.float32)
    out = sparse_gemv(x, w, b, t, launch=LAUNCHES[launch])
    ref = sparse_linear_reference(x, w, b, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if sparsity == 1.0:
        assert torch.equal(out, b.expand(3, 70))


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [(5, 40, 19, 33), (40, 24, 24), (3, 61)])
def test_fused_segments_with_boundaries_inside_blocks(launch, dtype, splits):
    """Segment ends at 5, 45, 64 (or 40, 64; or 3) fall inside 16/32/64-wide column blocks; each
    segment masks x by its own thresholds and adds its own bias (sibling 1 has none)."""
    x, ws, bs, ts = sibling_operands(3, splits, 96, dtype)
    if len(ts) > 1:
        assert not torch.equal(x.abs().float() > ts[0], x.abs().float() > ts[1])  # they prune differently
    out = sparse_gemv_fused(x, fused_weight(ws, (False,) * len(ws)), bs, ts, list(splits), launch=LAUNCHES[launch])
    assert_matches(out, _reference(x, ws, bs, ts), dtype)


@pytest.mark.parametrize("launch", ["autotuned", "split3"])
def test_fused_inf_and_nan_stay_in_their_rows_and_segments_as_dense(launch):
    """An Inf kept by every segment gives each segment's columns the dense op's +-Inf (never
    Inf * 0 = NaN leaking from one segment's term into another's columns); a NaN row is all NaN."""
    x, ws, bs, ts = sibling_operands(3, (5, 40, 19), 96, torch.float32)
    x[1, 3], x[2, 50] = float("nan"), float("inf")
    out = sparse_gemv_fused(x, fused_weight(ws, (False,) * 3), bs, ts, [5, 40, 19], launch=LAUNCHES[launch])
    assert_matches(out, _reference(x, ws, bs, ts), torch.float32)
    dense = torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs)], -1)
    assert out[1].isnan().all() and torch.equal(out[2].isinf(), dense[2].isinf()) and out[2].isinf().all()


def test_union_of_masks_loads_a_row_each_segment_masks_its_own():
    """Channel 0 is kept by sibling 0 only: sibling 1 must not see it even though its row is loaded."""
    x = torch.tensor([[1.0, 2.0]])
    ws = [torch.tensor([[1.0, 10.0]]), torch.tensor([[100.0, 1.0]])]
    ts = [torch.tensor([0.5, 0.5]), torch.tensor([1.5, 0.5])]
    out = sparse_gemv_fused(x, fused_weight(ws, (False, False)), [None, None], ts, [1, 1])
    assert out.tolist() == [[21.0, 2.0]]


def test_pruned_channel_contributes_nothing():
    """A pruned channel contributes nothing, even if its weight row is huge."""
    x = torch.tensor([[1.0, 0.01, -2.0]])
    w = torch.tensor([[1.0, 1e6, 1.0]])
    t = torch.tensor([0.5, 0.5, 0.5])
    assert sparse_gemv(x, w, None, t).item() == pytest.approx(-1.0)


@pytest.mark.parametrize("launch", ["autotuned", "split3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_rows_match_the_dense_op(launch, dtype):
    """NaN is kept (mask.py), so a row with a NaN is all NaN, as the dense linear gives; an Inf
    (always kept) gives the dense op's Inf/NaN pattern; other rows are unaffected."""
    x, w, b, t = linear_operands(4, 33, 130, 0.5, dtype)
    x[1, 7] = float("nan")
    x[2, 100] = float("inf")
    x[3, 0] = float("-inf")
    t[7] = 1e9  # a threshold that would prune anything finite on the NaN channel
    out = sparse_gemv(x, w, b, t, launch=LAUNCHES[launch])
    ref = sparse_linear_reference(x.float(), w.float(), b.float(), t)
    assert_matches(out, ref, dtype)
    dense = F.linear(x.float(), w.float(), b.float())
    assert out[1].isnan().all() and dense[1].isnan().all()
    for row in (2, 3):
        assert torch.equal(out[row].float().isinf(), dense[row].isinf())
        assert torch.equal(out[row].float().isnan(), dense[row].isnan())
    assert out[0].float().isfinite().all()


def test_reads_any_weight_layout_and_leading_dims():
    x, w, b, t = linear_operands(3, 40, 50, 0.5, torch.float32, input_major=False)
    x3 = x.reshape(3, 1, 50)
    out = sparse_gemv(x3, w, None, t)
    assert out.shape == (3, 1, 40)
    torch.testing.assert_close(out, sparse_linear_reference(x3, w, None, t), rtol=1e-5, atol=1e-5)


def test_non_contiguous_thresholds_and_input_are_read_right():
    x, w, b, t = linear_operands(2, 33, 130, 0.5, torch.float32)
    t_strided = torch.stack([t, torch.full_like(t, 1e9)], dim=1)[:, 0]  # stride 2: a copy is made, never a wrong read
    x_strided = torch.stack([x, torch.zeros_like(x)], dim=2)[:, :, 0]
    assert t_strided.stride(0) == 2 and x_strided.stride(1) == 2
    out = sparse_gemv(x_strided, w, b, t_strided, launch=LAUNCHES["split3"])
    torch.testing.assert_close(out, sparse_linear_reference(x, w, b, t), rtol=1e-5, atol=1e-5)


def test_reduced_precision_thresholds_compare_as_the_reference():
    x, w, b, t = linear_operands(2, 33, 130, 0.5, torch.float32)
    t16 = t.to(torch.bfloat16)
    torch.testing.assert_close(sparse_gemv(x, w, b, t16), sparse_linear_reference(x, w, b, t16), rtol=1e-5, atol=1e-5)


def test_bad_thresholds_and_splits_name_the_problem():
    x, w, b, t = linear_operands(1, 16, 16, 0.5, torch.float32)
    with pytest.raises(TypeError, match="floating"):
        sparse_gemv_triton(x, w, [t.to(torch.int32)], [None], [16])
    with pytest.raises(ValueError, match="length 16"):
        sparse_gemv_triton(x, w, [t[:8]], [None], [16])
    with pytest.raises(ValueError, match="on meta"):
        sparse_gemv_triton(x, w, [t.to("meta")], [None], [16])
    with pytest.raises(ValueError, match="threshold tensors and 1 biases for output splits"):
        sparse_gemv_triton(x, w, [t, t], [None], [8, 8])
    with pytest.raises(ValueError, match="bias of shape"):
        sparse_gemv_triton(x, w, [t], [b[:3]], [16])


@pytest.mark.parametrize("block_m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("element_bytes", [1, 2, 4])
@pytest.mark.parametrize("n", [4096, 14336, 128256, 576, 192, 64])
def test_autotune_set_is_small_and_one_vector_per_thread(block_m, element_bytes, n):
    """At most MAX_CONFIGS configs per bucket, each program as wide as its threads' 16-byte vectors
    (``32 * warps * VEC``), no wider than the weight where one warp's width allows; register-streamed.
    (That every kept config meets the register and loop budgets is checked from compiled code:
    test_triton_aot.py.)"""
    configs = gemv_configs(block_m, n, element_bytes)
    assert 1 <= len(configs) <= MAX_CONFIGS
    for c in configs:
        assert c.kwargs["BLOCK_N"] == 32 * c.num_warps * (16 // element_bytes)
        assert c.kwargs["BLOCK_N"] <= n or c.num_warps == 1
        assert c.kwargs["NUM_STAGES"] == 1 and c.kwargs["BLOCK_K"] in BLOCK_K_BY_ROWS["float"][min(block_m, 4)]


def test_split_k_fills_the_gpu_without_short_slices():
    """Enough programs for TARGET_WARPS_PER_SM warps per SM, never a slice under MIN_K_PER_SPLIT channels."""
    assert split_k_for(4, 4, 4096, 132) == 64  # 4096x4096 bf16: 4 blocks of 4 warps; 64 slices of 64 channels
    assert split_k_for(4, 4, 14336, 132) == 132  # 4096x14336: 132 slices of 109 channels
    assert split_k_for(14, 4, 4096, 132) == 38  # 14336x4096
    assert split_k_for(126, 4, 4096, 132) == 5  # a 128k-vocabulary head nearly fills the GPU by itself
    assert split_k_for(1, 1, 128, 132) == 2  # too short to split further
    for blocks, k in ((4, 4096), (8, 8192), (3, 2048)):
        s = split_k_for(blocks, 4, k, 132)
        assert blocks * 4 * s >= TARGET_WARPS_PER_SM * 132 or k // s == MIN_K_PER_SPLIT
        assert k // s >= MIN_K_PER_SPLIT


# ---- the int4 kernel (packed codes, per-group scales) ----

INT4_LAUNCHES = {"autotuned": None, "split3": Launch(block_n=16, block_k=8, split_k=3, num_warps=1),
                 "rows8": Launch(block_n=32, block_k=4, split_k=2, num_warps=2)}


def _int4_operands(m, n, k, sparsity, dtype, seed=0):
    from wisparse_compile.quant.primitives import quantize_int4

    x, w, b, t = linear_operands(m, n, k, sparsity, dtype, seed=seed)
    q, s = quantize_int4(w.float())
    return x, q, s, b, t


def _int4_reference(x, q, s, n, b, t):
    return sparse_linear_reference(x.float(), q, None if b is None else b.float(), t, "int4", s, n)


@pytest.mark.parametrize("launch", list(INT4_LAUNCHES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(64, 45), (70, 301)])
def test_int4_kernel_matches_reference(launch, dtype, m, n, k):
    """70 outputs: blocks of 32, 32 and a last one of 6 (its high nibbles start at 3, not 16);
    split3 runs 3 K slices over 1-warp 16-byte programs; autotuned runs rows one launch each."""
    from wisparse_compile.kernels.triton_sparse_gemv import sparse_gemv_int4_triton

    x, q, s, b, t = _int4_operands(m, n, k, 0.5, dtype)
    out = sparse_gemv_int4_triton(x, q, s, n, t, b, launch=INT4_LAUNCHES[launch])
    assert out.shape == (m, n) and out.dtype == dtype
    assert_matches(out, _int4_reference(x, q, s, n, b, t), dtype)


@pytest.mark.parametrize("launch", ["autotuned", "split3"])
def test_int4_kernel_dense_no_bias_and_nan(launch):
    from wisparse_compile.kernels.triton_sparse_gemv import sparse_gemv_int4_triton

    x, q, s, b, _t = _int4_operands(2, 70, 45, 0.0, torch.float32)
    out = sparse_gemv_int4_triton(x, q, s, 70, None, None, launch=INT4_LAUNCHES[launch])
    assert_matches(out, _int4_reference(x, q, s, 70, None, None), torch.float32)
    x, q, s, b, t = _int4_operands(2, 70, 45, 0.5, torch.float32)
    x[1, 3] = float("nan")
    t[3] = 1e9
    out = sparse_gemv_int4_triton(x, q, s, 70, t, b, launch=INT4_LAUNCHES[launch])
    assert out[1].isnan().all() and out[0].isfinite().all()
    assert_matches(out[:1], _int4_reference(x[:1], q, s, 70, b, t), torch.float32)


def test_int4_kernel_rejects_bad_operands():
    from wisparse_compile.kernels.triton_sparse_gemv import sparse_gemv_int4_triton

    x, q, s, b, t = _int4_operands(1, 64, 32, 0.5, torch.float32)
    with pytest.raises(ValueError, match="uint8 \\[in, ceil\\(64/2\\)\\]"):
        sparse_gemv_int4_triton(x, q.to(torch.int8), s, 64, t, b)
    with pytest.raises(ValueError, match="scale must be \\[32, 2\\]"):
        sparse_gemv_int4_triton(x, q, s[:, :1], 64, t, b)
    with pytest.raises(ValueError, match="bias of shape"):
        sparse_gemv_int4_triton(x, q, s, 64, t, b[:3])


def test_padded_rows_are_loaded_to_their_stride_only_where_the_storage_holds_them():
    """The load bound: the padded width (16-byte vectors for any N) for layout.input_major's rows,
    also when torch.compile traces the op with a functional tensor sized to the view; the true
    width for unpadded rows, other strides, and views that start inside their storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    from wisparse_compile.kernels.triton_sparse_gemv import padded_load_bound

    padded = torch.empty(64, 112)[:, :100]
    assert padded_load_bound(padded, 100) == 112
    assert padded_load_bound(torch.empty(64, 100), 100) == 100
    assert padded_load_bound(torch.empty(64, 128)[:, :100], 100) == 100  # more than the rounding: not a padded layout
    assert padded_load_bound(torch.empty(63 * 112 + 100 + 16).as_strided((64, 100), (112, 1), 16), 100) == 100
    assert padded_load_bound(torch.empty(64 * 112 + 16).as_strided((64, 100), (112, 1), 16), 100) == 112
    fake_mode = FakeTensorMode()
    with fake_mode, FunctionalTensorMode():
        assert padded_load_bound(FunctionalTensor.to_functional(fake_mode.from_tensor(padded)), 100) == 112
