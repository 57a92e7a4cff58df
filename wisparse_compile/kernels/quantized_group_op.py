"""``wisparse::sparse_linear_int8_group`` / ``sparse_linear_int4_group``: quantized sibling linears
that read one input, in one call.

``sparse_linear_int8_group(x, qweights, scales, biases, thresholds, max_sparse_rows)`` equals
``cat([sparse_linear_int8(x, q_i, s_i, b_i, t_i, max_sparse_rows) for i], -1)`` (int4 likewise, with
the output counts): each weight keeps its own thresholds. Unlike ``sparse_linear_fused`` nothing is
copied: the C++ kernel streams each weight's kept rows from that weight's own storage. What the
group shares is one dispatch instead of two or three, and one split between threads, which cuts
the kept rows of all members evenly by bytes (a 576x192 int8 projection at 50% alone is ~55 KB,
too little to split; q, k and v together are ~280 KB). The siblings come from
``passes/group_quantized.py``.

Routes: the members' own route (``route_of_int8``/``route_of_int4``; it depends on ``x`` only, so it
is the same for every member): the C++ group kernel on CPU, else each member's op, concatenated.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import routing, triton_route
from .cpu_sparse_gemv import cpu_sparse_gemv_int4_group, cpu_sparse_gemv_int8_group
from .int4_linear_op import check_int4_operands, route_of_int4, sparse_linear_int4
from .int8_linear_op import check_int8_operands, route_of_int8, sparse_linear_int8


def _check_lengths(name: str, weights: list, *per_weight: list) -> None:
    torch._check(len(weights) >= 1, lambda: f"{name}: needs at least one weight")
    torch._check(
        all(len(entries) == len(weights) for entries in per_weight),
        lambda: f"{name}: needs one entry per weight in every list (scales, biases, thresholds), "
        f"got {len(weights)} weights and lists of {[len(entries) for entries in per_weight]}",
    )


@triton_route.triton_op("wisparse::sparse_linear_int8_group", mutates_args=())
def sparse_linear_int8_group(
    x: torch.Tensor,
    qweights: List[torch.Tensor],
    scales: List[torch.Tensor],
    biases: List[Optional[torch.Tensor]],
    thresholds: List[Optional[torch.Tensor]],
    max_sparse_rows: int = 8,
) -> torch.Tensor:
    """``cat([sparse_linear_int8(x, q_i, s_i, b_i, t_i)], -1)``; one C++ call on decode-sized CPU calls."""
    _check_lengths("sparse_linear_int8_group", qweights, scales, biases, thresholds)
    for q, s, t in zip(qweights, scales, thresholds):
        check_int8_operands(x, q, s, t)
    if route_of_int8(x, max_sparse_rows) == routing.CPU_KERNEL:
        return cpu_sparse_gemv_int8_group(x, qweights, scales, biases, thresholds)
    return torch.cat(
        [sparse_linear_int8(x, q, s, b, t, max_sparse_rows) for q, s, b, t in zip(qweights, scales, biases, thresholds)],
        dim=-1,
    )


@triton_route.triton_op("wisparse::sparse_linear_int4_group", mutates_args=())
def sparse_linear_int4_group(
    x: torch.Tensor,
    qweights: List[torch.Tensor],
    scales: List[torch.Tensor],
    out_features: List[int],
    biases: List[Optional[torch.Tensor]],
    thresholds: List[Optional[torch.Tensor]],
    max_sparse_rows: int = 8,
) -> torch.Tensor:
    """``cat([sparse_linear_int4(x, q_i, s_i, n_i, b_i, t_i)], -1)``; one C++ call on decode-sized CPU calls."""
    _check_lengths("sparse_linear_int4_group", qweights, scales, out_features, biases, thresholds)
    for q, s, n, t in zip(qweights, scales, out_features, thresholds):
        check_int4_operands(x, q, s, n, t)
    if route_of_int4(x, max_sparse_rows) == routing.CPU_KERNEL:
        return cpu_sparse_gemv_int4_group(x, qweights, scales, out_features, biases, thresholds)
    return torch.cat(
        [
            sparse_linear_int4(x, q, s, n, b, t, max_sparse_rows)
            for q, s, n, b, t in zip(qweights, scales, out_features, biases, thresholds)
        ],
        dim=-1,
    )
