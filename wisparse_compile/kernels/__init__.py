"""Sparse-linear kernels: the registered ops, their references, and the Triton GEMV."""

from ..mask import expert_keep_mask, expert_of_rows, keep_mask
from .sparse_experts import sparse_bmm, sparse_grouped_mm
from .sparse_linear import sparse_gemv, sparse_linear, sparse_linear_reference
from .sparse_linear_fused import sparse_gemv_fused, sparse_linear_fused

__all__ = [
    "expert_keep_mask", "expert_of_rows", "keep_mask", "sparse_bmm", "sparse_gemv", "sparse_gemv_fused",
    "sparse_grouped_mm", "sparse_linear", "sparse_linear_fused", "sparse_linear_reference",
]
