"""The within-block greedy split (``allocation/refine.py``) and the ``Greedy`` strategy."""

import pytest
import torch

import wisparse_compile as wsc
from tests.allocation.conftest import block_setup, sensitive_model
from tests.conftest import token_batches
from wisparse_compile.allocation.refine import BlockSplitter, block_error, greedy_path


def test_refinement_lowers_block_error_and_keeps_block_budget():
    model = sensitive_model()
    stats, layout, calls, weight_ids, thresholds = block_setup(model, token_batches(2, seed=5))
    for block in layout.blocks:
        refined = BlockSplitter(block, calls[block.prefix], 0.5, 0.1, thresholds, weight_ids)(0.5)
        mean = sum(refined[n] * block.sizes[n] for n in block.linears) / block.size
        assert mean == pytest.approx(0.5, abs=1e-6)
        for group in block.groups:
            assert len({refined[n] for n in group}) == 1
        uniform = {n: 0.5 for n in block.linears}
        assert block_error(block, calls[block.prefix], refined, thresholds, weight_ids) < block_error(
            block, calls[block.prefix], uniform, thresholds, weight_ids)


def test_greedy_path_serves_every_budget():
    """One greedy run records a path; reading a budget off it holds that budget exactly, and up to the
    crossing step it is the greedy run to that budget."""
    model = sensitive_model()
    stats, layout, calls, weight_ids, thresholds = block_setup(model, token_batches(2, seed=5))
    block = layout.blocks[1]
    sizes = [block.group_size(g) for g in block.groups]
    path = greedy_path(block, calls[block.prefix], 0.8, 0.1, thresholds, weight_ids)
    assert path.budgets[0] == 0 and path.budgets[-2] < 0.8 <= path.budgets[-1] and path.budgets == sorted(path.budgets)
    assert path.evaluations < len(path.sizes) * (len(path.budgets) - 1)  # lazy: fewer than every group per step
    for k in range(1, len(path.budgets)):  # one group moves per step, never down
        moved = [b - a for a, b in zip(path.group_sparsities[k - 1], path.group_sparsities[k])]
        assert sum(m > 0 for m in moved) == 1 and min(moved) >= 0
    for budget in (0.0, 0.13, 0.5, 0.8):
        split = path.group_split(budget)
        assert sum(s * n for s, n in zip(split, sizes)) / block.size == pytest.approx(budget, abs=1e-9)
    lazy = greedy_path(block, calls[block.prefix], 0.25, 0.1, thresholds, weight_ids)
    assert lazy.budgets[-1] < path.budgets[-1]
    lazy.extend_to(0.8)  # extending on demand takes the same steps as one long run
    assert lazy.group_sparsities == path.group_sparsities
    with pytest.raises(ValueError, match="beyond the greedy path"):
        path.group_split(path.budgets[-1] + 0.01)


def test_weighted_block_error_is_the_weighted_squared_error():
    model = sensitive_model()
    stats, layout, calls, weight_ids, thresholds = block_setup(model, token_batches(2, seed=5))
    block = layout.blocks[1]
    half = {n: 0.5 for n in block.linears}
    ones = [torch.ones_like(o) for o in calls[block.prefix].outputs]
    mse = block_error(block, calls[block.prefix], half, thresholds, weight_ids)
    total = block_error(block, calls[block.prefix], half, thresholds, weight_ids, ones)
    assert total == pytest.approx(mse * sum(o.numel() for o in calls[block.prefix].outputs), rel=1e-5)
    zeros = [torch.zeros_like(o) for o in calls[block.prefix].outputs]
    assert block_error(block, calls[block.prefix], half, thresholds, weight_ids, zeros) == 0.0


def test_greedy_strategy_keeps_every_block_at_the_target_and_splits_inside():
    """``Greedy`` (the default of teal and wina): each block's parameter-weighted sparsity is the
    target, linears inside a block differ, and the record holds each block's greedy path."""
    model = sensitive_model()
    config = wsc.SparsityConfig(sparsity=0.5, method="teal", refinement_tokens=128)
    assert config.strategy == wsc.Greedy()
    plan = wsc.calibrate(model, token_batches(4, seed=5), config)
    record = plan.stats["allocation"]
    assert record["kind"] == "greedy" and set(record["block_sparsities"].values()) == {0.5}
    for prefix, steps in record["refinement"].items():
        members = [n for n in plan.names if n.startswith(prefix)]
        sizes = {n: torch.Size(plan.shapes[n]).numel() for n in members}
        assert sum(plan.sparsities[n] * sizes[n] for n in members) / sum(sizes.values()) == pytest.approx(0.5, abs=1e-6)
        assert len({plan.sparsities[n] for n in members}) > 1 and steps and steps[-1]["budget"] >= 0.5
