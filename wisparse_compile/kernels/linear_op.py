"""The ``wisparse::sparse_linear`` op, for every weight layout, beside its plain-torch reference.

``sparse_linear(x, weight, bias, thresholds, max_sparse_rows, layout="float", scale=None,
out_features=None)`` equals ``F.linear(x masked by thresholds, W, bias)``, ``W`` the ``[out, in]``
weight the operands stand for (``formats.py``: a float weight itself, or int8/int4 codes with their
scales). ``x`` is masked as ``wisparse_compile.mask`` defines (channel i kept iff ``|x_i| > t_i`` in
fp32, or NaN; pruned channels are zero); ``thresholds=None`` keeps every channel, so the same op
serves a quantized linear with no plan (the output head).

Routes: the route table (``sparse_kernels.route_of``, the only place that decides) by layout,
device and row count: decode-sized calls run the Triton sparse GEMV on CUDA and the C++ kernel on
CPU where one exists for the layout; everything else (prefill, no kernel) runs the masked dense
route, which Inductor compiles and fuses. Registered with ``torch.library.triton_op`` so that,
inserted before AOT autograd, Inductor traces the body and inlines the Triton kernel into its
generated code.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import formats, triton_route
from .routing import DEFAULT_MAX_SPARSE_ROWS
from .sparse_kernels import kernel_for


def sparse_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: Optional[torch.Tensor],
    layout: str = "float", scale: Optional[torch.Tensor] = None, out_features: Optional[int] = None,
) -> torch.Tensor:
    """The definition of ``sparse_linear``: mask, then the dense linear on the weight the operands stand for."""
    return formats.reference(x, weight, bias, thresholds, formats.layout_named(layout), scale, out_features)


@triton_route.triton_op("wisparse::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
    max_sparse_rows: int = DEFAULT_MAX_SPARSE_ROWS,
    layout: str = "float",
    scale: Optional[torch.Tensor] = None,
    out_features: Optional[int] = None,
) -> torch.Tensor:
    """``F.linear(x masked by |x| > thresholds, W, bias)``, routed by the route table."""
    kind = formats.layout_named(layout)
    n = formats.check_operands("sparse_linear", x, weight, thresholds, kind, scale, out_features)
    kernel = kernel_for(x, weight, kind, max_sparse_rows)
    if kernel is not None:
        return kernel.single(x, weight, bias, thresholds, scale, n, max_sparse_rows)
    return formats.masked_dense(x, weight, bias, thresholds, kind, scale, n)

