"""Per-linear sparsity allocation for each method of ``SparsityConfig``.

- ``"teal"`` and ``"wina"``: every block gets the target; inside a block, a greedy split over
  input-sharing groups minimises the block's output reconstruction error (``refine``), as TEAL's
  code does and WINA's released code does too (with its weight-aware score).
- ``"wisparse"``: the same greedy, on block-output errors weighted by the output's sensitivity
  (``sensitivity``: diagonal Fisher, a second-order estimate of the loss increase), and the
  parameter-weighted global budget split across blocks (``across_blocks``): by default at one
  exchange rate of estimated loss increase per pruned parameter, read off every block's greedy
  path (``search.lagrangian_budgets``; no search, no held-out tokens); or by a search on the KL
  divergence to the dense model's next-token distribution on held-out tokens, over a smooth depth
  profile (``search.search_profile``) or one free value per block (``search.evolve``), each
  candidate's blocks split as the final plan splits them.
- ``SparsityConfig.uniform``: any method with the target for every linear (no allocation).

Any candidate sparsity becomes thresholds through the per-linear score histograms collected once,
so evaluating a candidate costs one forward pass and no new statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import SparsityConfig
from ..model_io import batch_tokens, call_model
from ..weight_slots import weight_slots
from .blocks import BlockCalls, Layout, discover_layout, first_tensor
from .masking import candidate_masks
from .refine import BlockSplitter
from .search import check_budget, evolve, lagrangian_budgets, project, search_profile
from .sensitivity import output_sensitivities, sample_next_tokens

log = logging.getLogger(__name__)

#: how far (in block sparsity) a block's greedy path is extended when the exchange rate wants more of it
EXTEND_STEP = 0.1

__all__ = ["Allocation", "allocate", "batch_tokens", "candidate_masks", "split_batches"]


@dataclass
class Allocation:
    """Per-linear sparsities, and a JSON-serialisable record of how they were found."""

    sparsities: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)


def split_batches(batches: Iterable[Any], config: SparsityConfig) -> tuple[list[Any], list[Any]]:
    """(calibration, held-out validation) batches: validation takes ``validation_tokens`` (plus
    ``selection_tokens`` for a depth-profile search) from the end.

    Only ``"wisparse"``'s searches (``across_blocks`` "depth" or "free") need held-out tokens. With a single batch there are none to hold out: the
    search then scores candidates on the calibration batch, and says so.
    """
    batches = list(batches)
    if config.method != "wisparse" or config.sparsity == 0 or config.uniform:
        return batches, []
    validation: list[Any] = []
    tokens = 0
    if config.across_blocks == "sensitivity":  # no search: nothing to hold out
        return batches, []
    wanted = config.validation_tokens + (config.selection_tokens if config.across_blocks == "depth" else 0)
    while len(batches) > 1 and tokens < wanted:
        validation.insert(0, batches.pop())
        tokens += batch_tokens(validation[0])
    if not validation and batches:
        log.warning("one calibration batch only: the allocation search is scored on calibration tokens; "
                    "pass more batches to hold %d tokens out", wanted)
    return batches, validation


def _split_selection(validation: Sequence[Any], config: SparsityConfig) -> tuple[list[Any], list[Any]]:
    """(search, selection) batches of the held-out ones: selection takes ``selection_tokens`` from the end,
    leaving the search at least one batch; none when there are not two batches."""
    search, selection = list(validation), []
    tokens = 0
    while len(search) > 1 and tokens < config.selection_tokens:
        selection.insert(0, search.pop())
        tokens += batch_tokens(selection[0])
    return search, selection


def _leading(batches: Sequence[Any], tokens: int) -> list[Any]:
    out: list[Any] = []
    seen = 0
    for batch in batches:
        if seen >= tokens:
            break
        out.append(batch)
        seen += batch_tokens(batch)
    return out


def _log_probs(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    logits = logits if isinstance(logits, torch.Tensor) else first_tensor(output)
    return F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)


class _Thresholds:
    """(linear, sparsity) -> thresholds on the model's device, from the histograms, memoised."""

    def __init__(self, stats: Mapping[str, Any], weight_aware: bool, device: torch.device) -> None:
        self.stats, self.weight_aware, self.device = stats, weight_aware, device
        self.cache: dict[tuple[str, float], torch.Tensor] = {}

    def __call__(self, name: str, sparsity: float) -> torch.Tensor:
        key = (name, round(float(sparsity), 6))
        if key not in self.cache:
            s = self.stats[name]
            self.cache[key] = s.thresholds(s.histogram.threshold(key[1]), self.weight_aware).to(self.device)
        return self.cache[key]


