"""Within-block allocation: split a block's sparsity budget over its input-sharing groups.

Greedy, as TEAL does: start every group dense, and repeatedly raise the sparsity of the group
whose step costs the least block-output reconstruction error (against the dense block, on
calibration tokens) per unit of budget, until the block's parameter-weighted budget holds
exactly (the last step is cut to fit). Linears in one group share one sparsity.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch

from .blocks import Block, BlockCalls, first_tensor
from .masking import candidate_masks

log = logging.getLogger(__name__)

MAX_LINEAR_SPARSITY = 0.99

# (linear name, sparsity) -> thresholds tensor
ThresholdFn = Callable[[str, float], torch.Tensor]


def block_error(
    block: Block, calls: BlockCalls, sparsities: Mapping[str, float], thresholds: ThresholdFn,
    weight_ids: Mapping[str, int],
) -> float:
    """Mean squared error of the block's output with ``sparsities`` against its dense output."""
    masks = {weight_ids[n]: thresholds(n, sparsities[n]) for n in block.linears if sparsities[n] > 0}
    total, count = 0.0, 0
    with torch.no_grad(), candidate_masks(masks):
        for (args, kwargs), dense in zip(calls.calls, calls.outputs):
            out = first_tensor(block.module(*args, **kwargs))
            total += float((out.float() - dense.float()).pow(2).sum())
            count += dense.numel()
    return total / max(count, 1)


def refine_block(
    block: Block, calls: BlockCalls, budget: float, step: float, thresholds: ThresholdFn,
    weight_ids: Mapping[str, int],
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Per-linear sparsities for ``block`` at parameter-weighted mean ``budget``; and the greedy steps."""
    group_s = [0.0] * len(block.groups)
    sizes = [block.group_size(g) for g in block.groups]
    total = float(block.size)
    steps: list[dict[str, float]] = []

    def split(values: list[float]) -> dict[str, float]:
        return {n: v for g, v in zip(block.groups, values) for n in g}

    def error(values: list[float]) -> float:
        return block_error(block, calls, split(values), thresholds, weight_ids)

    remaining = budget * total
    current = 0.0
    while remaining > 1e-9 * total:
        best: tuple[float, int, float, float] | None = None
        for i, size in enumerate(sizes):
            room = MAX_LINEAR_SPARSITY - group_s[i]
            if room <= 1e-12:
                continue
            d = min(step, room, remaining / size)
            trial = list(group_s)
            trial[i] += d
            err = error(trial)
            cost = (err - current) / (d * size)
            if best is None or cost < best[0]:
                best = (cost, i, d, err)
        if best is None:
            raise ValueError(
                f"block {block.prefix!r} cannot reach sparsity {budget:.3f}: every linear is at the "
                f"{MAX_LINEAR_SPARSITY} cap; lower SparsityConfig.max_block_sparsity"
            )
        _, i, d, current = best
        group_s[i] += d
        remaining -= d * sizes[i]
        steps.append({"group": float(i), "sparsity": group_s[i], "error": current})
    refined = split(group_s)
    uniform = {n: budget for n in block.linears}
    if budget > 0 and error([budget] * len(sizes)) < current:
        log.info("block %s: greedy split is worse than uniform on calibration tokens; keeping uniform", block.prefix)
        return uniform, steps
    return refined, steps
