"""What a planned weight carries (``planned.py``): its plan slot, read off the weight itself; gone from
a copy or a pickle, kept through dtype moves (quantized weights included) and same-layout views."""

import copy
import io

import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from wisparse_compile.planned import (
    PLAN_ATTRIBUTE, WeightPlan, clear_plan, plan_generation, plan_of, planned_sparsity, set_plan, sharding_problem,
    thresholds_of,
)

DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def plan():
    return wsc.calibrate(tiny_llama(), token_batches(1), wsc.SparsityConfig(sparsity=0.5, method="teal"))


def test_slot_accessors_and_generation():
    model = torch.nn.Linear(4, 3)
    w = model.weight
    assert plan_of(w) is None and thresholds_of(w) is None and planned_sparsity("not a tensor") is None
    before = plan_generation()
    slot = WeightPlan("lin", 1, 0.25, torch.full((4,), 0.5), relaid=False, model=model)
    set_plan([w], slot)
    assert plan_generation() > before and plan_of(w) is slot and planned_sparsity(w) == 0.25
    assert thresholds_of(w) is thresholds_of(w) and thresholds_of(w).dtype == torch.float32
    assert plan_of(w[:]) is slot  # a view with the same shape and strides: the weight itself
    assert plan_of(w[:2]) is None and plan_of(w.t()) is None
    assert clear_plan([w]) is slot and plan_of(w) is None and not hasattr(w, PLAN_ATTRIBUTE)


def test_a_slot_with_a_problem_runs_dense_and_says_why():
    model = torch.nn.Linear(4, 3)
    set_plan([model.weight], WeightPlan("lin", 1, 0.5, None, False, model, problem="shard takes no slice"))
    assert plan_of(model.weight) is None and thresholds_of(model.weight) is None
    assert sharding_problem(model.weight) == "shard takes no slice"


@pytest.mark.parametrize("weights", [None, "int8", "int4"])
def test_copies_and_pickles_carry_no_plan_moves_keep_it(plan, weights):
    model = wsc.attach(tiny_llama(), plan, weights=weights)
    weight = model.get_submodule(DOWN).weight
    slot = plan_of(weight)
    assert slot is not None and slot.name == DOWN
    copied = copy.deepcopy(model)
    assert plan_of(copied.get_submodule(DOWN).weight) is None and wsc.attached_plan(copied) is None
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert plan_of(torch.load(buffer, weights_only=False).get_submodule(DOWN).weight) is None
    model.to(torch.bfloat16)  # plain weights: data swapped in place; quantized ones: contents swapped
    moved = model.get_submodule(DOWN).weight
    assert moved is weight and plan_of(moved) is slot and thresholds_of(moved).dtype == torch.float32
