"""The ``wisparse::sparse_linear_group`` op: sibling sparse linears that read one input, in one call.

``sparse_linear_group(x, weights, biases, thresholds, max_sparse_rows, layout, scales, out_features,
fused_weight=None)`` equals ``cat([sparse_linear(x, w_i, b_i, t_i, max_sparse_rows, layout, s_i,
n_i) for i], -1)``: every sibling keeps its own thresholds (weight-aware thresholds differ per
weight), so each output segment applies its own mask. All members share one layout; ``scales``
holds None for float weights, ``out_features`` every member's output count.

Routes: the members' route (``sparse_kernels.route_of``: it depends on ``x``, the layout and, for
float weights on the CPU, each weight's layout), and where that kernel has a group form, one call:

- float siblings on a Triton device run ONE Triton sparse GEMV over ``fused_weight`` (the weights
  concatenated along the outputs, input-major, prepared once by ``passes/fuse_siblings.py``, never
  per call): a weight row is loaded if any sibling keeps that channel, each sibling's bias is added
  inside the kernel;
- int8/int4 siblings on the CPU run one C++ call that streams each member's kept rows from its own
  storage (nothing copied: ``passes/group_quantized.py``): one dispatch instead of two or three, and
  one split between threads, which cuts the kept rows of all members evenly by bytes (a 576x192
  int8 projection at 50% alone is ~55 KB, too little to split; q, k and v together are ~280 KB).

Everything else runs each member's own route and concatenates.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import formats, triton_route
from .routing import Layout
from .sparse_kernels import kernel_for
from .triton_route import MAX_SEGMENTS


def _check_group(
    x: torch.Tensor, weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
    thresholds: List[Optional[torch.Tensor]], layout: Layout, scales: List[Optional[torch.Tensor]],
    out_features: List[int], fused_weight: Optional[torch.Tensor],
) -> None:
    """The member lists agree in length, each member's operands pass ``formats.check_operands``, and a
    fused weight fits them."""
    torch._check(
        1 <= len(weights) <= MAX_SEGMENTS,
        lambda: f"sparse_linear_group: needs 1..{MAX_SEGMENTS} weights, got {len(weights)}",
    )
    lengths = [len(entries) for entries in (biases, thresholds, scales, out_features)]
    torch._check(
        all(n == len(weights) for n in lengths),
        lambda: f"sparse_linear_group: needs one entry per weight in every list (biases, thresholds, scales, "
        f"out_features), got {len(weights)} weights and lists of {lengths}",
    )
    for w, t, s, n in zip(weights, thresholds, scales, out_features):
        got = formats.check_operands("sparse_linear_group", x, w, t, layout, s, n)
        torch._check(got == n, lambda: f"sparse_linear_group: a weight has {got} outputs, out_features says {n}")
    if fused_weight is not None:
        total = sum(out_features)
        torch._check(
            layout is Layout.FLOAT and tuple(fused_weight.shape) == (total, x.shape[-1]),
            lambda: f"sparse_linear_group: fused weight must be a float [{total}, {x.shape[-1]}], "
            f"got {fused_weight.dtype} {tuple(fused_weight.shape)}",
        )


def sparse_linear_group_reference(
    x: torch.Tensor, weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
    thresholds: List[Optional[torch.Tensor]], layout: str = "float", scales: Optional[List[Optional[torch.Tensor]]] = None,
    out_features: Optional[List[Optional[int]]] = None,
) -> torch.Tensor:
    """The definition of ``sparse_linear_group``: each member's reference, concatenated."""
    kind = formats.layout_named(layout)
    scales = scales or [None] * len(weights)
    out_features = out_features or [None] * len(weights)
    return torch.cat(
        [formats.reference(x, w, b, t, kind, s, n) for w, b, t, s, n in zip(weights, biases, thresholds, scales, out_features)],
        dim=-1,
    )


@triton_route.triton_op("wisparse::sparse_linear_group", mutates_args=())
def sparse_linear_group(
    x: torch.Tensor,
    weights: List[torch.Tensor],
    biases: List[Optional[torch.Tensor]],
    thresholds: List[Optional[torch.Tensor]],
    max_sparse_rows: int,
    layout: str,
    scales: List[Optional[torch.Tensor]],
    out_features: List[int],
    fused_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``cat([sparse_linear(x, w_i, b_i, t_i, ...)], -1)``; one kernel call where the route has a group form."""
    kind = formats.layout_named(layout)
    _check_group(x, weights, biases, thresholds, kind, scales, out_features, fused_weight)
    kernels = [kernel_for(x, w, kind, max_sparse_rows) for w in weights]
    kernel = kernels[0]
    same = kernel is not None and all(k is kernel for k in kernels)
    if same and kernel.group is not None and (fused_weight is not None or not kernel.group_needs_fused_weight):
        return kernel.group(x, weights, biases, thresholds, scales, out_features, fused_weight, max_sparse_rows)
    outs = []
    for k, w, b, t, s, n in zip(kernels, weights, biases, thresholds, scales, out_features):
        run = k.single if k is not None else None
        outs.append(run(x, w, b, t, s, n, max_sparse_rows) if run else formats.masked_dense(x, w, b, t, kind, s, n))
    return torch.cat(outs, dim=-1)

