"""The Triton sparse GEMV: y = (x * keep) @ W^T + b, loading only the weight rows some token keeps.

For decode (a few token rows). The weight is read input-major: channel k's weights ``W[:, k]``
are one contiguous row (``kernels/layout.py``; on CUDA each row starts on a 16-byte boundary).

The loop is the one a memory-bound GEMV wants (checked in the suite from the compiled PTX/TTGIR
for sm_80 and sm_90, ``kernels/triton_aot.py``): every thread owns ``VEC`` adjacent output
columns (one 16-byte vector of a weight row: 8 bf16/fp16, 4 fp32, 16 int8) and a block of
``BLOCK_K`` input rows; a program of ``num_warps`` warps covers ``BLOCK_N = 32 * num_warps * VEC``
columns. Per step a thread loads its ``BLOCK_K`` row vectors straight into registers (all
in flight at once: ``BLOCK_K * 16`` bytes per thread), x and the thresholds of those rows once
(each thread holds the whole, small, K block: a broadcast, not a shuffle), and accumulates
``x_k * W[k, cols]`` over k inside the thread: no layout conversion, no shared memory, no
barrier in the loop. A pruned channel's row is a masked-off load: no memory traffic.

Parallelism over N is N / VEC threads (512 for a 4096-wide bf16 GEMV), so the K dimension is
split over programs (``split_k_for``) until the GPU holds enough warps. Each K slice stores its
partial sums (bias in slice 0) into its own plane of an fp32 workspace ``[split_k, M, N]``:
every element is written once, so nothing is zeroed first and no atomics are used (results are
deterministic, which CUDA-graph replays and token-for-token checks rely on); the op sums the
planes, a reduction Inductor fuses with its consumers where it can. With one slice the kernel
adds the bias, casts and stores the output itself.

Fused siblings (``passes/fuse_siblings.py``): the weight may be the concatenation of up to
``MAX_SEGMENTS`` weights that read the same input, each with its own thresholds and bias. The
column-block programs are laid out per segment (a block never straddles two), so each program
masks x with its one segment's thresholds and adds its one bias.

Autotuning: per bucket of (rows, dtype) a short list of ``BLOCK_K`` values that pass the
register and loop budgets (``gemv_configs``); under the Triton interpreter (``TRITON_INTERPRET=1``,
CPU tests) only the first config runs. ``NUM_STAGES > 1`` pipelines the loop through ``cp.async``
(``tl.range``): compiled and modelled, but not in the autotune set (its shared-memory stages
need a barrier per step, and register streaming already keeps enough bytes in flight:
``benchmarks/gpu_model.py``). Offsets into the weight are 64-bit.

int8 weights (``sparse_gemv_int8_triton``): the same kernel reads int8 codes stored ``[K, N]``,
widens them to fp32 and multiplies each output column by its fp32 scale (``SCALED``) before the
bias, in every K slice (the scale is linear, so the summed slices come out scaled once).
int4 weights (``sparse_gemv_int4_triton``): ``_sparse_gemv_int4_kernel`` reads the project's
packed layout (``quant/primitives.py``): a thread's 16-byte vector is one block of 32 outputs, unpacked
in registers, each row scaled by its group's scale.

Imported only where the Triton route is taken (``triton_route.py`` keeps Triton optional).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

from .routing import DEFAULT_MAX_SPARSE_ROWS
from .triton_route import MAX_SEGMENTS
from .triton_toolchain import configure_ptxas

#: Bytes one thread loads from a weight row per step: one 16-byte vector (``ld.global.v4``). The
#: compiler's coalescing picks the widest vector the pointers allow, so a program is exactly as
#: wide as its threads' vectors (any narrower and warps would spread over K, reducing through
#: shared memory).
VECTOR_BYTES = 16
#: Register ceiling of every autotuned config (ptxas, sm_80 and sm_90): 4 CTAs of 4 warps per SM.
MAX_REGISTERS = 128
#: ``BLOCK_K`` candidates per kernel form and power-of-two row bucket, best first: the deepest
#: blocks (most bytes in flight per thread) whose compiled kernel stays within ``MAX_REGISTERS``
#: with no spills on sm_80 and sm_90 for every dtype (tests/kernels/test_triton_aot.py compiles
#: each). The accumulator grows with the rows (``BLOCK_M * VEC`` fp32 per thread), so deeper K
#: fits only at few rows.
BLOCK_K_BY_ROWS = {
    "float": {1: (16, 8), 2: (8, 4), 4: (4, 2)},
    "int8": {1: (8, 4), 2: (4, 2), 4: (2,)},
    "int4": {1: (2,)},
}
#: Most token rows one launch takes, per kernel form: the largest bucket with a config. No 8-row
#: config passes the budgets (the accumulator alone is 64-128 registers: 147 registers for a padded
#: bf16 weight, 254 for int8, or layout conversions at BLOCK_K = 1), nor any int4 config past one
#: row (a 16-byte int4 vector unpacks to 32 fp32 values per row: 168 registers at 2 rows), so more
#: rows run as several launches, each reading its kept rows. (At 5-8 tokens the union of their
#: masks keeps most rows anyway; int4 rows are a quarter of bf16's bytes.)
ROWS_PER_LAUNCH = {"float": 4, "int8": 4, "int4": 1}
#: Warps per program, most first; a program covers ``32 * warps * VEC`` columns.
WARPS = (4, 2, 1)
#: A K slice is a multiple of this many channels (the deepest BLOCK_K).
K_GRANULE = 16
#: A K slice is never shorter than this many channels (each slice costs a workspace plane).
MIN_K_PER_SPLIT = 64
#: Resident warps per SM the K split aims for: the bandwidth model's Little's-law target
#: (benchmarks/gpu_model.py: 16 warps of 16-row blocks keep ~4x the bytes HBM latency needs).
TARGET_WARPS_PER_SM = 16
#: Fallback SM count where no CUDA device can be queried (the interpreter, codegen-only tests): an H100 SXM.
DEFAULT_SMS = 132
#: Most configs one bucket autotunes over (each compiles once per (M, N, K) key on a GPU).
MAX_CONFIGS = 2


@dataclass(frozen=True)
class Launch:
    """An explicit config (tests, benchmarks): block sizes, warps, K slices and pipeline stages.

    ``block_n`` None means the GPU layout's ``32 * num_warps * VEC``; the interpreter tests pass
    small blocks to run the segment and split-K paths on small shapes."""

    block_n: int | None
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 1


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def vector_width(element_bytes: int) -> int:
    """Weight elements (int4: packed bytes) per 16-byte vector: the columns one thread owns."""
    return max(1, VECTOR_BYTES // element_bytes)


def block_n_for(num_warps: int, element_bytes: int) -> int:
    """Columns (int4: packed bytes) one program covers: every thread one vector of each weight row."""
    return 32 * num_warps * vector_width(element_bytes)


def warps_for(n: int, element_bytes: int) -> int:
    """The most warps (of ``WARPS``) whose program is no wider than the weight (narrow weights
    would leave threads idle); one warp at least."""
    return next((w for w in WARPS if block_n_for(w, element_bytes) <= n), WARPS[-1])


def gemv_configs(block_m: int, n: int, element_bytes: int, form: str = "float") -> list[triton.Config]:
    """The autotuning set of one bucket: the ``BLOCK_K`` values of ``BLOCK_K_BY_ROWS`` (at most
    ``MAX_CONFIGS``) at the warps ``warps_for`` picks, register-streamed (one stage)."""
    warps = warps_for(n, element_bytes)
    block_n = block_n_for(warps, element_bytes)
    depths = BLOCK_K_BY_ROWS[form][min(block_m, ROWS_PER_LAUNCH[form])][:MAX_CONFIGS]
    return [triton.Config({"BLOCK_N": block_n, "BLOCK_K": bk, "NUM_STAGES": 1}, num_warps=warps, num_stages=1)
            for bk in depths]


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def split_k_for(column_blocks: int, num_warps: int, k: int, sms: int) -> int:
    """K slices: enough programs for ``TARGET_WARPS_PER_SM`` warps on every SM, each slice at
    least ``MIN_K_PER_SPLIT`` channels."""
    wanted = triton.cdiv(TARGET_WARPS_PER_SM * sms, column_blocks * num_warps)
    return max(1, min(wanted, k // MIN_K_PER_SPLIT))


@triton.jit
def _past(pid_n, blocks, g, start, end, first, next_g, next_start, next_end, BLOCK_N: tl.constexpr):
    """Segment ``next_g`` (columns [next_start, next_end)) if program ``pid_n`` lies past the
    ``blocks`` column blocks before it, else the segment found so far; and the blocks up to its end."""
    if pid_n >= blocks:
        g = next_g
        start = next_start
        end = next_end
        first = next_start + (pid_n - blocks) * BLOCK_N
    return g, start, end, first, blocks + tl.cdiv(next_end - next_start, BLOCK_N)


@triton.jit
def _segment_of(pid_n, N, SEG_END_0, SEG_END_1, SEG_END_2, NUM_SEGMENTS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column-block program ``pid_n``'s segment: (index, first column, end column, the block's first column).

    Blocks are numbered segment after segment, ``cdiv(segment width, BLOCK_N)`` each."""
    g = pid_n * 0
    start = pid_n * 0
    end = SEG_END_0 + pid_n * 0
    first = pid_n * BLOCK_N
    blocks = tl.cdiv(SEG_END_0, BLOCK_N)
    if NUM_SEGMENTS > 1:
        g, start, end, first, blocks = _past(pid_n, blocks, g, start, end, first, 1, SEG_END_0, SEG_END_1, BLOCK_N)
    if NUM_SEGMENTS > 2:
        g, start, end, first, blocks = _past(pid_n, blocks, g, start, end, first, 2, SEG_END_1, SEG_END_2, BLOCK_N)
    if NUM_SEGMENTS > 3:
        g, start, end, first, blocks = _past(pid_n, blocks, g, start, end, first, 3, SEG_END_2, N, BLOCK_N)
    return g, start, end, first


