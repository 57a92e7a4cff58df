"""The Triton sparse GEMV: y = (x * keep) @ W^T + b, loading only the weight rows some token keeps.

For decode (a few token rows). The weight is read input-major: channel k's weights ``W[:, k]``
are one contiguous row when the weight is stored transposed (see ``attach``). Each program owns a
block of output columns and a slice of the input channels (split-K); it loads a weight row only if
some token row keeps that channel (the union of the rows' masks), applies each row's own mask to
x and accumulates in fp32.

Launches per call: with one K slice (``split_k == 1``) the kernel adds the bias, casts and stores
the output itself: one launch. With ``split_k > 1`` each K slice stores its partial sums (bias in
slice 0) into its own plane of an fp32 workspace ``[split_k, M, N]``: every element is written
once, so nothing needs zeroing first and no atomics are used (results are deterministic, which
CUDA-graph replays and token-for-token checks rely on); the op then sums the planes and casts,
a reduction Inductor fuses with its consumers where it can. ``split_k`` is chosen on the host
(``split_k_for``) so that the grid fills the GPU; tests pass it explicitly.

Fused siblings (``passes/fuse_siblings.py``): the weight may be the concatenation of up to
``MAX_SEGMENTS`` weights that read the same input, each with its own thresholds and bias. Output
column n belongs to segment ``seg(n)`` (columns ``[SEG_END_{g-1}, SEG_END_g)`` are segment g); a
program loads a weight row if any token row keeps that channel under the thresholds of any segment
its block of columns touches, and each segment's columns see x masked by that segment's own
thresholds. With one segment this is the plain sparse GEMV.

Autotuning: block sizes and warps come from a small set per bucket of (rows, N, K) (``gemv_configs``,
at most ``MAX_CONFIGS``); under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tests) only the
first config of the bucket runs. Offsets into the weight are 64-bit (an output head over a large
vocabulary passes 2^31 elements).

int8 weights (``sparse_gemv_int8_triton``): the same kernel reads int8 codes stored ``[K, N]`` (an
input-major row per channel, as for float weights), widens them to fp32 and multiplies each output
column by its fp32 scale (``SCALED``) before the bias, in every K slice (the scale is linear, so the
summed slices come out scaled once).

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

from .triton_route import MAX_SEGMENTS

#: Most configs one bucket autotunes over (each compiles once per (M, N, K) key on a GPU).
MAX_CONFIGS = 4
#: K_PER_SPLIT is a multiple of this (the largest BLOCK_K of any config).
K_GRANULE = 128
#: A K slice is never shorter than this many channels (shorter slices pay more per-program overhead than they gain).
MIN_K_PER_SPLIT = 512
#: Fallback SM count where no CUDA device can be queried (the interpreter, codegen-only tests): an H100 SXM.
DEFAULT_SMS = 132
#: Values of the BLOCK_M x BLOCK_K x BLOCK_N product one thread may hold (registers; more spills).
PRODUCT_PER_THREAD = 64

#: (BLOCK_N, BLOCK_K) by preference: 8-32 KiB of bf16 weights per loop step in flight per program,
#: wide rows first (coalesced loads of the input-major weight), then deeper K.
_TILES = ((64, 128), (128, 64), (128, 128), (64, 64), (32, 128), (128, 32), (64, 32), (32, 64), (32, 32), (16, 32))


@dataclass(frozen=True)
class Launch:
    """An explicit config (tests, benchmarks): block sizes, warps, and how many K slices."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gemv_configs(block_m: int, n: int, k: int) -> list[triton.Config]:
    """The autotuning set for one bucket: at most ``MAX_CONFIGS`` tiles that fit the registers.

    Tiles are clamped to the weight (no block wider than N or deeper than K, rounded up to a
    power of two), and a tile is kept only if its ``BLOCK_M x BLOCK_K x BLOCK_N`` product fits
    ``PRODUCT_PER_THREAD`` values per thread at 4 or 8 warps (the fewer warps that fit). So the set
    depends on the row bucket (BLOCK_M) and, for small weights, on N and K: e.g. 4 configs for a
    4096x4096 GEMV at any batch, 1-2 for a 64x128 test weight.
    """
    n_cap = max(16, triton.next_power_of_2(n))
    k_cap = max(16, triton.next_power_of_2(k))
    seen: set[tuple[int, int, int]] = set()
    configs = []
    for block_n, block_k in _TILES:
        block_n, block_k = min(block_n, n_cap), min(block_k, k_cap)
        product = block_m * block_n * block_k
        warps = next((w for w in (4, 8) if product <= PRODUCT_PER_THREAD * 32 * w), None)
        if warps is None or (block_n, block_k, warps) in seen:
            continue
        seen.add((block_n, block_k, warps))
        configs.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps))
        if len(configs) == MAX_CONFIGS:
            break
    if not configs:  # a huge BLOCK_M: the smallest tile, most warps
        configs.append(triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=8))
    return configs


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def split_k_for(n: int, k: int, sms: int) -> int:
    """K slices for an N x K GEMV: double while the grid (at 64-wide column blocks) has fewer than
    two programs per SM and each slice keeps at least ``MIN_K_PER_SPLIT`` channels."""
    blocks = triton.cdiv(n, 64)
    split = 1
    while blocks * split < 2 * sms and k // (2 * split) >= MIN_K_PER_SPLIT:
        split *= 2
    return split


