"""The registry and ``allocate`` (``allocation/registry.py``), end to end through ``calibrate``.
(``SparsityConfig``'s allocation options: tests/test_config.py.)"""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from wisparse_compile.allocation import Allocation, register_strategy, split_batches, strategy_for
from wisparse_compile.allocation.registry import _STRATEGIES
from wisparse_compile.allocation.search import Search
from wisparse_compile.config import AllocationConfig


@pytest.mark.parametrize("method", ["teal", "wina", "wisparse"])
def test_budget_holds_and_linears_hit_their_targets(method):
    # many short rows: in a random model a row's attention output varies little along the row, so
    # held-out sparsity is only as stable as the number of rows (16 rows of 64: +-3 points)
    model = tiny_llama(seed=0, layers=3)
    config = wsc.SparsityConfig(sparsity=0.5, method=method, refinement_tokens=128)
    plan = wsc.calibrate(model, token_batches(10, batch=16, length=16, seed=2), config)
    assert abs(plan.mean_sparsity() - 0.5) <= 0.005
    assert len(set(round(s, 4) for s in plan.sparsities.values())) > 1, "allocation stayed uniform"
    wsc.attach(model, plan)
    try:
        # every planned linear masked, as compiled: thresholds are calibrated on the masked model
        achieved = wsc.measure_sparsity(model, token_batches(8, batch=16, length=16, seed=77), masked=True)
    finally:
        wsc.detach(model)
    assert set(achieved) == set(plan.names)
    for name, target in plan.sparsities.items():
        assert abs(achieved[name] - target) <= 0.02, (name, achieved[name], target)


@pytest.mark.parametrize("method", ["teal", "wina", "wisparse"])
def test_uniform_gives_every_linear_the_target(method):
    config = wsc.SparsityConfig(sparsity=0.4, method=method, allocation=wsc.Uniform())
    plan = wsc.calibrate(tiny_llama(layers=2), token_batches(3), config)
    assert set(plan.sparsities.values()) == {0.4}
    assert plan.stats["allocation"] == {"kind": "uniform"}


def test_zero_sparsity_allocates_nothing_whatever_the_strategy():
    plan = wsc.calibrate(tiny_llama(layers=2), token_batches(1), wsc.SparsityConfig(sparsity=0.0, allocation=Search()))
    assert set(plan.sparsities.values()) == {0.0} and plan.stats["allocation"]["kind"] == "uniform"


def test_same_seed_same_plan():
    cfg = wsc.SparsityConfig(sparsity=0.4, method="wisparse", seed=7, refinement_tokens=128)
    a = wsc.calibrate(tiny_llama(layers=3), token_batches(4, seed=9), cfg)
    b = wsc.calibrate(tiny_llama(layers=3), token_batches(4, seed=9), cfg)
    assert a.sparsities == b.sparsities
    for n in a.names:
        assert torch.equal(a.channel_thresholds[n], b.channel_thresholds[n])


@pytest.mark.parametrize("method", ["teal", "wisparse"])
def test_masked_recalibration_holds_sparsity_with_every_linear_masked(method):
    """Thresholds come from a second pass under the plan's own masks: on those tokens, with every
    planned linear masked (what the compiled model does), each linear hits its allocated sparsity.
    Without it, each linear hits its sparsity only on dense activations."""
    model = tiny_llama(seed=4, layers=3)
    batches = token_batches(8, batch=4, length=32, seed=8)
    config = dict(sparsity=0.6, method=method, refinement_tokens=128)
    plan = wsc.calibrate(model, batches, wsc.SparsityConfig(**config))
    dense_only = wsc.calibrate(model, batches, wsc.SparsityConfig(**config, masked_recalibration=False))
    assert plan.sparsities == dense_only.sparsities  # same allocation, different thresholds
    assert "dense_calibration_sparsity" in plan.stats
    calibration, _ = split_batches(batches, wsc.SparsityConfig(**config))

    def errors(p, masked):
        wsc.attach(model, p)
        try:
            achieved = wsc.measure_sparsity(model, calibration, masked=masked)
        finally:
            wsc.detach(model)
        return {n: abs(achieved[n] - p.sparsities[n]) for n in p.names}

    assert max(errors(plan, masked=True).values()) <= 0.02  # measured 0.007
    assert max(errors(dense_only, masked=False).values()) <= 0.02
    assert max(errors(dense_only, masked=True).values()) > 0.05  # measured 0.11: the overshoot it fixes
    moved = [n for n in plan.names if not torch.equal(plan.channel_thresholds[n], dense_only.channel_thresholds[n])]
    assert len(moved) > len(plan.names) // 2  # upstream masking changed what most linears see


@pytest.mark.parametrize("allocation", [wsc.Greedy(), wsc.Sensitivity()])
def test_single_block_model_keeps_the_target_block_budget(allocation):
    config = wsc.SparsityConfig(sparsity=0.4, allocation=allocation)
    plan = wsc.calibrate(tiny_llama(layers=1), token_batches(2), config)
    assert plan.mean_sparsity() == pytest.approx(0.4, abs=0.005)
    assert list(plan.stats["allocation"]["block_sparsities"].values()) == pytest.approx([0.4])


# -- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DepthRamp(AllocationConfig):
    """A strategy defined outside the package: linear ``i`` of ``n`` gets ``target + slope * (i / (n - 1) - 0.5)``."""

    name: ClassVar[str] = "depth-ramp"
    slope: float = 0.2


@register_strategy(_DepthRamp)
def _depth_ramp(problem, options: _DepthRamp) -> Allocation:
    n = len(problem.names)
    return Allocation({name: problem.target + options.slope * (i / (n - 1) - 0.5) for i, name in enumerate(problem.names)},
                      {"slope": options.slope})


def test_a_registered_strategy_is_dispatched_to_without_touching_allocate():
    plan = wsc.calibrate(tiny_llama(layers=2), token_batches(2), wsc.SparsityConfig(sparsity=0.5, allocation=_DepthRamp(0.2)))
    values = [plan.sparsities[n] for n in plan.names]
    assert values[0] == pytest.approx(0.4) and values[-1] == pytest.approx(0.6) and np.all(np.diff(values) > 0)
    assert plan.stats["allocation"] == {"kind": "depth-ramp", "slope": 0.2}
    assert plan.config["allocation"] == {"strategy": "depth-ramp", "slope": 0.2}


def test_each_kept_strategy_is_registered_and_an_unregistered_one_is_a_clear_error():
    for options in (wsc.Uniform(), wsc.Greedy(), wsc.Sensitivity(), Search()):
        assert strategy_for(options) is _STRATEGIES[type(options)]

    @dataclass(frozen=True)
    class Unknown(AllocationConfig):
        name: ClassVar[str] = "unknown"

    with pytest.raises(TypeError, match=r"no allocation strategy is registered for Unknown.*register_strategy\(Unknown\)"):
        wsc.calibrate(tiny_llama(layers=1), token_batches(1), wsc.SparsityConfig(allocation=Unknown()))

    @dataclass(frozen=True)
    class Stricter(wsc.Sensitivity):  # a subclass with nothing of its own runs its base's strategy
        pass

    assert strategy_for(Stricter()) is _STRATEGIES[wsc.Sensitivity]


def test_a_type_gets_one_strategy():
    with pytest.raises(ValueError, match="Greedy already has an allocation strategy"):
        register_strategy(wsc.Greedy)(lambda problem, options: Allocation({}))
    with pytest.raises(TypeError, match="AllocationConfig subclass"):
        register_strategy(dict)
