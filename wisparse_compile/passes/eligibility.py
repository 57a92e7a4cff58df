"""When a matched linear may run sparse: one set of rules for plain linears and stacked experts.

Matches nothing and emits nothing: ``check_eligibility`` takes what a matcher found (the weight,
the dim its input channels sit on in the call, the activation's example value and row count,
whether the node runs under autocast) and returns the plan entry to use, or the ``DenseReason``
the linear stays dense for. ``expected_route`` says which route an emitted op takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from ..planned import plan_of, sharding_problem
from ..config import BackendConfig
from ..kernels import Layout, Route, decode_sized, route_of
from ..sharding import is_dtensor
from .decisions import DenseReason


@dataclass(frozen=True)
class Eligibility:
    """The verdict on one linear: its plan entry (if any) and, when it must stay dense, why."""

    plan_name: str | None
    reason_kind: DenseReason | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.reason_kind is None


def _dtype_name(x: Any) -> str | None:
    return str(x.dtype).removeprefix("torch.") if isinstance(x, torch.Tensor) else None


def check_eligibility(
    weight: Any, in_dim: int, x: Any, rows: Any, under_autocast: bool, config: BackendConfig
) -> Eligibility:
    """Whether the contraction of ``x`` with ``weight`` may become a sparse op, checked in order.

    weight: the example input behind the weight operand (a planned parameter, or not).
    in_dim: the weight dim that the call contracts with ``x``'s channels.
    x: the activation's example value; rows: its token rows (symbolic under dynamic shapes).
    under_autocast: autocast would run the call in its own dtype, and the sparse ops have no
        autocast rule, so rewriting would silently change the precision.
    """
    site = plan_of(weight)
    if site is None:
        problem = sharding_problem(weight)
        return Eligibility(None, DenseReason.SHARDING, problem) if problem else Eligibility(None, DenseReason.NO_PLAN)
    name = site.name
    if is_dtensor(x):
        return Eligibility(name, DenseReason.SHARDING,
                           "runs on DTensors, not on its local shard (the sparse ops take local tensors)")
    if in_dim != site.in_dim:
        return Eligibility(name, DenseReason.IN_DIM,
                           f"weight used with input channels on dim {in_dim}, planned on dim {site.in_dim}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return Eligibility(name, DenseReason.INPUT_DTYPE, f"unsupported input dtype {_dtype_name(x)}")
    if x.dtype != weight.dtype:
        return Eligibility(name, DenseReason.DTYPE_MISMATCH, f"input dtype {_dtype_name(x)} differs from weight dtype")
    if under_autocast:
        return Eligibility(name, DenseReason.AUTOCAST, "inside an autocast region (the sparse ops have no autocast rule)")
    if not config.mask_prefill and not decode_sized(x, config.max_sparse_rows):
        return Eligibility(name, DenseReason.PREFILL, "prefill left dense (mask_prefill=False)")
    return Eligibility(name)


def expected_route(x: Any, weight: Any, layout: Layout, config: BackendConfig) -> Route:
    """The route ``sparse_linear(x, weight, ..., layout)`` is lowered to: the op's own decision, with
    the same guard on a symbolic row count (``kernels.route_of``), so the report names what really runs."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return Route.MASKED_DENSE
    return route_of(x, weight, layout, config.max_sparse_rows)
