"""When a matched linear may run sparse (``passes/eligibility.py``): every reason to stay dense, checked
against the plan slot the weight carries, and the route an emitted op is expected to take."""

import pytest
import torch
from torch import nn

from wisparse_compile.config import BackendConfig
from wisparse_compile.kernels import Layout, Route, cpu_kernel_available
from wisparse_compile.kernels.layout import input_major
from wisparse_compile.passes.decisions import DenseReason
from wisparse_compile.passes.eligibility import check_eligibility, expected_route
from wisparse_compile.planned import WeightPlan, set_plan


def _planned(problem=None):
    linear = nn.Linear(8, 4)
    set_plan([linear.weight], WeightPlan("lin", 1, 0.5, None if problem else torch.zeros(8), False, linear, problem))
    return linear.weight


@pytest.mark.parametrize(("case", "kind"), [
    ("no plan", DenseReason.NO_PLAN), ("shard takes no slice", DenseReason.SHARDING), ("in_dim", DenseReason.IN_DIM),
    ("int input", DenseReason.INPUT_DTYPE), ("bf16 input", DenseReason.DTYPE_MISMATCH), ("autocast", DenseReason.AUTOCAST),
    ("prefill", DenseReason.PREFILL), ("ok", None),
])
def test_each_reason_to_stay_dense(case, kind):
    weight = nn.Linear(8, 4).weight if case == "no plan" else _planned("sharded" if case == "shard takes no slice" else None)
    x = {"int input": torch.ones(2, 8, dtype=torch.long), "bf16 input": torch.ones(2, 8, dtype=torch.bfloat16),
         "prefill": torch.ones(16, 8)}.get(case, torch.ones(2, 8))
    config = BackendConfig(mask_prefill=case != "prefill")
    verdict = check_eligibility(weight, 0 if case == "in_dim" else 1, x, x.shape[0], case == "autocast", config)
    assert verdict.reason_kind is kind and verdict.ok == (kind is None)
    assert verdict.plan_name == (None if case in ("no plan", "shard takes no slice") else "lin")
    if case == "shard takes no slice":
        assert verdict.reason == "sharded"


def test_expected_route_is_the_ops_own():
    weight = input_major(torch.randn(4, 8))
    expected = Route.CPU_KERNEL if cpu_kernel_available() else Route.MASKED_DENSE
    assert expected_route(torch.ones(1, 8), weight, Layout.FLOAT, BackendConfig()) == expected
    assert expected_route(torch.ones(9, 8), weight, Layout.FLOAT, BackendConfig()) == Route.MASKED_DENSE
    assert expected_route(None, weight, Layout.FLOAT, BackendConfig()) == Route.MASKED_DENSE
