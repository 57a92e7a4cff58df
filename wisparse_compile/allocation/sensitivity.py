"""Output sensitivity of each block: diagonal Fisher weights on its output, so that errors count in loss.

A block's plain reconstruction error ``||dh||^2`` says nothing about how much that error moves the
model's next-token distribution, and the errors of different blocks are on different scales (the
residual stream grows with depth). Weighting each squared output error by the squared gradient of
the next-token loss with respect to that output (the diagonal of the empirical Fisher information,
per token and channel) turns it into a second-order estimate of the loss increase: the within-block
split then minimises what the model's output feels, and every block's error is in the same unit, so
budgets can be traded across blocks at one exchange rate (``budgets.lagrangian_budgets``), with no
search that could fit its validation tokens. That is the ``Sensitivity`` strategy, the default of
``method="wisparse"``.

The next tokens whose loss is differentiated are drawn from the model's own distribution (one draw
per position, seeded), so the squared gradients estimate the Fisher information, whose quadratic
form is the KL divergence to the dense model. One backward pass per refinement batch; parameters
get no gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import Sensitivity
from ..model_io import call_model
from .blocks import BlockCalls, Layout, first_tensor
from .budgets import lagrangian_budgets, project
from .refine import BlockSplitter, block_splitters, split_allocation
from .registry import Allocation, AllocationProblem, register_strategy

log = logging.getLogger(__name__)


def _labels(batch: Any, device: torch.device) -> torch.Tensor:
    """Next-token targets [batch, seq - 1] of a batch, -100 where the attention mask is 0. An
    encoder-decoder's logits run over its decoder's tokens: its targets are ``decoder_input_ids``
    (masked by ``decoder_attention_mask``) where the batch has them."""
    decoder = isinstance(batch, Mapping) and isinstance(batch.get("decoder_input_ids"), torch.Tensor)
    prefix = "decoder_" if decoder else ""
    ids = batch.get(f"{prefix}input_ids") if isinstance(batch, Mapping) else batch
    if not isinstance(ids, torch.Tensor):
        raise TypeError("output sensitivities need input_ids to take next-token targets from")
    ids = (ids.unsqueeze(0) if ids.dim() == 1 else ids).to(device)
    labels = ids[:, 1:].clone()
    mask = batch.get(f"{prefix}attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor):
        labels[mask.to(device).reshape(ids.shape)[:, 1:] == 0] = -100
    return labels


def logits_of(output: Any) -> torch.Tensor:
    """The model output's logits (``.logits``, else its first tensor)."""
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else first_tensor(output)


def draw_next_tokens(flat_logits: torch.Tensor, seed: int) -> torch.Tensor:
    """[positions] next tokens drawn from the logits' distribution (seeded)."""
    generator = torch.Generator(device=flat_logits.device).manual_seed(seed)
    return torch.multinomial(flat_logits.detach().float().softmax(-1), 1, generator=generator)[:, 0]


