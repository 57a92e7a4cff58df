"""The ``wisparse::sparse_linear_fused`` op: sibling sparse linears that read one input, in one call.

``sparse_linear_fused(x, weights, biases, thresholds, fused_weight, max_sparse_rows)`` equals
``cat([sparse_linear(x, w_i, b_i, t_i) for i], -1)``: every sibling keeps its own thresholds
(weight-aware thresholds differ per weight), so each output segment applies its own mask.

``fused_weight`` is the siblings' weights concatenated along the output dim and laid out
input-major (``[sum(out_i), in]`` with strides ``(1, sum(out_i))``), prepared once by the backend
(``passes/fuse_siblings.py``), never per call. Routes: decode-sized CUDA calls run ONE Triton
sparse GEMV over ``fused_weight`` (a weight row is loaded if any sibling keeps that channel; each
sibling's bias is added inside the kernel, so no bias is concatenated per call); everything else
runs the per-sibling ``sparse_linear`` routes on the original weights (CPU C++ kernel, masked
dense reference) and concatenates.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .linear_op import check_operands, sparse_linear, uses_sparse_kernel
from .triton_route import MAX_SEGMENTS, triton_op


def _check_fused(x: torch.Tensor, weights: List[torch.Tensor], thresholds: List[torch.Tensor], fused_weight: torch.Tensor) -> None:
    torch._check(
        1 <= len(weights) <= MAX_SEGMENTS and len(thresholds) == len(weights),
        lambda: f"sparse_linear_fused: need 1..{MAX_SEGMENTS} weights with one threshold tensor each",
    )
    for w, t in zip(weights, thresholds):
        check_operands(x, w, t)
    n = sum(w.shape[0] for w in weights)
    torch._check(
        tuple(fused_weight.shape) == (n, x.shape[-1]),
        lambda: f"sparse_linear_fused: fused weight must be [{n}, {x.shape[-1]}], got {tuple(fused_weight.shape)}",
    )


def sparse_gemv_fused(
    x: torch.Tensor,
    fused_weight: torch.Tensor,
    biases: List[Optional[torch.Tensor]],
    thresholds: List[torch.Tensor],
    splits: List[int],
    launcher=lambda kernel: kernel,
    max_rows: int = 8,
    launch=None,
) -> torch.Tensor:
    """One Triton sparse GEMV over the concatenated weight (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from .triton_sparse_gemv import sparse_gemv_triton  # imports triton

    n, k = fused_weight.shape
    out = sparse_gemv_triton(x.reshape(-1, k), fused_weight, thresholds, biases, splits, launcher, max_rows, launch)
    return out.reshape(*x.shape[:-1], n)


@triton_op("wisparse::sparse_linear_fused", mutates_args=())
def sparse_linear_fused(
    x: torch.Tensor,
    weights: List[torch.Tensor],
    biases: List[Optional[torch.Tensor]],
    thresholds: List[torch.Tensor],
    fused_weight: torch.Tensor,
    max_sparse_rows: int = 8,
) -> torch.Tensor:
    """``cat([sparse_linear(x, w_i, b_i, t_i)], -1)``; one kernel launch on decode-sized CUDA calls."""
    _check_fused(x, weights, thresholds, fused_weight)
    if uses_sparse_kernel(x, max_sparse_rows):
        splits = [w.shape[0] for w in weights]
        return sparse_gemv_fused(
            x, fused_weight, biases, thresholds, splits, torch.library.wrap_triton, max_sparse_rows
        )
    return torch.cat(
        [sparse_linear(x, w, b, t, max_sparse_rows) for w, b, t in zip(weights, biases, thresholds)], dim=-1
    )
