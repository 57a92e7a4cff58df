"""calibrate: run the model on sample batches, turn score statistics into a SparsityPlan.

Linears are observed through a ``LinearObserver`` (a ``TorchFunctionMode``): it sees the same torch-level calls that
Dynamo puts in the graph (see ``linear_forms``), for any architecture and without hooks on module
types. For each planned linear we keep a log-histogram of its channel scores (``|x_i|``, or
``|x_i| * ||W[:, i]||_2`` for weight-aware methods) and its column norms.

Linears are watched by *slot* (plan name -> module and parameter attribute, ``weight_slots``), not
by tensor identity: a model offloaded by accelerate (``device_map`` with "disk"/"cpu" layers) gets
new weight tensors each forward, loaded one module at a time by its hooks, and calibrates to the
same plan as the model loaded whole. Column norms are taken from the weight a call receives, so
they come from the real (loaded) weights, one linear at a time.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import allocate, candidate_masks, split_batches
from .config import SparsityConfig
from .histogram import ExpertHistograms, ScoreHistogram
from .model_io import model_device, run_batch
from .model_structure import decoder_layer_prefixes, linear_name, parameter_names
from .observer import LinearCall, LinearObserver
from .plan import SparsityPlan
from .weight_slots import WatchedWeights, check_loadable, weight_slots

log = logging.getLogger(__name__)


@dataclass
class LinearStats:
    """Calibration statistics of one linear."""

    name: str
    shape: list[int]
    in_dim: int
    column_norms: torch.Tensor  # fp32 [in_features]: ||W[:, i]||_2 (stacked experts: [E, in_features])
    histogram: ScoreHistogram | ExpertHistograms
    tokens: int = 0

    def thresholds(self, tau: float | torch.Tensor, weight_aware: bool) -> torch.Tensor:
        """Per-channel thresholds: ``t_i = tau / ||W[:, i]||`` (weight-aware) or ``tau``.

        Stacked experts: ``tau`` holds one value per expert and the result is [E, in_features]."""
        norms = self.column_norms.cpu()
        tau = torch.as_tensor(tau, dtype=torch.float32).reshape(-1, *([1] if norms.dim() == 2 else []))
        if not weight_aware:
            return tau.expand_as(norms).clone() if norms.dim() == 2 else torch.full_like(norms, float(tau))
        return torch.where(norms > 0, tau / norms, torch.full_like(norms, float("inf")))


def column_norms(weight: torch.Tensor, in_dim: int) -> torch.Tensor:
    """||W[..., i, ...]||_2 over every dim but the input-channel one (and the expert dim 0 of a
    stacked 3-D weight, giving [E, in]), in fp32."""
    keep = {in_dim % weight.dim()} | ({0} if weight.dim() == 3 else set())
    dims = [d for d in range(weight.dim()) if d not in keep]
    return torch.linalg.vector_norm(weight.detach().float(), dim=dims)


def channel_scores(x: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """Scores of each (token, channel): ``|x|``, times the column norms when given."""
    scores = x.detach().abs().float()
    return scores * norms if norms is not None else scores


class _ScoreCollector(LinearObserver):
    """Feeds the input of every call to a watched weight into that linear's histogram."""

    def __init__(self, watched: WatchedWeights, config: SparsityConfig) -> None:
        super().__init__(watched)
        self.watched = watched
        self.config = config
        self.stats: dict[str, LinearStats] = {}

    def on_linear(self, call: LinearCall) -> None:
        name, x, weight = self.watched.slot_of(call.weight).name, call.x, call.weight  # type: ignore[union-attr]
        stats = self.stats.get(name)
        if stats is None:
            bins = self.config.histogram_bins_per_octave
            stats = self.stats[name] = LinearStats(
                name=name, shape=list(weight.shape), in_dim=call.in_dim,
                column_norms=column_norms(weight, call.in_dim),
                histogram=ExpertHistograms(weight.shape[0], bins, x.device) if weight.dim() == 3
                else ScoreHistogram(bins, device=x.device),
            )
        norms = stats.column_norms if self.config.weight_aware else None
        if isinstance(stats.histogram, ExpertHistograms):  # each row scored against its expert
            experts = call.row_experts
            rows = x.reshape(experts.numel(), -1)
            stats.histogram.update(channel_scores(rows, None if norms is None else norms[experts]), experts)
        else:
            stats.histogram.update(channel_scores(x, norms))
        stats.tokens += x.numel() // max(1, stats.column_norms.shape[-1])
        return None


