"""Sparse-linear kernels: the registered ops with their references, their routes, and the kernels.

Modules: ``linear_op`` (``wisparse::sparse_linear`` and its reference), ``fused_linear_op``
(``wisparse::sparse_linear_fused``, sibling linears in one launch), ``expert_ops`` (stacked expert
weights: ``sparse_grouped_mm``, ``sparse_bmm``), ``routing`` (which route a call takes),
``triton_route`` (whether Triton is there), ``triton_sparse_gemv`` (the Triton kernel, imported on
first use), ``cpu_sparse_gemv`` (the C++ CPU kernel's build and routing; source beside it),
``int8_linear_op`` (``wisparse::sparse_linear_int8``: int8 weights, sparse or dense),
``int4_linear_op`` (``wisparse::sparse_linear_int4``: 4-bit weights grouped along the outputs),
``quantized_group_op`` (``sparse_linear_int8_group``/``_int4_group``: quantized siblings in one call).
"""

from ..mask import expert_keep_mask, expert_of_rows, keep_mask
from .cpu_sparse_gemv import cpu_compile_patches, cpu_kernel_available, input_major_gemm_is_slow
from .expert_ops import sparse_bmm, sparse_grouped_mm
from .int8_linear_op import route_of_int8, sparse_linear_int8, sparse_linear_int8_reference
from .int4_linear_op import route_of_int4, sparse_linear_int4, sparse_linear_int4_reference
from .quantized_group_op import sparse_linear_int4_group, sparse_linear_int8_group
from .fused_linear_op import sparse_gemv_fused, sparse_linear_fused
from .linear_op import route_of, sparse_gemv, sparse_linear, sparse_linear_reference
from .routing import decode_sized
from .triton_route import MAX_SEGMENTS

__all__ = [
    "MAX_SEGMENTS", "cpu_compile_patches", "cpu_kernel_available", "decode_sized", "expert_keep_mask", "expert_of_rows", "input_major_gemm_is_slow",
    "keep_mask", "route_of", "sparse_bmm", "sparse_gemv", "sparse_gemv_fused", "sparse_grouped_mm", "sparse_linear",
    "sparse_linear_fused", "sparse_linear_int8", "sparse_linear_int8_reference", "sparse_linear_reference", "route_of_int8",
    "route_of_int4", "sparse_linear_int4", "sparse_linear_int4_reference", "sparse_linear_int4_group",
    "sparse_linear_int8_group",
]
