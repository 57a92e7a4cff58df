"""The ``wisparse::sparse_linear_int8`` op: a sparse (or dense) linear on int8 weights, beside its reference.

``sparse_linear_int8(x, qweight, scale, bias, thresholds, max_sparse_rows)`` equals
``F.linear(x masked by thresholds, W, bias)`` with ``W = (qweight.float() * scale).t()``:
``qweight`` is int8 ``[in, out]`` (input-major, so a pruned channel skips one contiguous int8 row),
``scale`` fp32 ``[out]`` (symmetric per output channel; ``wisparse_compile.quantize``).
``thresholds=None`` keeps every channel: the same op serves dense linears (the output head).

Routes (``route_of_int8``, the only place that decides): decode-sized calls run the C++ int8 GEMV
on CPU (fp32/bf16 activations; accumulates ``x * q`` in fp32, applies scale and bias in its
epilogue) and the Triton int8 GEMV on CUDA; everything else (prefill, no kernel) masks ``x``,
multiplies by the int8 codes widened to ``x``'s dtype (exact: |q| <= 127 fits every float type)
and scales the result, which Inductor compiles and fuses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..mask import masked_input
from . import routing, triton_route
from .cpu_sparse_gemv import cpu_sparse_gemv_int8, uses_cpu_kernel_int8
from .linear_op import route_by_device


def dequantized_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` weight ``qweight [in, out]`` and ``scale [out]`` stand for, in ``dtype``."""
    return (qweight.to(torch.float32) * scale).to(dtype).t()


def sparse_linear_int8_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
) -> torch.Tensor:
    """The definition: mask (unless ``thresholds`` is None), then the dense linear on the dequantized weight."""
    xm = x if thresholds is None else masked_input(x, thresholds)
    return F.linear(xm, dequantized_weight(qweight, scale, x.dtype), bias)


def masked_dense_int8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
) -> torch.Tensor:
    """The prefill route: ``(masked x @ q) * scale + bias``; the scale applied to the product, not to the weight."""
    xm = x if thresholds is None else masked_input(x, thresholds)
    out = torch.matmul(xm, qweight.to(x.dtype)) * scale.to(x.dtype)
    return out if bias is None else out + bias


def check_int8_operands(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, thresholds: Optional[torch.Tensor]
) -> None:
    """Shapes and dtypes of one int8 linear's operands, each failure naming the problem."""
    torch._check(
        qweight.dim() == 2 and qweight.dtype == torch.int8,
        lambda: f"sparse_linear_int8 expects an int8 [in, out] weight, got {qweight.dtype} {qweight.dim()}-D",
    )
    torch._check(
        x.shape[-1] == qweight.shape[0],
        lambda: f"sparse_linear_int8: input has {x.shape[-1]} channels, weight expects {qweight.shape[0]}",
    )
    torch._check(
        scale.dim() == 1 and scale.shape[0] == qweight.shape[1],
        lambda: f"sparse_linear_int8: scale must be 1-D of length {qweight.shape[1]}, got {tuple(scale.shape)}",
    )
    if thresholds is not None:
        torch._check(
            thresholds.dim() == 1 and thresholds.shape[0] == qweight.shape[0],
            lambda: f"sparse_linear_int8: thresholds must be 1-D of length {qweight.shape[0]}, got {tuple(thresholds.shape)}",
        )


def route_of_int8(x: torch.Tensor, max_sparse_rows: int) -> str:
    """The route a ``sparse_linear_int8`` call takes (``routing.ROUTES``); the op and reports both ask here."""
    return route_by_device(x, max_sparse_rows, lambda: uses_cpu_kernel_int8(x, max_sparse_rows))


def sparse_gemv_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
    launcher=lambda kernel: kernel,
    max_rows: int = 8,
    launch=None,
) -> torch.Tensor:
    """Run the Triton int8 sparse GEMV on any device Triton reaches (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from .triton_sparse_gemv import sparse_gemv_int8_triton  # imports triton

    check_int8_operands(x, qweight, scale, thresholds)
    k, n = qweight.shape
    out = sparse_gemv_int8_triton(x.reshape(-1, k), qweight, scale, thresholds, bias, launcher, max_rows, launch)
    return out.reshape(*x.shape[:-1], n)


@triton_route.triton_op("wisparse::sparse_linear_int8", mutates_args=())
def sparse_linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
    max_sparse_rows: int = 8,
) -> torch.Tensor:
    """``F.linear(x masked by |x| > thresholds, dequantized weight, bias)``, routed by ``route_of_int8``."""
    check_int8_operands(x, qweight, scale, thresholds)
    route = route_of_int8(x, max_sparse_rows)
    if route == routing.TRITON:
        return sparse_gemv_int8(x, qweight, scale, bias, thresholds, torch.library.wrap_triton, max_sparse_rows)
    if route == routing.CPU_KERNEL:
        return cpu_sparse_gemv_int8(x, qweight, scale, bias, thresholds)
    return masked_dense_int8(x, qweight, scale, bias, thresholds)
