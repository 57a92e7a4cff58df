"""Triton sparse GEMV: y = (x * keep) @ W^T + b, skipping weight rows of pruned channels.

For decode (a few token rows). The weight is read input-major: channel k's weights
W[:, k] are one contiguous row when the weight is stored transposed (see ``attach``). Each
program owns a block of output features and a slice of the input channels (split-K); it loads a
weight row only if some token row keeps that channel (the union of the rows' masks), applies each
row's own mask to x, accumulates in fp32 and adds its partial sums atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, t_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_PROGRAM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_PROGRAM
    for k0 in range(0, K_PER_PROGRAM, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(tl.float32)
        t = tl.load(t_ptr + offs_k, mask=k_ok, other=float("inf")).to(tl.float32)
        keep = tl.abs(x) > t[None, :]
        x = tl.where(keep, x, 0.0)
        row_needed = tl.max(keep.to(tl.int32), axis=0) > 0  # union over token rows
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=row_needed[:, None] & n_ok[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    tl.atomic_add(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc, mask=m_ok[:, None] & n_ok[None, :],
    )


def launch_config(m: int, n: int, k: int) -> dict[str, int]:
    """Block sizes for a call: all token rows in one tile, split-K over the input channels."""
    block_m = max(1, triton.next_power_of_2(m))
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_k = 32 if block_m <= 4 else 16
    k_per_program = min(triton.cdiv(k, block_k), 8) * block_k
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "K_PER_PROGRAM": k_per_program}


def sparse_gemv_into(x2d: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor, out: torch.Tensor, launcher) -> None:
    """Accumulate ``(x2d * keep) @ weight.T`` into the zeroed fp32 ``out`` [M, N].

    ``launcher`` is ``torch.library.wrap_triton`` inside a triton_op, or an identity for direct
    (interpreter) calls.
    """
    m, k = x2d.shape
    n = weight.shape[0]
    cfg = launch_config(m, n, k)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["K_PER_PROGRAM"]))
    launcher(_sparse_gemv_kernel)[grid](
        x2d, weight, thresholds, out,
        m, n, k,
        x2d.stride(0), x2d.stride(1),
        weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
        **cfg,
    )
