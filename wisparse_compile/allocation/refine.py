"""Within-block allocation: split a block's sparsity budget over its input-sharing groups.

Greedy, as TEAL does: start every group dense, and repeatedly raise the sparsity of the group
whose step costs the least block-output reconstruction error (against the dense block, on
calibration tokens) per unit of budget. Linears in one group share one sparsity. The error is
TEAL's mean squared error, or (``"wisparse"``) the squared error weighted by the output's
sensitivity (``sensitivity.py``), which estimates the loss increase and so is comparable across blocks.

The greedy is *lazy*: it treats a group's step cost as growing while the block gets sparser (as
it usually does), so a cost measured at an earlier step is taken as a lower bound; each step
re-measures the group with the lowest known cost until the lowest is freshly measured. On the tiny
4-block test model that took 49-50 block evaluations per path instead of 112.

The greedy run records a *path*, extended on demand; the split for any budget on it is read off
it (the step that crosses the budget is cut to fit). So a strategy that moves budget between
blocks scores every candidate with the split the plan will really use, at the cost of one greedy
run per block (up to the largest budget it tries). Where the uniform split reconstructs the block
better than the path's, the uniform split is used.

The ``Greedy`` strategy (TEAL's) is this split alone: every block at the target.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..config import Greedy
from ..weight_slots import WeightSlot
from .blocks import Block, BlockCalls, Layout, first_tensor
from .masking import candidate_masks
from .registry import Allocation, AllocationProblem, register_strategy

log = logging.getLogger(__name__)

MAX_LINEAR_SPARSITY = 0.99

# (linear name, sparsity) -> thresholds tensor
ThresholdFn = Callable[[str, float], torch.Tensor]


def block_error(
    block: Block, calls: BlockCalls, sparsities: Mapping[str, float], thresholds: ThresholdFn,
    weight_ids: Mapping[str, WeightSlot], weights: Sequence[torch.Tensor] | None = None,
) -> float:
    """The block's output error with ``sparsities`` against its dense output: the mean squared error,
    or with ``weights`` (one tensor per call, shaped like the output: ``sensitivity.output_sensitivities``)
    the weighted sum of squared errors, a second-order estimate of the loss increase."""
    masks = {weight_ids[n]: thresholds(n, sparsities[n]) for n in block.linears if sparsities[n] > 0}
    total, count = 0.0, 0
    with torch.no_grad(), candidate_masks(masks):
        for k, ((args, kwargs), dense) in enumerate(zip(calls.calls, calls.outputs)):
            out = first_tensor(block.module(*args, **kwargs))
            squared = (out.float() - dense.float()).pow(2)
            total += float((squared * weights[k]).sum() if weights is not None else squared.sum())
            count += dense.numel()
    return total if weights is not None else total / max(count, 1)


@dataclass
class GreedyPath:
    """Greedy steps from dense: after step k the block's budget is ``budgets[k]`` with group
    sparsities ``group_sparsities[k]`` and reconstruction error ``errors[k]`` (index 0: dense).

    The greedy process is sequential and deterministic, so the path is extended on demand
    (``extend_to``): a search pays only for the budgets it visits, with the same result as one run
    to the largest of them."""

    block: Block
    calls: BlockCalls
    step: float
    thresholds: ThresholdFn
    weight_ids: Mapping[str, WeightSlot]
    weights: Sequence[torch.Tensor] | None = None
    budgets: list[float] = field(default_factory=lambda: [0.0])
    group_sparsities: list[list[float]] = field(default_factory=list)
    errors: list[float] = field(default_factory=lambda: [0.0])

    def __post_init__(self) -> None:
        self.sizes = [self.block.group_size(g) for g in self.block.groups]
        self._costs: dict[int, float] = {}  # last measured step cost per group (lazy greedy)
        self._trial_errors: dict[int, float] = {}
        self.evaluations = 0  # block evaluations so far
        if not self.group_sparsities:
            self.group_sparsities = [[0.0] * len(self.sizes)]

    def extend_to(self, max_budget: float) -> None:
        """Take whole greedy steps until the block's budget reaches ``max_budget`` (it may pass it:
        ``group_split`` reads budgets inside a step), so extending in parts equals one long run."""
        total = float(self.block.size)
        while self.budgets[-1] < max_budget - 1e-9:
            group_s = self.group_sparsities[-1]
            fresh: set[int] = set()
            while True:
                open_groups = [i for i in range(len(self.sizes)) if MAX_LINEAR_SPARSITY - group_s[i] > 1e-12]
                if not open_groups:
                    raise ValueError(
                        f"block {self.block.prefix!r} cannot reach sparsity {max_budget:.3f}: every linear is at "
                        f"the {MAX_LINEAR_SPARSITY} cap; lower the allocation's max_block_sparsity"
                    )
                i = min(open_groups, key=lambda g: self._costs.get(g, float("-inf")))
                if i in fresh:
                    break
                self._costs[i], self._trial_errors[i] = self._step_cost(group_s, i)
                fresh.add(i)
            new = self._raised(group_s, i)
            self.group_sparsities.append(new)
            self.budgets.append(sum(s * n for s, n in zip(new, self.sizes)) / total)
            self.errors.append(self._trial_errors[i])
            self.evaluations += len(fresh)

    def _raised(self, group_s: list[float], i: int) -> list[float]:
        """Group sparsities after one step of group ``i`` (a whole step, or up to the cap)."""
        raised = list(group_s)
        raised[i] = min(group_s[i] + self.step, MAX_LINEAR_SPARSITY)
        return raised

    def _step_cost(self, group_s: list[float], i: int) -> tuple[float, float]:
        """(error increase per unit of budget, block error) of raising group ``i`` by one step."""
        trial = self._raised(group_s, i)
        err = block_error(self.block, self.calls, _split(self.block, trial), self.thresholds, self.weight_ids, self.weights)
        return (err - self.errors[-1]) / ((trial[i] - group_s[i]) * self.sizes[i]), err

    def group_split(self, budget: float) -> list[float]:
        """Group sparsities at ``budget`` (at most the path's last budget), cutting the crossing step."""
        if budget > self.budgets[-1] + 1e-9:
            raise ValueError(f"block {self.block.prefix!r}: budget {budget:.4f} lies beyond the greedy path "
                             f"(computed up to {self.budgets[-1]:.4f})")
        k = bisect.bisect_left(self.budgets, budget)
        if k == 0:
            return list(self.group_sparsities[0])
        k = min(k, len(self.budgets) - 1)
        lo, hi = self.budgets[k - 1], self.budgets[k]
        a, b = self.group_sparsities[k - 1], self.group_sparsities[k]
        frac = 0.0 if hi <= lo else min(1.0, (budget - lo) / (hi - lo))
        return [x + frac * (y - x) for x, y in zip(a, b)]

    def steps(self) -> list[dict[str, float]]:
        """JSON record: the block budget and error after each step."""
        return [{"budget": round(b, 6), "error": e} for b, e in zip(self.budgets[1:], self.errors[1:])]


def greedy_path(
    block: Block, calls: BlockCalls, max_budget: float, step: float, thresholds: ThresholdFn,
    weight_ids: Mapping[str, WeightSlot], weights: Sequence[torch.Tensor] | None = None,
) -> GreedyPath:
    """Run the greedy split from dense until block sparsity ``max_budget`` and record every step."""
    path = GreedyPath(block, calls, step, thresholds, weight_ids, weights)
    path.extend_to(max_budget)
    return path


def _split(block: Block, group_values: list[float]) -> dict[str, float]:
    return {n: v for g, v in zip(block.groups, group_values) for n in g}


class BlockSplitter:
    """Budget -> per-linear sparsities of one block: the greedy path's split, or the uniform split
    where that reconstructs the block better (memoised per budget)."""

    def __init__(self, block: Block, calls: BlockCalls, budget: float, step: float,
                 thresholds: ThresholdFn, weight_ids: Mapping[str, WeightSlot],
                 weights: Sequence[torch.Tensor] | None = None) -> None:
        self.block, self.calls, self.thresholds, self.weight_ids = block, calls, thresholds, weight_ids
        self.weights = weights
        self.path = greedy_path(block, calls, budget, step, thresholds, weight_ids, weights)
        self.cache: dict[float, dict[str, float]] = {}

    def error(self, sparsities: Mapping[str, float]) -> float:
        return block_error(self.block, self.calls, sparsities, self.thresholds, self.weight_ids, self.weights)

    def __call__(self, budget: float) -> dict[str, float]:
        key = round(float(budget), 6)
        if key not in self.cache:
            self.path.extend_to(key)
            refined = _split(self.block, self.path.group_split(key))
            uniform = {n: key for n in self.block.linears}
            if key > 0 and len(self.block.groups) > 1 and self.error(uniform) < self.error(refined):
                log.debug("block %s at %.3f: uniform split beats the greedy path", self.block.prefix, key)
                refined = uniform
            self.cache[key] = refined
        return self.cache[key]


def block_splitters(problem: AllocationProblem, budgets: Sequence[float],
                    weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
                    desc: str = "within-block greedy paths") -> dict[str, BlockSplitter]:
    """Each block's splitter, its greedy path run to its budget (``weights``: per block, the
    sensitivity weights of its errors; None: plain mean squared error)."""
    blocks = problem.layout.blocks
    return {
        b.prefix: BlockSplitter(b, problem.calls[b.prefix], budget, problem.config.refinement_step, problem.thresholds,
                                problem.weight_ids, None if weights is None else weights[b.prefix])
        for b, budget in tqdm(list(zip(blocks, budgets)), desc=desc, unit="block", leave=False)
    }


def planned_sparsities(layout: Layout, splitters: Mapping[str, BlockSplitter], budgets: Sequence[float],
                       target: float) -> dict[str, float]:
    """Per-linear sparsities of block budgets, each block split by its splitter (outside linears: the target)."""
    sparsities = {n: target for n in layout.outside}
    for block, budget in zip(layout.blocks, budgets):
        sparsities.update(splitters[block.prefix](budget))
    return sparsities


def split_allocation(problem: AllocationProblem, splitters: Mapping[str, BlockSplitter], budgets: Sequence[float],
                     record: Mapping[str, Any] | None = None) -> Allocation:
    """The allocation of block ``budgets`` split by ``splitters``, recording the groups, the block
    sparsities and each block's greedy path beside the strategy's own ``record``."""
    layout = problem.layout
    sparsities = planned_sparsities(layout, splitters, budgets, problem.target)
    return Allocation({n: sparsities[n] for n in problem.names}, {
        "groups": {b.prefix: b.groups for b in layout.blocks},
        **(record or {}),
        "block_sparsities": {block.prefix: budget for block, budget in zip(layout.blocks, budgets)},
        "refinement": {block.prefix: splitters[block.prefix].path.steps() for block in layout.blocks},
    })


@register_strategy(Greedy)
def allocate_greedy(problem: AllocationProblem, options: Greedy) -> Allocation:
    """Every block at the target, split inside by the greedy path on plain output error."""
    budgets = [problem.target] * len(problem.layout.blocks)
    return split_allocation(problem, block_splitters(problem, budgets), budgets)
