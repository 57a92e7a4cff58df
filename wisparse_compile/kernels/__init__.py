"""Sparse-linear kernels: the registered op, its reference, and the Triton GEMV."""

from .sparse_linear import keep_mask, sparse_gemv, sparse_linear, sparse_linear_reference
from .sparse_linear_fused import sparse_gemv_fused, sparse_linear_fused

__all__ = [
    "keep_mask", "sparse_gemv", "sparse_gemv_fused", "sparse_linear", "sparse_linear_fused", "sparse_linear_reference",
]