def allocate(
    model: nn.Module, stats: Mapping[str, Any], calibration: Sequence[Any], validation: Sequence[Any],
    config: SparsityConfig, device: torch.device,
) -> Allocation:
    """Per-linear sparsities for ``config.method`` whose parameter-weighted mean is ``config.sparsity``."""
    target = float(config.sparsity)
    names = list(stats)
    if config.uniform or target == 0:
        return Allocation({n: target for n in names}, {"kind": "uniform"})
    refinement = _leading(calibration, config.refinement_tokens)
    layout, calls = discover_layout(model, names, refinement, device)
    weight_ids = weight_slots(model, names)  # stable under offloading, unlike id(weight)
    thresholds = _Thresholds(stats, config.weight_aware, device)
    record: dict[str, Any] = {"kind": config.method, "groups": {b.prefix: b.groups for b in layout.blocks}}
    wisparse = config.method == "wisparse" and len(layout.blocks) > 0
    if wisparse:
        check_budget(target, config.min_block_sparsity, config.max_block_sparsity)
    weights = None
    sampled = config.sensitivity_labels == "sampled"
    if wisparse and config.split_error == "sensitivity":
        weights = output_sensitivities(model, layout, calls, refinement, device, sampled=sampled, seed=config.seed,
                                       samples=config.sensitivity_samples)
        record["split_error"] = "sensitivity" if weights is not None else "mse"
    trade = wisparse and config.across_blocks == "sensitivity"
    if trade and weights is None:
        log.warning('%s: no output sensitivities (see above), so across_blocks="sensitivity" cannot compare blocks: '
                    'every block keeps the target; across_blocks="depth" or "free" search instead', type(model).__name__)
        trade = False
        record["across_blocks"] = "uniform (no output sensitivities)"

    def greedy_paths(budgets: Sequence[float], desc: str) -> dict[str, BlockSplitter]:
        """Each block's greedy path to its budget, on the current calls and sensitivity weights."""
        return {
            b.prefix: BlockSplitter(b, calls[b.prefix], budget, config.refinement_step, thresholds, weight_ids,
                                    None if weights is None else weights[b.prefix])
            for b, budget in tqdm(list(zip(layout.blocks, budgets)), desc=desc, unit="block", leave=False)
        }

    # greedy paths to the target now; the search extends them where it goes
    splitters = greedy_paths([target] * len(layout.blocks), "within-block greedy paths")

    if trade:
        budgets = _trade_by_sensitivity(layout, splitters, config)
        record["across_blocks"] = "sensitivity"
        for round_ in range(1, config.sensitivity_rounds):
            planned = _planned_sparsities(layout, splitters, budgets, target)
            masks = {weight_ids[n]: thresholds(n, v) for n, v in planned.items() if v > 0}
            log.info("sensitivity round %d: re-estimating on the model masked by the last allocation", round_ + 1)
            if config.round_inputs == "masked":
                calls = _masked_block_calls(model, layout, refinement, device, masks)
            # next tokens from the dense model: the weights then estimate the rise of KL to dense, not to the masked model
            drawn = sample_next_tokens(model, refinement, device, config.seed, config.sensitivity_samples) if sampled else None
            with candidate_masks(masks):
                again = output_sensitivities(model, layout, calls, refinement, device, sampled=sampled, seed=config.seed,
                                             samples=config.sensitivity_samples, drawn=drawn)
            if again is None:
                break
            weights = again
            splitters = greedy_paths(budgets, f"greedy paths, round {round_ + 1}")
            budgets = _trade_by_sensitivity(layout, splitters, config)
        record["sensitivity_rounds"] = config.sensitivity_rounds
    elif wisparse and config.across_blocks != "sensitivity":
        result = _search(model, layout, splitters, validation or calibration, config, thresholds, weight_ids, device)
        budgets = result.sparsities
        record["across_blocks"] = config.across_blocks
        record["search"] = {
            "fitness": "kl_to_dense", "profile": config.across_blocks, "best_fitness": result.fitness,
            "uniform_fitness": result.uniform_fitness, "history": result.history,
            "validation_tokens": sum(batch_tokens(b) for b in (validation or calibration)),
        }
        if config.across_blocks == "depth":
            record["search"].update(coefficients=result.coefficients, finalists=result.finalists)
    else:
        budgets = [target] * len(layout.blocks)

    sparsities = _planned_sparsities(layout, splitters, budgets, target)
    record["block_sparsities"] = {block.prefix: budget for block, budget in zip(layout.blocks, budgets)}
    record["refinement"] = {block.prefix: splitters[block.prefix].path.steps() for block in layout.blocks}
    return Allocation({n: sparsities[n] for n in names}, record)


def _planned_sparsities(layout: Layout, splitters: Mapping[str, BlockSplitter], budgets: Sequence[float],
                        target: float) -> dict[str, float]:
    """Per-linear sparsities of block budgets, each block split by its splitter (outside linears: the target)."""
    sparsities = {n: target for n in layout.outside}
    for block, budget in zip(layout.blocks, budgets):
        sparsities.update(splitters[block.prefix](budget))
    return sparsities