def _planned_weights(model: nn.Module, config: SparsityConfig) -> WatchedWeights:
    """The slots of every parameter that may be planned (if a linear uses it): those ``include``
    matches, or by default those inside the layers that decode (``model_structure``), with
    ``plan_encoder`` those of every layer list."""
    names = parameter_names(model).values()
    if config.include is not None:
        pattern = re.compile(config.include)
        keys = [linear_name(n) for n in names if pattern.search(linear_name(n))]
    else:
        prefixes = decoder_layer_prefixes(model, encoder=config.plan_encoder)
        if not prefixes:
            raise ValueError(
                f"{type(model).__name__} has no layer list (an nn.ModuleList of blocks holding parameters); "
                "say which linears to plan with SparsityConfig(include=<regex on names>)"
            )
        keys = [linear_name(n) for n in names if n.startswith(tuple(prefixes))]
    return WatchedWeights(weight_slots(model, keys).values())


def collect_statistics(model: nn.Module, batches: Iterable[Any], config: SparsityConfig) -> dict[str, LinearStats]:
    """Run ``batches`` through ``model`` (no grad) and collect per-linear score histograms."""
    check_loadable(model)
    watched = _planned_weights(model, config)
    device = model_device(model)
    collector = _ScoreCollector(watched, config)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), collector, tqdm(desc="calibrating", unit="tok", leave=False) as bar:
            for batch in batches:
                n = run_batch(model, batch, device)
                tokens += n
                bar.update(n)
                if config.max_calibration_tokens is not None and tokens >= config.max_calibration_tokens:
                    break
    finally:
        model.train(was_training)
    if tokens == 0 and not collector.stats:
        raise ValueError("calibration data is empty: pass a non-empty iterable of input_ids tensors or dicts")
    if not collector.stats:
        raise ValueError(
            f"no linear of {type(model).__name__} was planned: none of the {len(watched.slots)} candidate weights "
            "was used by a linear during calibration (check SparsityConfig.include)"
        )
    log.info("calibrated %d linears on %d tokens", len(collector.stats), tokens)
    return collector.stats


def build_plan(
    model: nn.Module, stats: Mapping[str, LinearStats], sparsities: Mapping[str, float], config: SparsityConfig
) -> SparsityPlan:
    """Thresholds from histograms at the given per-linear sparsities."""
    thresholds: dict[str, torch.Tensor] = {}
    achieved: dict[str, float] = {}
    for name, s in stats.items():
        tau = s.histogram.threshold(sparsities[name])
        thresholds[name] = s.thresholds(tau, config.weight_aware)
        achieved[name] = round(s.histogram.fraction_at_or_below(tau) if sparsities[name] > 0 else 0.0, 4)
    return SparsityPlan(
        channel_thresholds=thresholds,
        sparsities={n: float(sparsities[n]) for n in stats},
        shapes={n: list(s.shape) for n, s in stats.items()},
        in_dims={n: s.in_dim for n, s in stats.items()},
        model_class=type(model).__name__,
        method=config.method,
        config=config.to_dict(),
        stats={
            "calibration_tokens": max((s.tokens for s in stats.values()), default=0),
            "calibration_sparsity": achieved,
        },
    )


def calibrate(model: nn.Module, batches: Iterable[Any], config: SparsityConfig | None = None) -> SparsityPlan:
    """Calibrate a plan whose parameter-weighted mean sparsity is ``config.sparsity``.

    How it is split over linears depends on ``config.method`` (see ``allocation``).
    """
    config = config or SparsityConfig()
    calibration, validation = split_batches(batches, config)
    stats = collect_statistics(model, calibration, config)
    was_training = model.training
    try:
        allocation = allocate(model.eval(), stats, calibration, validation, config, model_device(model))
    finally:
        model.train(was_training)
    plan = build_plan(model, stats, allocation.sparsities, config)
    if config.masked_recalibration and any(s > 0 for s in allocation.sparsities.values()):
        plan = _recalibrate_masked(model, plan, calibration, allocation.sparsities, config)
    plan.stats["allocation"] = allocation.record
    return plan


def _recalibrate_masked(
    model: nn.Module, plan: SparsityPlan, batches: Sequence[Any], sparsities: Mapping[str, float], config: SparsityConfig,
) -> SparsityPlan:
    """Thresholds at the same sparsities from scores seen with every planned linear masked by ``plan``.

    Dense-activation thresholds overshoot once every linear is sparse (upstream masking shrinks
    the activations downstream linears see); a second pass under the plan's own masks sees the
    sparse model's activations, so the achieved sparsity holds the target. The collector sees each
    linear's input before that linear's own mask (it is the innermost mode)."""
    device = model_device(model)
    slots = weight_slots(model, plan.names)
    masks = {slots[n]: t.to(device) for n, t in plan.channel_thresholds.items()}
    dense_stats = plan.stats
    with candidate_masks(masks):
        stats = collect_statistics(model, batches, config)
    if set(stats) != set(plan.names):
        log.warning("masked recalibration saw %d of %d planned linears; keeping dense-activation thresholds",
                    len(stats), len(plan.names))
        return plan
    plan = build_plan(model, stats, sparsities, config)
    plan.stats["dense_calibration_sparsity"] = dense_stats["calibration_sparsity"]
    log.info("recalibrated thresholds on the masked model's activations (%d tokens)", plan.stats["calibration_tokens"])
    return plan
