"""Budgets across blocks: per-block sparsities whose parameter-weighted mean is the global target.

Shared by the strategies that move sparsity between blocks (``sensitivity``, ``search``): the exact
optimum of summed block costs at one exchange rate (``lagrangian_budgets``), and the projection of
any per-block values back onto the budget and the per-block bounds (``project``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def check_budget(target: float, low: float, high: float) -> None:
    """Raise a clear error when per-block bounds cannot meet the global target."""
    if not low <= target <= high:
        raise ValueError(
            f"impossible budget: the target sparsity {target} lies outside the per-block bounds "
            f"[{low}, {high}], so no split meets it; widen min_block_sparsity/max_block_sparsity"
        )


def project(genome: np.ndarray, sizes: np.ndarray, target: float, low: float, high: float) -> np.ndarray:
    """Shift ``genome`` by one constant, clipped to [low, high], so its size-weighted mean is ``target``."""
    def mean(c: float) -> float:
        return float(np.dot(np.clip(genome + c, low, high), sizes) / sizes.sum())

    lo, hi = low - float(genome.max()), high - float(genome.min())
    for _ in range(100):  # mean(c) is monotone in c: bisection
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    return np.clip(genome + 0.5 * (lo + hi), low, high)


def lagrangian_budgets(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]], sizes: Sequence[int], target: float,
) -> list[float]:
    """Per-block budgets with parameter-weighted mean ``target`` that minimise the summed error, each
    block's error given as a curve of (budgets, errors) points (its greedy path), errors in one unit.

    At an exchange rate ``lam`` (error per pruned parameter) every block takes the curve point that
    minimises ``error - lam * budget * size``; ``lam`` is bisected until the budgets straddle the
    target, and the two straddling choices are blended to meet it exactly. This is the exact optimum
    on the curves' lower convex hulls: no search, nothing fitted to validation tokens."""
    size_arr = np.asarray(sizes, dtype=np.float64)
    if not curves or len(curves) != len(size_arr):
        raise ValueError(f"need one (budgets, errors) curve per block, got {len(curves)} for {len(size_arr)} blocks")
    reach = float(np.dot([max(b) for b, _ in curves], size_arr) / size_arr.sum())
    if reach < target - 1e-9:
        raise ValueError(f"the blocks' curves reach a mean sparsity of {reach:.4f} only, below the target {target}")
    arrays = [(np.asarray(b, dtype=np.float64), np.asarray(e, dtype=np.float64)) for b, e in curves]

    def pick(lam: float) -> np.ndarray:
        return np.array([b[int(np.argmin(e - lam * b * n))] for (b, e), n in zip(arrays, size_arr)])

    def mean(g: np.ndarray) -> float:
        return float(np.dot(g, size_arr) / size_arr.sum())

    lo, hi = 0.0, 1.0
    while mean(pick(hi)) < target and hi < 1e30:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean(pick(mid)) < target else (lo, mid)
    below, above = pick(lo), pick(hi)
    m_below, m_above = mean(below), mean(above)
    frac = 0.0 if m_above <= m_below else (target - m_below) / (m_above - m_below)
    return (below + frac * (above - below)).tolist()
