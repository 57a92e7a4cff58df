"""The ``wisparse::sparse_linear`` op: its plain-torch reference and its Triton route.

Semantics (every route gives this result): ``x`` masked as ``wisparse_compile.mask`` defines
(channel i kept iff ``|x_i| > t_i`` in fp32, or NaN; pruned channels are zero), then ``x @ W^T + b``.

Routes: on CUDA, calls with at most ``max_sparse_rows`` token rows (decode) run the Triton sparse
GEMV; on CPU they run the C++ kernel (``cpu_kernel.py``) when it builds; everything else (prefill,
no compiler) masks ``x`` and runs the dense linear, which Inductor compiles and fuses (in fp32
for bf16/fp16 input-major weights on CPUs without native bf16/fp16 GEMM: ``masked_dense_linear``).
Registered with ``torch.library.triton_op`` so that, inserted before AOT autograd, Inductor traces
the body and inlines the Triton kernel into its generated code.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..mask import masked_input
from .cpu_kernel import cpu_sparse_gemv, input_major_gemm_is_slow, uses_cpu_kernel
from . import triton_route

log = logging.getLogger(__name__)

SPARSE_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sparse_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: torch.Tensor
) -> torch.Tensor:
    """Mask then dense: the definition of the op, and its CPU and prefill route."""
    return F.linear(masked_input(x, thresholds), weight, bias)


def masked_dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: torch.Tensor
) -> torch.Tensor:
    """The masked dense route (prefill, no kernel): the reference, in fp32 where bf16/fp16 is slow.

    PyTorch's CPU GEMM has no fast bf16/fp16 path for an input-major weight unless the CPU has
    native support (``input_major_gemm_is_slow``), and Inductor calls that same GEMM: on a 2-core
    AVX2 EPYC a 16-token 2048x8192 bf16 linear took ~2.2 s compiled, ~0.06 s on the row-major
    weight. Widening (an fp32 copy of the weight per call; MKL reads any layout) brought it to
    ~0.16 s; the result equals the bf16 GEMM's up to summation order (both accumulate in fp32).
    """
    if weight.dim() == 2 and weight.stride(-1) != 1 and input_major_gemm_is_slow(weight):
        bias32 = None if bias is None else bias.float()
        return sparse_linear_reference(x.float(), weight.float(), bias32, thresholds).to(x.dtype)
    return sparse_linear_reference(x, weight, bias, thresholds)


def _check_operands(x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor) -> None:
    torch._check(weight.dim() == 2, lambda: f"sparse_linear expects a 2-D [out, in] weight, got {weight.dim()}-D")
    torch._check(
        x.shape[-1] == weight.shape[1],
        lambda: f"sparse_linear: input has {x.shape[-1]} channels, weight expects {weight.shape[1]}",
    )
    torch._check(
        thresholds.dim() == 1 and thresholds.shape[0] == weight.shape[1],
        lambda: f"sparse_linear: thresholds must be 1-D of length {weight.shape[1]}, got {tuple(thresholds.shape)}",
    )


def uses_sparse_kernel(x: torch.Tensor, max_sparse_rows: int) -> bool:
    """Whether a call takes the Triton sparse GEMV (decode-sized calls on ``triton_route.TRITON_DEVICES``)."""
    if x.dtype not in SPARSE_KERNEL_DTYPES or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    if not statically_known_true(rows <= max_sparse_rows):
        return False
    return triton_route.triton_route_possible(x.device.type)


def sparse_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    thresholds: torch.Tensor,
    launcher=lambda kernel: kernel,
) -> torch.Tensor:
    """Run the Triton sparse GEMV on any device Triton reaches (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from .sparse_gemv import sparse_gemv_into  # imports triton

    _check_operands(x, weight, thresholds)
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    out = torch.zeros(x2d.shape[0], n, dtype=torch.float32, device=x.device)
    sparse_gemv_into(x2d, weight, thresholds, out, launcher)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


@triton_route.triton_op("wisparse::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    thresholds: torch.Tensor,
    max_sparse_rows: int = 8,
) -> torch.Tensor:
    """``F.linear(x masked by |x| > thresholds, weight, bias)``, routed by device and row count."""
    _check_operands(x, weight, thresholds)
    if uses_sparse_kernel(x, max_sparse_rows):
        return sparse_gemv(x, weight, bias, thresholds, launcher=torch.library.wrap_triton)
    if uses_cpu_kernel(x, weight, max_sparse_rows):
        return cpu_sparse_gemv(x, weight, bias, thresholds)
    return masked_dense_linear(x, weight, bias, thresholds)
