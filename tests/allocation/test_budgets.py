"""Budgets across blocks (``allocation/budgets.py``): the exchange-rate optimum and the projection."""

import numpy as np
import pytest

from wisparse_compile.allocation.budgets import check_budget, lagrangian_budgets, project


def test_lagrangian_budgets_meet_the_target_and_spare_the_costly_block():
    budgets = [0.0, 0.2, 0.4, 0.6, 0.8]
    curves = [(budgets, [c * b ** 2 for b in budgets]) for c in (1.0, 4.0, 1.0)]  # block 1 costs 4x
    sizes = [2, 1, 3]
    out = lagrangian_budgets(curves, sizes, 0.5)
    assert np.dot(out, sizes) / sum(sizes) == pytest.approx(0.5, abs=1e-9)
    assert out[1] < 0.5 and out[1] == min(out)
    assert lagrangian_budgets([(budgets, [b for b in budgets])] * 3, sizes, 0.8) == pytest.approx([0.8] * 3)
    with pytest.raises(ValueError, match="reach a mean sparsity"):
        lagrangian_budgets([([0.0, 0.4], [0.0, 1.0])] * 3, sizes, 0.5)
    with pytest.raises(ValueError, match="one \\(budgets, errors\\) curve per block"):
        lagrangian_budgets(curves[:2], sizes, 0.5)


def test_project_meets_the_budget_within_the_bounds():
    sizes = np.array([1.0, 3.0, 2.0])
    clipped = project(np.array([0.0, 2.0, 0.5]), np.ones(3), 0.5, 0.0, 0.9)
    assert clipped.mean() == pytest.approx(0.5) and clipped.max() <= 0.9
    shifted = project(np.array([0.1, 0.5, 0.3]), sizes, 0.6, 0.2, 0.8)
    assert float(np.dot(shifted, sizes) / sizes.sum()) == pytest.approx(0.6, abs=1e-9)
    assert shifted.min() >= 0.2 - 1e-12 and shifted.max() <= 0.8 + 1e-12
    assert np.all(np.diff(shifted[[0, 2, 1]]) >= -1e-12)  # one shift: the order is kept


def test_impossible_budget_is_a_clear_error():
    check_budget(0.5, 0.0, 0.9)
    with pytest.raises(ValueError, match="impossible budget.*min_block_sparsity/max_block_sparsity"):
        check_budget(0.5, 0.6, 0.9)
