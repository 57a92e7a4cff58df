"""Triton sparse GEMV: y = (x * keep) @ W^T + b, skipping weight rows of pruned channels.

For decode (a few token rows). The weight is read input-major: channel k's weights
W[:, k] are one contiguous row when the weight is stored transposed (see ``attach``). Each
program owns a block of output features and a slice of the input channels (split-K); it loads a
weight row only if some token row keeps that channel (the union of the rows' masks), applies each
row's own mask to x, accumulates in fp32 and adds its partial sums atomically.

Fused siblings (``passes/fuse_siblings.py``): the weight may be the concatenation of up to
``MAX_SEGMENTS`` weights that read the same input, each with its own thresholds (weight-aware
thresholds differ per weight). Output column n belongs to segment ``seg(n)``; a program loads a
weight row if any token row keeps that channel under the thresholds of any segment its block of
columns touches, and each segment's columns see x masked by that segment's own thresholds. With
one segment this is the plain sparse GEMV.

Block sizes, split-K and warps are autotuned per (M, N, K, dtypes); under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tests) a single config is used, since autotuning there is slow.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from .triton_route import MAX_SEGMENTS


def autotune_configs() -> list[triton.Config]:
    """Configs to try: one under the interpreter, a grid of tile/split-K/warps on a GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "K_PER_PROGRAM": 256}, num_warps=4)]
    configs = []
    for block_n in (64, 128, 256):
        for block_k, k_steps in ((16, 8), (32, 4), (32, 8), (64, 4), (64, 8), (128, 4)):
            for warps in (2, 4, 8):
                configs.append(
                    triton.Config(
                        {"BLOCK_N": block_n, "BLOCK_K": block_k, "K_PER_PROGRAM": block_k * k_steps},
                        num_warps=warps,
                    )
                )
    return configs


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


@triton.autotune(configs=autotune_configs(), key=["M", "N", "K"], reset_to_zero=["out_ptr"])
@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, t0_ptr, t1_ptr, t2_ptr, t3_ptr, out_ptr,
    M, N, K, B1, B2, B3,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_om, stride_on,
    NUM_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_PROGRAM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Segment of each output column: columns [0, B1) are weight 0, [B1, B2) weight 1, ...
    seg = (offs_n >= B1).to(tl.int32) + (offs_n >= B2).to(tl.int32) + (offs_n >= B3).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_PROGRAM
    for k0 in range(0, K_PER_PROGRAM, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
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
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=needed[:, None] & n_ok[None, :], other=0.0,
        ).to(tl.float32)
        if NUM_SEGMENTS == 1:
            acc += tl.sum(x0[:, :, None] * w[None, :, :], axis=1)
        else:
            acc += tl.sum(x0[:, :, None] * tl.where(seg == 0, w, 0.0)[None, :, :], axis=1)
            acc += tl.sum(x1[:, :, None] * tl.where(seg == 1, w, 0.0)[None, :, :], axis=1)
            if NUM_SEGMENTS > 2:
                acc += tl.sum(x2[:, :, None] * tl.where(seg == 2, w, 0.0)[None, :, :], axis=1)
            if NUM_SEGMENTS > 3:
                acc += tl.sum(x3[:, :, None] * tl.where(seg == 3, w, 0.0)[None, :, :], axis=1)
    tl.atomic_add(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc, mask=m_ok[:, None] & n_ok[None, :],
    )


def sparse_gemv_into(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    thresholds: torch.Tensor | Sequence[torch.Tensor],
    out: torch.Tensor,
    launcher,
    splits: Sequence[int] | None = None,
) -> None:
    """Accumulate ``(x2d * keep) @ weight.T`` into the zeroed fp32 ``out`` [M, N].

    ``thresholds`` is one tensor, or one per segment of ``weight`` when ``splits`` (the output
    sizes of the concatenated weights) is given. ``launcher`` is ``torch.library.wrap_triton``
    inside a triton_op, or an identity for direct (interpreter) calls.
    """
    m, k = x2d.shape
    n = weight.shape[0]
    ts = [thresholds] if isinstance(thresholds, torch.Tensor) else list(thresholds)
    splits = list(splits) if splits is not None else [n]
    if len(ts) != len(splits) or not 1 <= len(ts) <= MAX_SEGMENTS or sum(splits) != n:
        raise ValueError(
            f"sparse GEMV: {len(ts)} threshold tensors for output splits {splits} of a weight with {n} rows "
            f"(need one per split, at most {MAX_SEGMENTS}, splits summing to {n})"
        )
    bounds = [sum(splits[: i + 1]) for i in range(len(splits) - 1)]
    bounds += [n] * (3 - len(bounds))
    ts += [ts[0]] * (MAX_SEGMENTS - len(ts))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["K_PER_PROGRAM"]))

    launcher(_sparse_gemv_kernel)[grid](
        x2d, weight, ts[0], ts[1], ts[2], ts[3], out,
        m, n, k, bounds[0], bounds[1], bounds[2],
        x2d.stride(0), x2d.stride(1),
        weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
        NUM_SEGMENTS=len(splits), BLOCK_M=max(1, triton.next_power_of_2(m)),
    )
