"""Per weight layout: the one operand check, the dense weight the operands stand for, and the masked dense route.

A sparse linear's weight operand is ``weight`` plus, for quantized layouts, ``scale`` and (int4)
``out_features`` (``routing.Layout``; ``quant.primitives`` defines the codes):

- ``float``: ``weight`` ``[out, in]`` in the activations' dtype, no scale;
- ``int8``: ``weight`` int8 codes ``[in, out]``, ``scale`` fp32 ``[out]``;
- ``int4``: ``weight`` packed uint8 codes ``[in, ceil(out/2)]``, ``scale`` fp32 ``[in, ceil(out/32)]``,
  ``out_features`` explicit (an odd count leaves a spare nibble).

Every op of the package checks its operands here (``check_operands``) and every reference is
``F.linear(masked x, dense_weight(...), bias)``. The masked dense route is the reference computed
the fast way for each layout (``masked_dense``): what prefill-sized calls, and calls with no sparse
kernel for their device, run.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..mask import masked_input
from ..quant.primitives import INT4_GROUP_SIZE, dequantize_int4, dequantize_int8
from .cpu_sparse_gemv import input_major_gemm_is_slow
from .routing import Layout


def layout_named(layout: str) -> Layout:
    """``Layout(layout)``, with an error naming the layouts there are."""
    try:
        return Layout(layout)
    except ValueError:
        raise ValueError(f"unknown weight layout {layout!r}; known: {[item.value for item in Layout]}") from None


def out_features_of(weight: torch.Tensor, layout: Layout, out_features: Optional[int]) -> int:
    """How many outputs the weight operand has: read off its shape, except for int4 (given)."""
    if layout is Layout.FLOAT:
        return weight.shape[0]
    if layout is Layout.INT8:
        return weight.shape[1]
    torch._check(out_features is not None, lambda: "int4 weights need out_features (two outputs a byte)")
    return int(out_features)  # type: ignore[arg-type]


def in_features_of(weight: torch.Tensor, layout: Layout) -> int:
    return weight.shape[1] if layout is Layout.FLOAT else weight.shape[0]


def check_operands(
    name: str, x: torch.Tensor, weight: torch.Tensor, thresholds: Optional[torch.Tensor], layout: Layout,
    scale: Optional[torch.Tensor] = None, out_features: Optional[int] = None,
) -> int:
    """Shapes and dtypes of one sparse linear's operands, each failure naming the problem and the op
    (``name``); returns the output count."""
    if layout is Layout.FLOAT:
        torch._check(weight.dim() == 2 and weight.is_floating_point(),
                     lambda: f"{name} expects a 2-D floating-point [out, in] weight, got {weight.dtype} {weight.dim()}-D")
        torch._check(scale is None, lambda: f"{name}: a float weight takes no scale (quantized weights say layout='int8'/'int4')")
        torch._check(thresholds is not None, lambda: f"{name}: a float weight needs thresholds (a dense float linear is F.linear)")
    elif layout is Layout.INT8:
        torch._check(weight.dim() == 2 and weight.dtype == torch.int8,
                     lambda: f"{name} expects an int8 [in, out] weight, got {weight.dtype} {weight.dim()}-D")
        torch._check(scale is not None and scale.dim() == 1 and scale.shape[0] == weight.shape[1],
                     lambda: f"{name}: scale must be 1-D of length {weight.shape[1]}, got {None if scale is None else tuple(scale.shape)}")
    else:
        torch._check(weight.dim() == 2 and weight.dtype == torch.uint8,
                     lambda: f"{name} expects packed uint8 [in, ceil(out/2)] codes, got {weight.dtype} {weight.dim()}-D")
        n = out_features_of(weight, layout, out_features)
        torch._check(weight.shape[1] == (n + 1) // 2,
                     lambda: f"{name}: {n} outputs take {(n + 1) // 2} bytes per row, the codes have {weight.shape[1]}")
        groups = (n + INT4_GROUP_SIZE - 1) // INT4_GROUP_SIZE
        torch._check(
            scale is not None and scale.dim() == 2 and scale.shape[0] == weight.shape[0] and scale.shape[1] == groups,
            lambda: f"{name}: scale must be [{weight.shape[0]}, {groups}] (one per input channel and 32 outputs), "
            f"got {None if scale is None else tuple(scale.shape)}",
        )
    k = in_features_of(weight, layout)
    torch._check(x.shape[-1] == k, lambda: f"{name}: input has {x.shape[-1]} channels, weight expects {k}")
    if thresholds is not None:
        torch._check(
            thresholds.dim() == 1 and thresholds.shape[0] == k,
            lambda: f"{name}: thresholds must be 1-D of length {k}, got {tuple(thresholds.shape)}",
        )
        torch._check(
            thresholds.is_floating_point(),
            lambda: f"{name}: thresholds must be floating point (float32), got {thresholds.dtype}",
        )
    return out_features_of(weight, layout, out_features)


def dense_weight(
    weight: torch.Tensor, layout: Layout, scale: Optional[torch.Tensor], out_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The ``[out, in]`` weight the operands stand for, in ``dtype`` (float: the weight itself)."""
    if layout is Layout.FLOAT:
        return weight
    if layout is Layout.INT8:
        return dequantize_int8(weight, scale, dtype)
    return dequantize_int4(weight, scale, out_features, dtype)