@triton.jit
def _pick(g, p0, p1, p2, p3, NUM_SEGMENTS: tl.constexpr):
    """Segment g's pointer of four (a scalar select: every program reads one segment's data)."""
    p = p0
    if NUM_SEGMENTS > 1:
        if g == 1:
            p = p1
    if NUM_SEGMENTS > 2:
        if g == 2:
            p = p2
    if NUM_SEGMENTS > 3:
        if g == 3:
            p = p3
    return p


@triton.jit
def _kept(x_ptr, m, stride_xm, stride_xk, offs_k, k_ok, M, t):
    """Token row m's x over this K block (fp32, 0 past the rows) and which of its channels are kept.

    NaN is kept (wisparse_compile/mask.py), so a NaN input gives the dense op's NaN output."""
    # The row bound as a block, not a scalar `&`: triton >= 3.9's interpreter rejects the mask dtype that makes.
    row_ok = (offs_k * 0 + m) < M
    xm = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=k_ok & row_ok, other=0.0).to(tl.float32)
    return xm, (tl.abs(xm) > t) | (xm != xm)


@triton.jit
def _k_block(x_ptr, t_ptr, k_first, k_end, stride_xm, stride_xk, M, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This step's channels, which exist, their thresholds, and which channels some token row keeps
    (the union of the rows' masks: the weight rows to load)."""
    offs_k = k_first + tl.arange(0, BLOCK_K)
    k_ok = offs_k < k_end
    t = tl.load(t_ptr + offs_k, mask=k_ok, other=float("inf")).to(tl.float32)
    needed = offs_k < 0
    for m in tl.static_range(BLOCK_M):
        _, keep = _kept(x_ptr, m, stride_xm, stride_xk, offs_k, k_ok, M, t)
        needed = needed | keep
    return offs_k, k_ok, t, needed


@triton.jit
def _epilogue(acc, out_ptr, s_ptr, b_ptr, pid_k, g, seg_start, offs_m, offs_n, m_ok, n_ok,
              stride_os, stride_om, BIAS_SEGMENTS: tl.constexpr, SCALED: tl.constexpr):
    """Scale (int8/int4 codes), the bias in K slice 0, then store this slice's plane."""
    if SCALED:  # per output column, on each K slice's partial (the sum over slices is linear)
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if BIAS_SEGMENTS != 0:
        has_bias = ((BIAS_SEGMENTS >> g) & 1) * (pid_k == 0).to(tl.int32)
        bias = tl.load(b_ptr + (offs_n - seg_start), mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(has_bias > 0, bias, 0.0)[None, :]  # selected, not masked: see _kept
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, t0_ptr, t1_ptr, t2_ptr, t3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, s_ptr, out_ptr,
    M, N, K, N_LOAD, SEG_END_0, SEG_END_1, SEG_END_2,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om,
    K_PER_SPLIT: tl.constexpr, NUM_SEGMENTS: tl.constexpr, BIAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr = 0, NUM_STAGES: tl.constexpr = 1,
):
    """One (column block, K slice) program. ``N_LOAD`` bounds the weight loads: ``N``, or the
    padded row length (a multiple of 16) when the rows are padded, so the load mask is constant
    over every 16-byte vector and the loads stay vectorized whatever N is; columns past N are
    computed and never stored."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g, seg_start, seg_end, first = _segment_of(pid_n, N, SEG_END_0, SEG_END_1, SEG_END_2, NUM_SEGMENTS, BLOCK_N)
    t_ptr = _pick(g, t0_ptr, t1_ptr, t2_ptr, t3_ptr, NUM_SEGMENTS)
    offs_n = first + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seg_end
    load_ok = offs_n < N_LOAD
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # A constexpr trip count (triton 3.6's interpreter takes no runtime loop bound); the last
    # slice's steps past K load nothing.
    for k0 in tl.range(0, K_PER_SPLIT, BLOCK_K, num_stages=NUM_STAGES):
        offs_k, k_ok, t, needed = _k_block(x_ptr, t_ptr, k_start + k0, k_end, stride_xm, stride_xk, M, BLOCK_M, BLOCK_K)
        w = tl.load(w_cols + offs_k[:, None].to(tl.int64) * stride_wk,
                    mask=needed[:, None] & load_ok[None, :], other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):  # x re-read from L1: cheaper in registers than keeping it
            xm, keep = _kept(x_ptr, m, stride_xm, stride_xk, offs_k, k_ok, M, t)
            row = tl.sum(tl.where(keep, xm, 0.0)[:, None] * w, axis=0)  # over k, inside the thread
            acc = tl.where(offs_m[:, None] == m, acc + row[None, :], acc)
    b_ptr = _pick(g, b0_ptr, b1_ptr, b2_ptr, b3_ptr, NUM_SEGMENTS)
    _epilogue(acc, out_ptr, s_ptr, b_ptr, pid_k, g, seg_start, offs_m, offs_n, m_ok, n_ok,
              stride_os, stride_om, BIAS_SEGMENTS, SCALED)


@triton.jit
def _sparse_gemv_int4_kernel(
    x_ptr, q_ptr, t_ptr, b_ptr, s_ptr, out_ptr,
    M, N, K, B_LOAD, stride_xm, stride_xk, stride_qk, stride_sk, stride_os, stride_om,
    K_PER_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr = 1,
):
    """The sparse GEMV on packed int4 rows: ``BLOCK_N`` bytes (2 * BLOCK_N outputs) per program.

    Byte c of a row is in block ``c // 16`` of 32 outputs (first output ``32 * (c // 16)``); its low
    nibble is output ``c % 16`` of the block, its high nibble output ``c % 16 + h``, h = 16 for a
    full block and ceil(r / 2) for a last block of r outputs (``quant/primitives.py``): a thread's 16-byte
    vector of a row is one whole block, unpacked in registers into its 32 outputs, each scaled by
    the block's ``scale[k, c // 16]``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # byte columns
    block_first = (offs_c // 16) * 32
    half = tl.where(block_first + 32 <= N, 16, (N - block_first + 1) // 2)
    lo_n = block_first + offs_c % 16
    hi_n = lo_n + half
    lo_ok = (offs_c % 16 < half) & (lo_n < N)
    hi_ok = (offs_c % 16 < half) & (hi_n < N)
    load_ok = offs_c < B_LOAD
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in tl.range(0, K_PER_SPLIT, BLOCK_K, num_stages=NUM_STAGES):
        offs_k, k_ok, t, needed = _k_block(x_ptr, t_ptr, k_start + k0, k_end, stride_xm, stride_xk, M, BLOCK_M, BLOCK_K)
        rows = offs_k[:, None].to(tl.int64)
        wanted = needed[:, None] & load_ok[None, :]
        packed = tl.load(q_ptr + rows * stride_qk + offs_c[None, :], mask=wanted, other=0).to(tl.int32)
        scale = tl.load(s_ptr + rows * stride_sk + (offs_c // 16)[None, :], mask=wanted, other=0.0).to(tl.float32)
        lo = ((packed << 28) >> 28).to(tl.float32) * scale  # sign-extended nibbles: codes -8..7
        hi = ((packed << 24) >> 28).to(tl.float32) * scale
        for m in tl.static_range(BLOCK_M):
            xm, keep = _kept(x_ptr, m, stride_xm, stride_xk, offs_k, k_ok, M, t)
            xk = tl.where(keep, xm, 0.0)[:, None]
            acc_lo = tl.where(offs_m[:, None] == m, acc_lo + tl.sum(xk * lo, axis=0)[None, :], acc_lo)
            acc_hi = tl.where(offs_m[:, None] == m, acc_hi + tl.sum(xk * hi, axis=0)[None, :], acc_hi)
    if HAS_BIAS:
        first_slice = pid_k == 0
        acc_lo += tl.where(first_slice, tl.load(b_ptr + lo_n, mask=lo_ok, other=0.0).to(tl.float32), 0.0)[None, :]
        acc_hi += tl.where(first_slice, tl.load(b_ptr + hi_n, mask=hi_ok, other=0.0).to(tl.float32), 0.0)[None, :]
    plane = out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None] * stride_om
    tl.store(plane + lo_n[None, :], acc_lo.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & lo_ok[None, :])
    tl.store(plane + hi_n[None, :], acc_hi.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & hi_ok[None, :])


@functools.lru_cache(maxsize=None)
def _autotuned(form: str, block_m: int, n: int, element_bytes: int) -> Callable:
    """A kernel autotuned over its bucket's configs (one Autotuner per bucket, built once)."""
    kernel = _sparse_gemv_int4_kernel if form == "int4" else _sparse_gemv_kernel
    configs = gemv_configs(block_m, n, element_bytes, form)
    if _interpreted():
        configs = configs[:1]  # autotuning in the interpreter only costs time
    return triton.autotune(configs=configs, key=["M", "N", "K"])(kernel)


def _block_m(m: int | torch.SymInt, max_rows: int) -> int:
    """BLOCK_M: the row count rounded up to a power of two; a symbolic count takes ``max_rows``'s
    (the route's guard bounds it by ``max_rows``), so one graph serves every batch size up to it."""
    rows = m if isinstance(m, int) else max_rows
    return max(1, triton.next_power_of_2(rows))


def _check_thresholds(ts: Sequence[torch.Tensor], k: int, device: torch.device) -> list[torch.Tensor]:
    """Thresholds as the kernel reads them: floating, ``k`` long, on the device, contiguous (copied if not)."""
    checked = []
    for t in ts:
        if not t.is_floating_point():
            raise TypeError(f"sparse GEMV: thresholds must be a floating tensor, got {t.dtype}; pass them as float32")
        if t.dim() != 1 or t.shape[0] != k:
            raise ValueError(f"sparse GEMV: thresholds must be 1-D of length {k}, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"sparse GEMV: thresholds are on {t.device}, the input on {device}; move them with .to()")
        checked.append(t if t.stride(0) == 1 else t.contiguous())
    return checked


def padded_load_bound(rows: torch.Tensor, width: int) -> int:
    """How far along a row of ``rows`` ([K, row stride], unit column stride) the kernel may load:
    the row stride where the rows are padded (``kernels/layout.py``: the stride is ``width`` rounded
    up to 16) and the storage holds the last row's padding too, else ``width``. Loading the padding
    keeps every load a full 16-byte vector. Where the storage cannot be read, or is sized to the
    view (a functional tensor while torch.compile traces the op), a padded layout at storage offset
    0 is trusted, as ``layout.input_major`` makes it."""
    k, stride = int(rows.shape[0]), int(rows.stride(0))
    if rows.stride(1) != 1 or not width < stride < width + 16 or stride % 16 != 0:
        return width
    try:
        storage_elements = rows.untyped_storage().nbytes() // rows.element_size()
    except (RuntimeError, NotImplementedError, AttributeError):
        storage_elements = 0
    offset = rows.storage_offset()
    if storage_elements in (0, offset + (k - 1) * stride + width):  # unknown, or sized to the view (traced)
        return stride if offset == 0 else width
    return stride if offset + k * stride <= storage_elements else width


@dataclass(frozen=True)
class _Slices:
    """How a call splits K: slices, channels per slice, and the output (or fp32 workspace) planes."""

    split_k: int
    k_per_split: int
    out: torch.Tensor

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.out[0] if self.split_k == 1 else self.out.sum(0).to(dtype)


def _slices(x2d: torch.Tensor, m, n: int, k: int, column_blocks: int, num_warps: int, launch: Launch | None) -> _Slices:
    split_k = launch.split_k if launch is not None else split_k_for(column_blocks, num_warps, k, _sm_count(x2d.device))
    granule = launch.block_k if launch is not None else K_GRANULE
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), granule) * granule
    split_k = triton.cdiv(k, k_per_split)  # no empty slice: every workspace plane is written
    dtype = x2d.dtype if split_k == 1 else torch.float32
    return _Slices(split_k, k_per_split, torch.empty(split_k, m, n, dtype=dtype, device=x2d.device))


def _in_row_chunks(x2d: torch.Tensor, max_rows: int, launch: Launch | None, form: str,
                   run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """``run`` over chunks of ``ROWS_PER_LAUNCH[form]`` rows, concatenated, where the rows (or,
    symbolic, ``max_rows``) exceed it and the config is autotuned; None where one launch takes them all."""
    rows = x2d.shape[0] if isinstance(x2d.shape[0], int) else max_rows
    per_launch = ROWS_PER_LAUNCH[form]
    if launch is not None or rows <= per_launch:
        return None
    return torch.cat([run(x2d[start:start + per_launch]) for start in range(0, rows, per_launch)])


def sparse_gemv_triton(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    thresholds: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    splits: Sequence[int],
    launcher: Callable = lambda kernel: kernel,
    max_rows: int = DEFAULT_MAX_SPARSE_ROWS,
    launch: Launch | None = None,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``cat([(x2d * keep_i) @ W_i^T + b_i], -1)`` for the segments ``W_i`` of ``weight``, in x2d's dtype.

    ``scale`` [N] (fp32), if given, multiplies each output column before the bias: ``weight`` then
    holds int8 codes (``sparse_gemv_int8_triton``).

    ``weight`` [N, K] (any strides; input-major is the fast layout) holds the segments' weights
    concatenated along N, ``splits`` their output sizes; one thresholds tensor [K] and one bias
    (or None) per segment. ``launcher`` is ``torch.library.wrap_triton`` inside a triton_op, an
    identity for direct (interpreter) calls. ``launch`` fixes the config instead of autotuning.
    """
    form = "int8" if scale is not None else "float"
    chunked = _in_row_chunks(x2d, max_rows, launch, form, lambda rows: sparse_gemv_triton(
        rows, weight, thresholds, biases, splits, launcher, ROWS_PER_LAUNCH[form], None, scale))
    if chunked is not None:
        return chunked
    # Weight sizes are compile-time constants of the kernel (a symbolic one, e.g. a fused weight
    # Inductor fakified dynamically, is specialized to its value); only the row count may stay symbolic.
    n, k = int(weight.shape[0]), int(weight.shape[1])
    m = x2d.shape[0]
    splits = [int(s) for s in splits]
    if not (len(thresholds) == len(splits) == len(biases)) or not 1 <= len(splits) <= MAX_SEGMENTS or sum(splits) != n:
        raise ValueError(
            f"sparse GEMV: {len(thresholds)} threshold tensors and {len(biases)} biases for output splits {splits} "
            f"of a weight with {n} rows (need one of each per split, at most {MAX_SEGMENTS} splits, summing to {n})"
        )
    if any(s <= 0 for s in splits):
        raise ValueError(f"sparse GEMV: output splits {splits} must all be positive")
    ts = _check_thresholds(thresholds, k, x2d.device)
    for b, s in zip(biases, splits):
        if b is not None and tuple(b.shape) != (s,):
            raise ValueError(f"sparse GEMV: a bias of shape {tuple(b.shape)} for a segment of {s} outputs")
    # A program picks its segment's pointers at run time, so all have one type: fp32 thresholds
    # (exact for any floating input), biases in one dtype, unread placeholders for absent ones.
    ts = [t if t.dtype == torch.float32 else t.float() for t in ts]
    present = [b for b in biases if b is not None]
    bias_dtype = present[0].dtype if present and all(b.dtype == present[0].dtype for b in present) else torch.float32
    bs = [None if b is None else b.to(bias_dtype).contiguous() for b in biases]
    bias_segments = sum(1 << i for i, b in enumerate(bs) if b is not None)
    ends = [sum(splits[: i + 1]) for i in range(len(splits) - 1)]
    ends += [n] * (MAX_SEGMENTS - 1 - len(ends))
    ts += [ts[0]] * (MAX_SEGMENTS - len(ts))
    placeholder = next((b for b in bs if b is not None), ts[0])
    bs = [b if b is not None else placeholder for b in bs] + [placeholder] * (MAX_SEGMENTS - len(bs))
    element_bytes = weight.element_size()
    n_load = padded_load_bound(weight.t(), n)
    block_m = _block_m(m, max_rows)
    num_warps = launch.num_warps if launch is not None else warps_for(n, element_bytes)
    block_n = (launch.block_n if launch is not None else None) or block_n_for(num_warps, element_bytes)
    column_blocks = sum(triton.cdiv(s, block_n) for s in splits)
    sliced = _slices(x2d, m, n, k, column_blocks, num_warps, launch)
    out = sliced.out
    args = (
        x2d, weight, *ts, *bs, scale if scale is not None else ts[0], out,
        m, n, k, n_load, *ends,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
    )
    constants = {
        "K_PER_SPLIT": sliced.k_per_split, "NUM_SEGMENTS": len(splits), "BIAS_SEGMENTS": bias_segments,
        "BLOCK_M": block_m, "SCALED": int(scale is not None),
    }
    grid = (column_blocks, sliced.split_k)
    if launch is not None:
        launcher(_sparse_gemv_kernel)[grid](
            *args, **constants, BLOCK_N=block_n, BLOCK_K=launch.block_k, NUM_STAGES=launch.num_stages,
            num_warps=num_warps, num_stages=launch.num_stages,
        )
    else:
        launcher(_autotuned(form, block_m, n, element_bytes))[grid](*args, **constants)
    return sliced.result(x2d.dtype)


def sparse_gemv_int8_triton(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    thresholds: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    launcher: Callable = lambda kernel: kernel,
    max_rows: int = DEFAULT_MAX_SPARSE_ROWS,
    launch: Launch | None = None,
) -> torch.Tensor:
    """``((x2d * keep) @ qweight) * scale + bias`` with ``qweight`` int8 ``[K, N]`` (input-major codes)
    and ``scale`` fp32 ``[N]``: the sparse GEMV on int8 rows (a pruned channel's row is never loaded),
    fp32 accumulation, the scale applied per output column. ``thresholds=None`` keeps every channel
    (thresholds of -inf: the dense int8 GEMV of an unplanned linear such as the output head)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.stride(1) != 1:
        raise ValueError(f"int8 sparse GEMV: qweight must be int8 [in, out] with contiguous rows, got {qweight.dtype} {tuple(qweight.stride())}")
    k = int(qweight.shape[0])
    if thresholds is None:
        thresholds = torch.full((k,), float("-inf"), device=x2d.device)
    scale = scale if scale.dtype == torch.float32 and scale.stride(0) == 1 else scale.float().contiguous()
    return sparse_gemv_triton(
        x2d, qweight.t(), [thresholds], [bias], [int(qweight.shape[1])], launcher, max_rows, launch, scale=scale
    )


def sparse_gemv_int4_triton(
    x2d: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, out_features: int,
    thresholds: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    launcher: Callable = lambda kernel: kernel, max_rows: int = DEFAULT_MAX_SPARSE_ROWS, launch: Launch | None = None,
) -> torch.Tensor:
    """``(x2d * keep) @ dequantized(qdata, scale)^T + bias`` for the packed int4 layout of
    ``quant/primitives.py``: ``qdata`` uint8 ``[K, ceil(N/2)]`` (rows contiguous), ``scale`` fp32
    ``[K, ceil(N/32)]``. A pruned channel's packed row and its scales are never loaded; codes are
    unpacked and scaled in registers, accumulation in fp32. ``thresholds=None`` keeps every channel."""
    chunked = _in_row_chunks(x2d, max_rows, launch, "int4", lambda rows: sparse_gemv_int4_triton(
        rows, qdata, scale, out_features, thresholds, bias, launcher, ROWS_PER_LAUNCH["int4"], None))
    if chunked is not None:
        return chunked
    n = int(out_features)
    if qdata.dtype != torch.uint8 or qdata.dim() != 2 or qdata.stride(1) != 1 or qdata.shape[1] != (n + 1) // 2:
        raise ValueError(
            f"int4 sparse GEMV: qdata must be uint8 [in, ceil({n}/2)] with contiguous rows, got {qdata.dtype} "
            f"{tuple(qdata.shape)} strides {tuple(qdata.stride())}"
        )
    k, row_bytes = int(qdata.shape[0]), int(qdata.shape[1])
    groups = triton.cdiv(n, 32)
    if tuple(scale.shape) != (k, groups):
        raise ValueError(f"int4 sparse GEMV: scale must be [{k}, {groups}] (one per input channel and 32 outputs), got {tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"int4 sparse GEMV: a bias of shape {tuple(bias.shape)} for {n} outputs")
    if thresholds is None:
        thresholds = torch.full((k,), float("-inf"), device=x2d.device)
    (t,) = _check_thresholds([thresholds], k, x2d.device)
    scale = scale if scale.dtype == torch.float32 and scale.stride(1) == 1 else scale.float().contiguous()
    bias = bias if bias is None or bias.stride(0) == 1 else bias.contiguous()
    m = x2d.shape[0]
    block_m = _block_m(m, max_rows)
    num_warps = launch.num_warps if launch is not None else warps_for(row_bytes, 1)
    block_n = (launch.block_n if launch is not None else None) or block_n_for(num_warps, 1)
    column_blocks = triton.cdiv(row_bytes, block_n)
    sliced = _slices(x2d, m, n, k, column_blocks, num_warps, launch)
    out = sliced.out
    args = (
        x2d, qdata, t, bias if bias is not None else t, scale, out,
        m, n, k, padded_load_bound(qdata, row_bytes), x2d.stride(0), x2d.stride(1), qdata.stride(0), scale.stride(0),
        out.stride(0), out.stride(1),
    )
    constants = {"K_PER_SPLIT": sliced.k_per_split, "HAS_BIAS": int(bias is not None), "BLOCK_M": block_m}
    grid = (column_blocks, sliced.split_k)
    if launch is not None:
        launcher(_sparse_gemv_int4_kernel)[grid](
            *args, **constants, BLOCK_N=block_n, BLOCK_K=launch.block_k, NUM_STAGES=launch.num_stages,
            num_warps=num_warps, num_stages=launch.num_stages,
        )
    else:
        launcher(_autotuned("int4", block_m, row_bytes, 1))[grid](*args, **constants)
    return sliced.result(x2d.dtype)


if torch.cuda.is_available():  # a cubin this host's driver can load (triton_toolchain.py)
    _major, _minor = torch.cuda.get_device_capability()
    configure_ptxas(10 * _major + _minor)