def _masked_block_calls(model: nn.Module, layout: Layout, batches: Sequence[Any], device: torch.device,
                        masks: Mapping[Any, torch.Tensor]) -> dict[str, BlockCalls]:
    """Each block's calls as the masked model feeds it (upstream blocks sparse), with the block's own
    dense output on those inputs as its reference: the block's error then counts what its own masks add."""
    _, masked = discover_layout(model, [n for b in layout.blocks for n in b.linears], batches, device, masks=masks)
    with torch.no_grad():
        for block in layout.blocks:
            calls = masked[block.prefix]
            calls.outputs = [first_tensor(block.module(*args, **kwargs)).detach() for args, kwargs in calls.calls]
    return masked


def block_bounds(config: SparsityConfig) -> tuple[float, float]:
    """(highest, lowest) sparsity one block may get when trading by sensitivity: the config's bounds,
    narrowed to ``sparsity +- block_band``."""
    high, low = config.max_block_sparsity, config.min_block_sparsity
    if config.block_band is not None:
        target = float(config.sparsity)
        high, low = min(high, target + config.block_band), max(low, target - config.block_band)
    return high, low


def _trade_by_sensitivity(layout: Layout, splitters: Mapping[str, BlockSplitter], config: SparsityConfig) -> list[float]:
    """Block budgets at one exchange rate of estimated loss increase per pruned parameter, each block's
    greedy path (sensitivity-weighted errors) read as its cost curve (``search.lagrangian_budgets``).

    Paths start at the target and are extended (by ``EXTEND_STEP``, up to ``max_block_sparsity``) only
    for blocks whose chosen budget sits at the end of their path, until no block does: a block that
    stops inside its path would not move with more of it (the curves are near convex), so this reads
    the same budgets as paths run to ``max_block_sparsity``, at a fraction of the block evaluations."""
    high, lo = block_bounds(config)
    sizes = [b.size for b in layout.blocks]

    def curve(block) -> tuple[list[float], list[float]]:
        path = splitters[block.prefix].path
        keep = [k for k, b in enumerate(path.budgets) if b <= high + 1e-9]
        return [path.budgets[k] for k in keep], [path.errors[k] for k in keep]

    with tqdm(desc="budgets across blocks", unit="round", leave=False) as bar:
        while True:
            curves = [curve(b) for b in layout.blocks]
            budgets = lagrangian_budgets(curves, sizes, float(config.sparsity))
            at_end = [b for b, (points, _), chosen in zip(layout.blocks, curves, budgets)
                      if chosen >= points[-1] - 1e-9 and splitters[b.prefix].path.budgets[-1] < high - 1e-9]
            bar.update(1)
            if not at_end:
                break
            for block in at_end:
                path = splitters[block.prefix].path
                path.extend_to(min(high, path.budgets[-1] + EXTEND_STEP))
    if any(b < lo - 1e-9 for b in budgets):  # the curves' optimum spares a block below the floor
        budgets = project(np.asarray(budgets), np.asarray(sizes, dtype=np.float64), float(config.sparsity), lo, high).tolist()
    log.info("budgets across blocks by output sensitivity: %s", [round(b, 3) for b in budgets])
    return budgets


def _search(model, layout: Layout, splitters, batches, config, thresholds, weight_ids, device):
    """Search per-block sparsities; fitness = mean KL(dense || candidate) per held-out token.

    A candidate's blocks are split internally exactly as the final plan splits them (``splitters``),
    so the search ranks the plans it can return, not a proxy of them. ``across_blocks="depth"``
    scores on the first held-out batches and picks among its finalists on the last ones
    (``selection_tokens``), which it never scored."""
    def kl_on(scored_batches: Sequence[Any]):
        with torch.no_grad():
            dense = [_log_probs(call_model(model, b, device)) for b in scored_batches]

        def fitness(block_sparsities: Sequence[float]) -> float:
            masks = {}
            for block, s in zip(layout.blocks, block_sparsities):
                split = splitters[block.prefix](s)
                masks.update({weight_ids[n]: thresholds(n, v) for n, v in split.items() if v > 0})
            for n in layout.outside:
                masks[weight_ids[n]] = thresholds(n, config.sparsity)
            total, tokens = 0.0, 0
            with torch.no_grad(), candidate_masks(masks):
                for batch, ref in zip(scored_batches, dense):
                    lp = _log_probs(call_model(model, batch, device))
                    total += float(F.kl_div(lp, ref, log_target=True, reduction="sum"))
                    tokens += ref.shape[0]
            return total / max(tokens, 1)

        return fitness

    sizes = [b.size for b in layout.blocks]
    bounds = dict(low=config.min_block_sparsity, high=config.max_block_sparsity)
    if config.across_blocks == "depth":
        search, selection = _split_selection(batches, config)
        if not selection:
            log.warning("too few held-out batches to keep a selection split: the depth-profile search selects "
                        "on the tokens it scored; pass more calibration batches")
        return search_profile(
            kl_on(search), sizes, float(config.sparsity), degree=config.profile_degree, step=config.profile_step,
            evaluations=config.search_evaluations, select=kl_on(selection) if selection else None, **bounds,
        )
    return evolve(
        kl_on(batches), sizes, float(config.sparsity),
        population=config.population, generations=config.generations, mutation_scale=config.mutation_scale,
        elite=config.elite, seed=config.seed, **bounds,
    )