def masked(x: torch.Tensor, thresholds: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` masked by ``thresholds`` (``mask.py``); None keeps every channel (a dense quantized linear)."""
    return x if thresholds is None else masked_input(x, thresholds)


def reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: Optional[torch.Tensor],
    layout: Layout, scale: Optional[torch.Tensor] = None, out_features: Optional[int] = None,
) -> torch.Tensor:
    """The definition of a sparse linear of any layout: mask, then the dense linear on the weight it stands for."""
    n = out_features_of(weight, layout, out_features)
    return F.linear(masked(x, thresholds), dense_weight(weight, layout, scale, n, x.dtype), bias)


def masked_dense(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: Optional[torch.Tensor],
    layout: Layout, scale: Optional[torch.Tensor] = None, out_features: Optional[int] = None,
) -> torch.Tensor:
    """The masked dense route (prefill, no kernel): the reference, computed the fast way per layout.

    float: in fp32 where bf16/fp16 is slow. PyTorch's CPU GEMM has no fast bf16/fp16 path for an
    input-major weight unless the CPU has native support (``input_major_gemm_is_slow``), and Inductor
    calls that same GEMM: on a 2-core AVX2 EPYC a 16-token 2048x8192 bf16 linear took ~2.2 s
    compiled, ~0.06 s on the row-major weight. Widening (an fp32 copy of the weight per call; MKL
    reads any layout) brought it to ~0.16 s; the result equals the bf16 GEMM's up to summation order.
    int8: ``(masked x @ q) * scale + bias``, the scale applied to the product, the codes widened to
    ``x``'s dtype (exact: |q| <= 127 fits every float type).
    int4: ``masked x @ (unpacked codes * scale)``, the ``[in, out]`` weight row-major (the fast layout
    of every CPU GEMM, bf16 included), then the bias.
    """
    xm = masked(x, thresholds)
    if layout is Layout.FLOAT:
        if weight.dim() == 2 and weight.stride(-1) != 1 and input_major_gemm_is_slow(weight):
            bias32 = None if bias is None else bias.float()
            return F.linear(xm.float(), weight.float(), bias32).to(x.dtype)
        return F.linear(xm, weight, bias)
    if layout is Layout.INT8:
        out = torch.matmul(xm, weight.to(x.dtype)) * scale.to(x.dtype)
    else:
        n = out_features_of(weight, layout, out_features)
        out = torch.matmul(xm, dequantize_int4(weight, scale, n, x.dtype).t())
    return out if bias is None else out + bias
