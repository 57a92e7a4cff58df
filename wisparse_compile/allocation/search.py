"""The ``Search`` allocation, an experiment that lost: block sparsities searched on KL to dense.

Kept on request only, out of the default surface (``SparsityConfig(allocation=Search(...))``, importable from
here only): every block's greedy split (``refine``, plain output error, as ``Greedy``), and the
budget across blocks found by an evolutionary search whose fitness is the mean KL divergence of the
masked model's next-token distribution to the dense model's on held-out calibration tokens, every
candidate split exactly as the returned plan is. On SmolLM2-135M at 50% it fitted its 1024 held-out
tokens: its perplexity rise was 0.93x TEAL's on held-out Wikipedia and 0.98x / 1.01x on other text
(issue 19); the ``Sensitivity`` allocation replaced it (``docs/results/allocation.md``).

The search itself (``evolve``):

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
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import BlockBounds
from ..model_io import batch_tokens, call_model
from .budgets import check_budget, project
from .masking import candidate_masks
from .refine import BlockSplitter, block_splitters, split_allocation
from .registry import Allocation, AllocationProblem, register_strategy
from .sensitivity import logits_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Search(BlockBounds):
    """Block sparsities by an evolutionary search on KL to dense over held-out tokens (an experiment
    that lost: see the module docstring). The search and its population are seeded by
    ``SparsityConfig.seed``: same seed, same plan.

    population, generations, mutation_scale, elite: the evolutionary search (``evolve``).
    validation_tokens: calibration tokens held out (the last batches) to score candidates on.
    """

    name: ClassVar[str] = "search"
    population: int = 8
    generations: int = 8
    mutation_scale: float = 0.05
    elite: int = 2
    validation_tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.population < 2 or not 1 <= self.elite < self.population:
            raise ValueError(f"need population >= 2 and 1 <= elite < population, got {self.population}, {self.elite}")
        if self.generations < 0 or self.mutation_scale <= 0:
            raise ValueError(f"generations must be >= 0 and mutation_scale > 0, got {self.generations}, {self.mutation_scale}")
        if self.validation_tokens <= 0:
            raise ValueError(f"validation_tokens must be positive, got {self.validation_tokens}")

    @property
    def held_out_tokens(self) -> int:
        return self.validation_tokens


#: depth ramps in the first population: sparsity difference between the last and the first block
RAMP_SLOPES = (0.2, -0.2, 0.4, -0.4)


@dataclass
class SearchResult:
    """The best per-block sparsities, their fitness, the uniform fitness and the history."""

    sparsities: list[float]
    fitness: float
    uniform_fitness: float
    history: list[dict[str, object]] = field(default_factory=list)


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


def _log_probs(output: Any) -> torch.Tensor:
    """[tokens, vocab] next-token log-probabilities of a model output."""
    logits = logits_of(output)
    return F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)


def kl_fitness(problem: AllocationProblem, splitters: dict[str, BlockSplitter],
               batches: Sequence[Any]) -> Callable[[Sequence[float]], float]:
    """Block sparsities -> mean KL(dense || candidate) per token of ``batches``, each candidate's blocks
    split by ``splitters`` (the split the plan will use) and outside linears at the target."""
    model, device, layout = problem.model, problem.device, problem.layout
    with torch.no_grad():
        dense = [_log_probs(call_model(model, b, device)) for b in batches]

    def fitness(block_sparsities: Sequence[float]) -> float:
        masks = {}
        for block, s in zip(layout.blocks, block_sparsities):
            split = splitters[block.prefix](s)
            masks.update({problem.weight_ids[n]: problem.thresholds(n, v) for n, v in split.items() if v > 0})
        for n in layout.outside:
            masks[problem.weight_ids[n]] = problem.thresholds(n, problem.target)
        total, tokens = 0.0, 0
        with torch.no_grad(), candidate_masks(masks):
            for batch, ref in zip(batches, dense):
                lp = _log_probs(call_model(model, batch, device))
                total += float(F.kl_div(lp, ref, log_target=True, reduction="sum"))
                tokens += ref.shape[0]
        return total / max(tokens, 1)

    return fitness


@register_strategy(Search)
def allocate_by_search(problem: AllocationProblem, options: Search) -> Allocation:
    """Greedy paths to the target (extended where the search goes), block budgets by ``evolve``."""
    blocks = problem.layout.blocks
    splitters = block_splitters(problem, [problem.target] * len(blocks))
    if not blocks:
        return split_allocation(problem, splitters, [])
    batches = problem.validation or problem.calibration
    result = evolve(
        kl_fitness(problem, splitters, batches), [b.size for b in blocks], problem.target,
        population=options.population, generations=options.generations, mutation_scale=options.mutation_scale,
        elite=options.elite, seed=problem.config.seed, low=options.min_block_sparsity, high=options.max_block_sparsity,
    )
    return split_allocation(problem, splitters, result.sparsities, {"search": {
        "fitness": "kl_to_dense", "best_fitness": result.fitness, "uniform_fitness": result.uniform_fitness,
        "history": result.history, "validation_tokens": sum(batch_tokens(b) for b in batches),
    }})
