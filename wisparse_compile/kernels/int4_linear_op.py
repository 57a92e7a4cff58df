"""The ``wisparse::sparse_linear_int4`` op: a sparse (or dense) linear on 4-bit weights, beside its reference.

``sparse_linear_int4(x, qweight, scale, out_features, bias, thresholds, max_sparse_rows)`` equals
``F.linear(x masked by thresholds, W, bias)`` with ``W`` the ``[out_features, in]`` weight that
``quantize.dequantize_int4`` makes of ``qweight`` (uint8 ``[in, ceil(out/2)]``, two 4-bit codes per
byte, input-major) and ``scale`` (fp32 ``[in, ceil(out/32)]``, one per input channel and 32
outputs). ``out_features`` is explicit because an odd count leaves a spare nibble.
``thresholds=None`` keeps every channel: the same op serves dense linears (the output head).

Routes (``route_of_int4``, the only place that decides): decode-sized calls on CPU run the C++
int4 GEMV (fp32/bf16 activations, fp32 accumulation, ``x * scale`` per kept row and group);
everything else masks ``x`` and multiplies by the unpacked, scaled weight, which Inductor compiles
and fuses. There is no Triton int4 kernel yet: decode-sized calls on a Triton device take that
masked dense route too (logged once), never a wrong kernel.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from ..mask import masked_input
from ..quantize import INT4_GROUP_SIZE, dequantize_int4
from . import routing, triton_route
from .cpu_sparse_gemv import cpu_sparse_gemv_int4, uses_cpu_kernel_int8
from .linear_op import route_by_device

log = logging.getLogger(__name__)

_logged_no_triton: set[str] = set()


def sparse_linear_int4_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
) -> torch.Tensor:
    """The definition: mask (unless ``thresholds`` is None), then the dense linear on the dequantized weight."""
    xm = x if thresholds is None else masked_input(x, thresholds)
    return F.linear(xm, dequantize_int4(qweight, scale, out_features, x.dtype), bias)


def masked_dense_int4(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
) -> torch.Tensor:
    """The prefill route: ``masked x @ (unpacked codes * scale)``, the ``[in, out]`` weight row-major
    (the fast layout of every CPU GEMM, bf16 included), then the bias."""
    xm = x if thresholds is None else masked_input(x, thresholds)
    out = torch.matmul(xm, dequantize_int4(qweight, scale, out_features, x.dtype).t())
    return out if bias is None else out + bias


def check_int4_operands(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, out_features: int, thresholds: Optional[torch.Tensor]
) -> None:
    """Shapes and dtypes of one int4 linear's operands, each failure naming the problem."""
    torch._check(
        qweight.dim() == 2 and qweight.dtype == torch.uint8,
        lambda: f"sparse_linear_int4 expects packed uint8 [in, ceil(out/2)] codes, got {qweight.dtype} {qweight.dim()}-D",
    )
    torch._check(
        qweight.shape[1] == (out_features + 1) // 2,
        lambda: f"sparse_linear_int4: {out_features} outputs take {(out_features + 1) // 2} bytes per row, the codes have {qweight.shape[1]}",
    )
    torch._check(
        x.shape[-1] == qweight.shape[0],
        lambda: f"sparse_linear_int4: input has {x.shape[-1]} channels, weight expects {qweight.shape[0]}",
    )
    groups = (out_features + INT4_GROUP_SIZE - 1) // INT4_GROUP_SIZE
    torch._check(
        scale.dim() == 2 and scale.shape[0] == qweight.shape[0] and scale.shape[1] == groups,
        lambda: f"sparse_linear_int4: scale must be [{qweight.shape[0]}, {groups}] (one per input channel and 32 outputs), got {tuple(scale.shape)}",
    )
    if thresholds is not None:
        torch._check(
            thresholds.dim() == 1 and thresholds.shape[0] == qweight.shape[0],
            lambda: f"sparse_linear_int4: thresholds must be 1-D of length {qweight.shape[0]}, got {tuple(thresholds.shape)}",
        )


def route_of_int4(x: torch.Tensor, max_sparse_rows: int) -> str:
    """The route a ``sparse_linear_int4`` call takes (``routing.ROUTES``); the op and reports both ask here.

    The int8 rule (same CPU kernel conditions: CPU, fp32/bf16, decode-sized, kernel built), except
    that without a Triton int4 kernel a Triton device's decode calls take the masked dense route."""
    route = route_by_device(x, max_sparse_rows, lambda: uses_cpu_kernel_int8(x, max_sparse_rows))
    if route == routing.TRITON:
        if x.device.type not in _logged_no_triton:
            _logged_no_triton.add(x.device.type)
            log.warning(
                "wisparse: no Triton int4 kernel exists yet: int4 decode on %s takes the masked dense route "
                "(correct, not faster); weights='int8' has a Triton kernel", x.device.type,
            )
        return routing.MASKED_DENSE
    return route


@triton_route.triton_op("wisparse::sparse_linear_int4", mutates_args=())
def sparse_linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    out_features: int,
    bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
    max_sparse_rows: int = 8,
) -> torch.Tensor:
    """``F.linear(x masked by |x| > thresholds, dequantized weight, bias)``, routed by ``route_of_int4``."""
    check_int4_operands(x, qweight, scale, out_features, thresholds)
    if route_of_int4(x, max_sparse_rows) == routing.CPU_KERNEL:
        return cpu_sparse_gemv_int4(x, qweight, scale, out_features, bias, thresholds)
    return masked_dense_int4(x, qweight, scale, out_features, bias, thresholds)
