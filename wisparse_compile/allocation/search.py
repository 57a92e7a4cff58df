"""Across-block allocation: an evolutionary search over per-block sparsities at a fixed budget.

Genome: one sparsity per block, within ``[min_block_sparsity, max_block_sparsity]``, whose
parameter-weighted mean is the global target. Both operators keep that mean exact: mutation moves
sparsity between a few pairs of blocks in proportion to their sizes (few moves, so a child differs
from its parent along a direction that can be judged, not by noise in every block), crossover
blends two parents convexly. The first population holds the uniform split and depth ramps (sparsity
rising or falling linearly with depth, projected back onto the budget): whether early or late
blocks tolerate more sparsity is the largest structure a model's allocation usually has. Elites
survive, so the result is never worse than uniform on the fitness data. Fitness (lower is better)
is supplied by the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# depth ramps in the first population: sparsity difference between the last and the first block
RAMP_SLOPES = (0.2, -0.2, 0.4, -0.4)


@dataclass
class SearchResult:
    """The best per-block sparsities, their fitness, the uniform fitness and the history."""

    sparsities: list[float]
    fitness: float
    uniform_fitness: float
    history: list[dict[str, object]] = field(default_factory=list)


def check_budget(target: float, low: float, high: float) -> None:
    """Raise a clear error when per-block bounds cannot meet the global target."""
    if not low <= target <= high:
        raise ValueError(
            f"impossible budget: the target sparsity {target} lies outside the per-block bounds "
            f"[{low}, {high}], so no split meets it; widen min_block_sparsity/max_block_sparsity"
        )


def _mutate(genome: np.ndarray, sizes: np.ndarray, scale: float, low: float, high: float,
            rng: np.random.Generator, moves: int) -> np.ndarray:
    g = genome.copy()
    for _ in range(moves):
        i, j = rng.choice(len(g), size=2, replace=False)
        ratio = sizes[i] / sizes[j]
        lo = max(low - g[i], (g[j] - high) / ratio)
        hi = min(high - g[i], (g[j] - low) / ratio)
        if lo > hi:
            continue
        d = float(np.clip(rng.normal(0.0, scale), lo, hi))
        g[i] += d
        g[j] -= d * ratio
    return np.clip(g, low, high)


def project(genome: np.ndarray, sizes: np.ndarray, target: float, low: float, high: float) -> np.ndarray:
    """Shift ``genome`` by one constant, clipped to [low, high], so its size-weighted mean is ``target``."""
    def mean(c: float) -> float:
        return float(np.dot(np.clip(genome + c, low, high), sizes) / sizes.sum())

    lo, hi = low - float(genome.max()), high - float(genome.min())
    for _ in range(100):  # mean(c) is monotone in c: bisection
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    return np.clip(genome + 0.5 * (lo + hi), low, high)


def depth_ramps(sizes: np.ndarray, target: float, low: float, high: float, slopes: Sequence[float]) -> list[np.ndarray]:
    """Budget-keeping genomes whose sparsity changes linearly from the first block to the last by ``slope``."""
    depth = np.linspace(-0.5, 0.5, len(sizes))
    return [project(target + slope * depth, sizes, target, low, high) for slope in slopes]


def evolve(
    fitness: Callable[[Sequence[float]], float], sizes: Sequence[int], target: float, *,
    population: int, generations: int, mutation_scale: float, elite: int,
    low: float, high: float, seed: int,
) -> SearchResult:
    """Minimise ``fitness`` over per-block sparsities with parameter-weighted mean ``target``."""
    check_budget(target, low, high)
    size_arr = np.asarray(sizes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    moves = max(1, round(len(sizes) ** 0.5 / 2))  # 30 blocks: 3 pairs per mutation
    cache: dict[tuple[float, ...], float] = {}

    def score(genome: np.ndarray) -> float:
        key = tuple(np.round(genome, 6).tolist())
        if key not in cache:
            cache[key] = float(fitness(genome.tolist()))
        return cache[key]

    uniform = np.full(len(sizes), float(target))
    if len(sizes) < 2:  # one block: the budget fixes its sparsity, nothing to search
        fit = score(uniform)
        log.info("one block: its sparsity is the target %.3f; no search", target)
        record = {"generation": 0, "best": fit, "mean": fit, "worst": fit, "best_block_sparsities": uniform.tolist()}
        return SearchResult(uniform.tolist(), fit, fit, [record])
    ramps = depth_ramps(size_arr, float(target), low, high, RAMP_SLOPES)[: max(0, population // 2)]
    pop = [uniform, *ramps]
    pop += [_mutate(uniform, size_arr, mutation_scale, low, high, rng, moves) for _ in range(population - len(pop))]
    uniform_fitness = score(uniform)
    history: list[dict[str, object]] = []
    for gen in tqdm(range(generations + 1), desc="allocation search", unit="gen", leave=False):
        scores = [score(g) for g in pop]
        order = np.argsort(scores, kind="stable")
        pop = [pop[k] for k in order]
        scores = [scores[k] for k in order]
        history.append({
            "generation": gen, "best": scores[0], "mean": float(np.mean(scores)),
            "worst": scores[-1], "best_block_sparsities": [round(v, 6) for v in pop[0].tolist()],
        })
        log.info("generation %d: best fitness %.6g (uniform %.6g), mean %.6g", gen, scores[0], uniform_fitness, history[-1]["mean"])
        if gen == generations:
            break
        children = [p.copy() for p in pop[:elite]]
        while len(children) < population:
            a, b = (min(rng.choice(len(pop), size=2, replace=False)) for _ in range(2))  # tournaments of 2
            alpha = rng.uniform()
            child = alpha * pop[a] + (1.0 - alpha) * pop[b]
            children.append(_mutate(child, size_arr, mutation_scale, low, high, rng, moves))
        pop = children
    return SearchResult(pop[0].tolist(), scores[0], uniform_fitness, history)


def depth_basis(blocks: int, degree: int) -> np.ndarray:
    """[blocks, degree]: Legendre polynomials P1..P_degree of block depth mapped onto [-1, 1].

    Smooth, nearly orthogonal directions: P1 tilts sparsity towards early or late blocks, P2 moves
    it between the ends and the middle, and so on."""
    depth = np.linspace(-1.0, 1.0, blocks)
    return np.stack([np.polynomial.legendre.Legendre.basis(k)(depth) for k in range(1, degree + 1)], axis=1)


@dataclass
class ProfileSearchResult(SearchResult):
    """A depth-profile search: the chosen coefficients, and each finalist's fitness on the search
    split and on the selection split it never scored (their agreement shows the search's noise)."""

    coefficients: list[float] = field(default_factory=list)
    finalists: list[dict[str, object]] = field(default_factory=list)


def search_profile(
    fitness: Callable[[Sequence[float]], float], sizes: Sequence[int], target: float, *,
    degree: int, step: float, evaluations: int, low: float, high: float,
    select: Callable[[Sequence[float]], float] | None = None, finalists: int = 3,
) -> ProfileSearchResult:
    """Minimise ``fitness`` over block sparsities ``project(target + basis @ c)``: a smooth function of
    depth with ``degree`` free coefficients instead of one free value per block.

    Pattern search: from ``c = 0`` (uniform), try each coefficient ``+-step``; move to the best
    improvement, halve the step when none improves; stop after ``evaluations`` fitness calls. Then
    the ``finalists`` best distinct candidates (uniform always among them) are scored with
    ``select`` on tokens the search never scored, and the best there is returned: a few free
    values and an unseen referee keep the search from fitting its own validation tokens.
    """
    check_budget(target, low, high)
    size_arr = np.asarray(sizes, dtype=np.float64)
    basis = depth_basis(len(sizes), degree)
    scored: dict[tuple[float, ...], tuple[float, np.ndarray]] = {}

    def genome(c: np.ndarray) -> np.ndarray:
        return project(target + basis @ c, size_arr, target, low, high)

    def score(c: np.ndarray) -> float:
        key = tuple(np.round(c, 6).tolist())
        if key not in scored:
            g = genome(c)
            scored[key] = (float(fitness(g.tolist())), g)
        return scored[key][0]

    best = np.zeros(degree)
    best_fit = uniform_fitness = score(best)
    history: list[dict[str, object]] = [{"evaluation": 1, "best": best_fit, "coefficients": best.tolist()}]
    bar = tqdm(total=evaluations, desc="allocation search", unit="eval", leave=False)
    bar.update(1)
    while len(scored) < evaluations and step > 1e-3 and degree > 0 and len(sizes) > 1:
        moved = False
        for k in range(degree):
            for sign in (1.0, -1.0):
                if len(scored) >= evaluations:
                    break
                trial = best.copy()
                trial[k] += sign * step
                before = len(scored)
                fit = score(trial)
                bar.update(len(scored) - before)
                if fit < best_fit:
                    best, best_fit, moved = trial, fit, True
        history.append({"evaluation": len(scored), "best": best_fit, "coefficients": best.tolist(), "step": step})
        log.info("profile search: %d evaluations, best fitness %.6g (uniform %.6g), step %.3g",
                 len(scored), best_fit, uniform_fitness, step)
        if not moved:
            step /= 2
    bar.close()
    ranked = sorted(scored.items(), key=lambda kv: kv[1][0])
    keys = [k for k, _ in ranked[:finalists]]
    uniform_key = tuple([0.0] * degree)
    if uniform_key not in keys:
        keys.append(uniform_key)
    rows = []
    for key in keys:
        fit, g = scored[key]
        rows.append({"coefficients": list(key), "fitness": fit,
                     "selection_fitness": float(select(g.tolist())) if select is not None else None,
                     "block_sparsities": [round(v, 6) for v in g.tolist()]})
    chosen = min(rows, key=lambda r: r["selection_fitness"] if select is not None else r["fitness"])
    return ProfileSearchResult(
        sparsities=list(chosen["block_sparsities"]), fitness=float(chosen["fitness"]),
        uniform_fitness=uniform_fitness, history=history, coefficients=list(chosen["coefficients"]),
        finalists=rows,
    )


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