@triton.jit
def _segment_keep(x, t_ptr, offs_k, k_ok, seg, g: tl.constexpr, n_ok):
    """Masked x of segment g, and the channels it needs in this block (none if no column of g)."""
    t = tl.load(t_ptr + offs_k, mask=k_ok, other=float("inf")).to(tl.float32)
    keep = (tl.abs(x) > t[None, :]) | (x != x)  # NaN is kept (wisparse_compile/mask.py)
    # 1 if a column of segment g lies in this block. Combined by arithmetic, not `&` with the
    # reduced scalar: triton >= 3.9's interpreter rejects the mask dtype that `&` produces.
    in_block = tl.max(((seg == g) & n_ok).to(tl.int32), axis=0)
    needed = (tl.max(keep.to(tl.int32), axis=0) * in_block) > 0  # union over token rows
    return tl.where(keep, x, 0.0), needed


@triton.jit
def _segment_bias(b_ptr, offs_n, seg, g: tl.constexpr, seg_start, n_ok):
    """Bias of segment g's columns in this block (0 elsewhere); ``b_ptr`` indexed from the segment's start."""
    in_seg = (seg == g) & n_ok
    return tl.load(b_ptr + (offs_n - seg_start), mask=in_seg, other=0.0).to(tl.float32)


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, t0_ptr, t1_ptr, t2_ptr, t3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, s_ptr, out_ptr,
    M, N, K, SEG_END_0, SEG_END_1, SEG_END_2,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_os, stride_om, stride_on,
    K_PER_SPLIT: tl.constexpr, NUM_SEGMENTS: tl.constexpr, BIAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    # Segment of each output column: columns [0, SEG_END_0) are weight 0, [SEG_END_0, SEG_END_1) weight 1, ...
    seg = (offs_n >= SEG_END_0).to(tl.int32) + (offs_n >= SEG_END_1).to(tl.int32) + (offs_n >= SEG_END_2).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # A constexpr trip count (triton 3.6's interpreter takes no runtime loop bound); the last
    # slice's steps past K load nothing (no channel there is kept).
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(tl.float32)
        x0, needed = _segment_keep(x, t0_ptr, offs_k, k_ok, seg, 0, n_ok)
        if NUM_SEGMENTS > 1:
            x1, needed1 = _segment_keep(x, t1_ptr, offs_k, k_ok, seg, 1, n_ok)
            needed = needed | needed1
        if NUM_SEGMENTS > 2:
            x2, needed2 = _segment_keep(x, t2_ptr, offs_k, k_ok, seg, 2, n_ok)
            needed = needed | needed2
        if NUM_SEGMENTS > 3:
            x3, needed3 = _segment_keep(x, t3_ptr, offs_k, k_ok, seg, 3, n_ok)
            needed = needed | needed3
        w = tl.load(
            w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n64[None, :] * stride_wn,
            mask=needed[:, None] & n_ok[None, :], other=0.0,
        ).to(tl.float32)
        # Each segment's product over the whole tile, kept only in its own columns: selecting after
        # the sum (not zeroing w first) keeps an Inf input of one segment from turning the other
        # segments' columns into Inf * 0 = NaN.
        if NUM_SEGMENTS == 1:
            acc += tl.sum(x0[:, :, None] * w[None, :, :], axis=1)
        else:
            acc += tl.where(seg == 0, tl.sum(x0[:, :, None] * w[None, :, :], axis=1), 0.0)
            acc += tl.where(seg == 1, tl.sum(x1[:, :, None] * w[None, :, :], axis=1), 0.0)
            if NUM_SEGMENTS > 2:
                acc += tl.where(seg == 2, tl.sum(x2[:, :, None] * w[None, :, :], axis=1), 0.0)
            if NUM_SEGMENTS > 3:
                acc += tl.where(seg == 3, tl.sum(x3[:, :, None] * w[None, :, :], axis=1), 0.0)
    if SCALED:  # int8 codes: the per-output-channel scale, on each K slice's partial (the sum is linear)
        acc = acc * tl.load(s_ptr + offs_n64, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if BIAS_SEGMENTS != 0:  # the bias enters once, in K slice 0 (a multiply, not a mask: see _segment_keep)
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if BIAS_SEGMENTS & 1:
            bias += _segment_bias(b0_ptr, offs_n, seg, 0, 0, n_ok)
        if BIAS_SEGMENTS & 2:
            bias += _segment_bias(b1_ptr, offs_n, seg, 1, SEG_END_0, n_ok)
        if BIAS_SEGMENTS & 4:
            bias += _segment_bias(b2_ptr, offs_n, seg, 2, SEG_END_1, n_ok)
        if BIAS_SEGMENTS & 8:
            bias += _segment_bias(b3_ptr, offs_n, seg, 3, SEG_END_2, n_ok)
        acc += bias[None, :] * (pid_k == 0).to(tl.float32)
    tl.store(
        out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n64[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :],
    )


@functools.lru_cache(maxsize=None)
def _autotuned(block_m: int, n: int, k: int) -> Callable:
    """The kernel autotuned over its bucket's configs (one Autotuner per bucket, built once)."""
    configs = gemv_configs(block_m, n, k)
    if _interpreted():
        configs = configs[:1]  # autotuning in the interpreter only costs time
    return triton.autotune(configs=configs, key=["M", "N", "K"])(_sparse_gemv_kernel)


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


def sparse_gemv_triton(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    thresholds: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    splits: Sequence[int],
    launcher: Callable = lambda kernel: kernel,
    max_rows: int = 8,
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
    ts = _check_thresholds(thresholds, k, x2d.device)
    for b, s in zip(biases, splits):
        if b is not None and tuple(b.shape) != (s,):
            raise ValueError(f"sparse GEMV: a bias of shape {tuple(b.shape)} for a segment of {s} outputs")
    bs = [b if b is None or b.stride(0) == 1 else b.contiguous() for b in biases]
    bias_segments = sum(1 << i for i, b in enumerate(bs) if b is not None)
    ends = [sum(splits[: i + 1]) for i in range(len(splits) - 1)]
    ends += [n] * (MAX_SEGMENTS - 1 - len(ends))
    ts += [ts[0]] * (MAX_SEGMENTS - len(ts))
    bs = [b if b is not None else ts[0] for b in bs] + [ts[0]] * (MAX_SEGMENTS - len(bs))  # unread placeholders

    split_k = launch.split_k if launch is not None else split_k_for(n, k, _sm_count(x2d.device))
    granule = launch.block_k if launch is not None else K_GRANULE
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), granule) * granule
    split_k = triton.cdiv(k, k_per_split)  # no empty slice: every workspace plane is written
    if split_k == 1:
        out = torch.empty(1, m, n, dtype=x2d.dtype, device=x2d.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x2d.device)
    block_m = _block_m(m, max_rows)
    args = (
        x2d, weight, *ts, *bs, scale if scale is not None else ts[0], out,
        m, n, k, *ends,
        x2d.stride(0), x2d.stride(1),
        weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
    )
    constants = {
        "K_PER_SPLIT": k_per_split, "NUM_SEGMENTS": len(splits), "BIAS_SEGMENTS": bias_segments, "BLOCK_M": block_m,
        "SCALED": int(scale is not None),
    }
    if launch is not None:
        grid = (triton.cdiv(n, launch.block_n), split_k)
        launcher(_sparse_gemv_kernel)[grid](
            *args, **constants, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, num_warps=launch.num_warps
        )
    else:
        launcher(_autotuned(block_m, n, k_per_split))[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split_k)](
            *args, **constants
        )
    if split_k == 1:
        return out[0]
    return out.sum(0).to(x2d.dtype)


def sparse_gemv_int8_triton(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    thresholds: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    launcher: Callable = lambda kernel: kernel,
    max_rows: int = 8,
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
