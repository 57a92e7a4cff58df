"""Sparse-linear kernels: one registered op per semantics, each beside its reference, and one route table.

Ops: ``linear_op`` (``wisparse::sparse_linear``: one linear, any weight layout), ``group_op``
(``wisparse::sparse_linear_group``: sibling linears that read one input, in one call), ``expert_ops``
(``wisparse::sparse_experts``: contractions of stacked expert weights).
Beneath them: ``routing`` (the ``Route`` and ``Layout`` enums, what decode-sized means),
``formats`` (per layout: the operand check, the dense weight, the masked dense route),
``sparse_kernels`` (the route table: per (layout, device) the kernel a decode-sized call runs),
``triton_route`` (whether Triton is there), ``triton_sparse_gemv`` (the Triton kernel, imported on
first use), ``cpu_sparse_gemv`` (the C++ CPU kernel's build and wrappers; source beside it),
``layout`` (the input-major layout the kernels read).
"""

from ..mask import expert_keep_mask, expert_of_rows, keep_mask
from .cpu_sparse_gemv import cpu_compile_patches, cpu_kernel_available, input_major_gemm_is_slow
from .expert_ops import EXPERT_FORMS, sparse_experts, sparse_experts_reference
from .group_op import sparse_linear_group, sparse_linear_group_reference
from .linear_op import sparse_linear, sparse_linear_reference
from .routing import DEFAULT_MAX_SPARSE_ROWS, Layout, Route, decode_sized
from .sparse_kernels import KERNELS, route_of, sparse_gemv, sparse_gemv_fused, sparse_gemv_int8
from . import formats, sparse_kernels, triton_route
from .triton_route import MAX_SEGMENTS

__all__ = [
    "DEFAULT_MAX_SPARSE_ROWS", "EXPERT_FORMS", "KERNELS", "Layout", "MAX_SEGMENTS", "Route", "cpu_compile_patches",
    "cpu_kernel_available", "decode_sized", "expert_keep_mask", "expert_of_rows", "input_major_gemm_is_slow",
    "keep_mask", "route_of", "sparse_experts", "sparse_experts_reference", "sparse_gemv", "sparse_gemv_fused",
    "sparse_gemv_int8", "sparse_linear", "sparse_linear_group", "sparse_linear_group_reference",
    "sparse_linear_reference",
]