def output_sensitivities(
    model: nn.Module, layout: Layout, calls: Mapping[str, BlockCalls], batches: Sequence[Any], device: torch.device,
    seed: int = 0,
) -> dict[str, list[torch.Tensor]] | None:
    """Per block, per captured call: the squared gradient of the summed next-token loss with respect to
    the block's output, shaped like that output (aligned with ``calls[prefix].outputs``), the next
    tokens drawn from the model's own distribution (``draw_next_tokens``, ``seed`` per batch; positions
    the attention mask hides are left out).

    The gradient starts at the input of the first block called (a leaf that requires grad), so any
    model with decoder blocks works. None (with a warning) when the model's output is not next-token
    logits over the batch's ids, or a block is not called once per forward: the caller then falls back
    to plain output errors."""
    grads: dict[str, list[torch.Tensor]] = {b.prefix: [] for b in layout.blocks}
    outputs: dict[str, list[torch.Tensor]] = {b.prefix: [] for b in layout.blocks}

    def start_gradient(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        hidden = kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
            return args, {**kwargs, "hidden_states": hidden.detach().requires_grad_(True)}
        return None

    def keep_output(prefix: str):
        def hook(module, args, output):
            hidden = first_tensor(output)
            if hidden.requires_grad:
                hidden.retain_grad()
            outputs[prefix].append(hidden)
        return hook

    handles = [b.module.register_forward_pre_hook(start_gradient, with_kwargs=True) for b in layout.blocks]
    handles += [b.module.register_forward_hook(keep_output(b.prefix)) for b in layout.blocks]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for batch in tqdm(batches, desc="output sensitivities", unit="batch", leave=False):
                for held in outputs.values():
                    held.clear()
                logits = logits_of(call_model(model, batch, device))
                labels = _labels(batch, device)
                if (logits.dim() != 3 or logits.shape[:2] != (labels.shape[0], labels.shape[1] + 1)
                        or int(labels.max()) >= logits.shape[-1]):
                    log.warning("%s returns %s, not next-token logits [batch, seq, vocab] over the batch's ids: "
                                "within-block splits use plain output errors", type(model).__name__, tuple(logits.shape))
                    return None
                flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
                padded = labels.reshape(-1) == -100
                targets = torch.where(padded, -100, draw_next_tokens(flat, seed))
                loss = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum")
                loss.backward()
                squares: dict[str, torch.Tensor] = {}
                for prefix, held in outputs.items():
                    if len(held) != 1 or held[0].grad is None:
                        log.warning("block %s was called %d times in one forward (or got no gradient): "
                                    "within-block splits use plain output errors", prefix, len(held))
                        return None
                    squares[prefix] = held[0].grad.detach().float().pow(2)
                    held[0].grad = None
                for prefix, square in squares.items():
                    grads[prefix].append(square)
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    for b in layout.blocks:
        if len(grads[b.prefix]) != len(calls[b.prefix].outputs):
            log.warning("block %s: %d gradients for %d captured calls; within-block splits use plain output errors",
                        b.prefix, len(grads[b.prefix]), len(calls[b.prefix].outputs))
            return None
    return grads


#: how far (in block sparsity) a block's greedy path is extended when the exchange rate wants more of it
EXTEND_STEP = 0.1


def block_bounds(options: Sensitivity, target: float) -> tuple[float, float]:
    """(highest, lowest) sparsity one block may get: the strategy's bounds, narrowed to ``target +- band``."""
    high = min(options.max_block_sparsity, target + options.band)
    low = max(options.min_block_sparsity, target - options.band)
    return high, low


def budgets_by_sensitivity(layout: Layout, splitters: Mapping[str, BlockSplitter], target: float,
                           options: Sensitivity) -> list[float]:
    """Block budgets at one exchange rate of estimated loss increase per pruned parameter, each block's
    greedy path (sensitivity-weighted errors) read as its cost curve (``budgets.lagrangian_budgets``).

    Paths start at the target and are extended (by ``EXTEND_STEP``, up to the upper bound) only for
    blocks whose chosen budget sits at the end of their path, until no block does: a block that stops
    inside its path would not move with more of it (the curves are near convex), so this reads the
    same budgets as paths run to the bound, at a fraction of the block evaluations."""
    high, low = block_bounds(options, target)
    sizes = [b.size for b in layout.blocks]

    def curve(block) -> tuple[list[float], list[float]]:
        path = splitters[block.prefix].path
        keep = [k for k, b in enumerate(path.budgets) if b <= high + 1e-9]
        return [path.budgets[k] for k in keep], [path.errors[k] for k in keep]

    with tqdm(desc="budgets across blocks", unit="round", leave=False) as bar:
        while True:
            curves = [curve(b) for b in layout.blocks]
            budgets = lagrangian_budgets(curves, sizes, target)
            at_end = [b for b, (points, _), chosen in zip(layout.blocks, curves, budgets)
                      if chosen >= points[-1] - 1e-9 and splitters[b.prefix].path.budgets[-1] < high - 1e-9]
            bar.update(1)
            if not at_end:
                break
            for block in at_end:
                path = splitters[block.prefix].path
                path.extend_to(min(high, path.budgets[-1] + EXTEND_STEP))
    if any(b < low - 1e-9 for b in budgets):  # the curves' optimum spares a block below the floor
        budgets = project(np.asarray(budgets), np.asarray(sizes, dtype=np.float64), target, low, high).tolist()
    log.info("budgets across blocks by output sensitivity: %s", [round(b, 3) for b in budgets])
    return budgets


@register_strategy(Sensitivity)
def allocate_by_sensitivity(problem: AllocationProblem, options: Sensitivity) -> Allocation:
    """Sensitivity-weighted greedy paths, block budgets traded at one exchange rate. Without next-token
    logits (no sensitivities) every block keeps the target and the split uses plain output error."""
    blocks = problem.layout.blocks
    if not blocks:
        return split_allocation(problem, {}, [])
    weights = output_sensitivities(problem.model, problem.layout, problem.calls, problem.refinement, problem.device,
                                   seed=problem.config.seed)
    target = [problem.target] * len(blocks)
    splitters = block_splitters(problem, target, weights)
    if weights is None:
        log.warning("%s: no output sensitivities (see above), so the Sensitivity allocation cannot compare blocks: "
                    "every block keeps the target (as allocation=Greedy() does)", type(problem.model).__name__)
        record = {"split_error": "mse", "across_blocks": "uniform (no output sensitivities)"}
        return split_allocation(problem, splitters, target, record)
    budgets = budgets_by_sensitivity(problem.layout, splitters, problem.target, options)
    return split_allocation(problem, splitters, budgets, {"split_error": "sensitivity", "across_blocks": "sensitivity"})
