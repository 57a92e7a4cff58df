"""Allocation strategies behind one registry: what a strategy is given, what it returns, the dispatch.

A strategy is a config dataclass derived from ``config.AllocationConfig`` plus one function
``(problem, options) -> Allocation`` registered once for that type with ``register_strategy``.
``allocate`` looks the function up by the type of ``SparsityConfig.strategy`` (the method's default
unless ``SparsityConfig.allocation`` names one), so adding a strategy touches no existing code:

    @dataclass(frozen=True)
    class Mine(AllocationConfig):
        name: ClassVar[str] = "mine"

    @register_strategy(Mine)
    def mine(problem: AllocationProblem, options: Mine) -> Allocation: ...

    wsc.calibrate(model, batches, wsc.SparsityConfig(allocation=Mine()))

Any candidate sparsity becomes thresholds through the per-linear score histograms collected once
(``problem.thresholds``), so evaluating a candidate costs one forward pass and no new statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from ..config import AllocationConfig, SparsityConfig, Uniform
from ..model_io import batch_tokens
from ..weight_slots import WeightSlot, weight_slots
from .blocks import BlockCalls, Layout, discover_layout

log = logging.getLogger(__name__)

__all__ = ["Allocation", "AllocationProblem", "Thresholds", "allocate", "register_strategy", "split_batches", "strategy_for"]


@dataclass
class Allocation:
    """Per-linear sparsities, and a JSON-serialisable record of how they were found."""

    sparsities: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)


class Thresholds:
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


def leading_batches(batches: Sequence[Any], tokens: int) -> list[Any]:
    """The first batches of ``batches`` that hold at least ``tokens`` tokens (all of them if fewer)."""
    out: list[Any] = []
    seen = 0
    for batch in batches:
        if seen >= tokens:
            break
        out.append(batch)
        seen += batch_tokens(batch)
    return out


class AllocationProblem:
    """What a strategy allocates over: the model, its per-linear statistics (``calibrate.LinearStats``),
    the calibration and held-out batches, the config; the block layout and the dense block calls on
    the refinement tokens are captured on first use (one dense pass), so a strategy that needs no
    blocks pays nothing for them."""

    def __init__(self, model: nn.Module, stats: Mapping[str, Any], calibration: Sequence[Any],
                 validation: Sequence[Any], config: SparsityConfig, device: torch.device) -> None:
        self.model, self.stats, self.config, self.device = model, stats, config, device
        self.calibration, self.validation = list(calibration), list(validation)
        self.target = float(config.sparsity)
        self.names = list(stats)
        self.thresholds = Thresholds(stats, config.weight_aware, device)

    @cached_property
    def refinement(self) -> list[Any]:
        """The leading calibration batches (``config.refinement_tokens``) blocks are re-run on."""
        return leading_batches(self.calibration, self.config.refinement_tokens)

    @cached_property
    def _layout_and_calls(self) -> tuple[Layout, dict[str, BlockCalls]]:
        return discover_layout(self.model, self.names, self.refinement, self.device)

    @property
    def layout(self) -> Layout:
        return self._layout_and_calls[0]

    @property
    def calls(self) -> dict[str, BlockCalls]:
        return self._layout_and_calls[1]

    @cached_property
    def weight_ids(self) -> dict[str, WeightSlot]:
        """Linear name -> weight slot (stable under offloading, unlike ``id(weight)``)."""
        return weight_slots(self.model, self.names)


Strategy = Callable[[AllocationProblem, Any], Allocation]
_STRATEGIES: dict[type[AllocationConfig], Strategy] = {}
S = TypeVar("S", bound=Strategy)


def register_strategy(config_type: type[AllocationConfig]) -> Callable[[S], S]:
    """Decorator: ``fn(problem, options)`` allocates for configs of ``config_type`` (and its subclasses
    that register nothing of their own). A type gets one function."""
    if not (isinstance(config_type, type) and issubclass(config_type, AllocationConfig)):
        raise TypeError(f"register_strategy takes an AllocationConfig subclass, got {config_type!r}")

    def register(fn: S) -> S:
        known = _STRATEGIES.get(config_type)
        if known is not None and (known.__module__, known.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"{config_type.__name__} already has an allocation strategy: "
                             f"{known.__module__}.{known.__qualname__}")
        _STRATEGIES[config_type] = fn
        return fn

    return register


def strategy_for(options: AllocationConfig) -> Strategy:
    """The function registered for the type of ``options`` (or the nearest base class that has one)."""
    for klass in type(options).__mro__:
        if klass is AllocationConfig:
            break
        if klass in _STRATEGIES:
            return _STRATEGIES[klass]
    raise TypeError(
        f"no allocation strategy is registered for {type(options).__name__}: decorate its function with "
        f"wisparse_compile.allocation.register_strategy({type(options).__name__})"
    )


def split_batches(batches: Iterable[Any], config: SparsityConfig) -> tuple[list[Any], list[Any]]:
    """(calibration, held-out) batches: the held-out ones take the strategy's ``held_out_tokens``
    from the end (none for the kept strategies: only the ``Search`` experiment scores on held-out
    tokens). With a single batch there are none to hold out: such a strategy then scores
    candidates on the calibration batch, and says so."""
    batches = list(batches)
    wanted = config.strategy.held_out_tokens if config.sparsity > 0 else 0
    if wanted <= 0:
        return batches, []
    held: list[Any] = []
    tokens = 0
    while len(batches) > 1 and tokens < wanted:
        held.insert(0, batches.pop())
        tokens += batch_tokens(held[0])
    if not held and batches:
        log.warning("one calibration batch only: the allocation search is scored on calibration tokens; "
                    "pass more batches to hold %d tokens out", wanted)
    return batches, held


def allocate(
    model: nn.Module, stats: Mapping[str, Any], calibration: Sequence[Any], validation: Sequence[Any],
    config: SparsityConfig, device: torch.device,
) -> Allocation:
    """Per-linear sparsities whose parameter-weighted mean is ``config.sparsity``, by the strategy
    registered for ``config.strategy`` (at sparsity 0: every linear 0)."""
    options = config.strategy if config.sparsity > 0 else Uniform()
    problem = AllocationProblem(model, stats, calibration, validation, config, device)
    allocation = strategy_for(options)(problem, options)
    allocation.record = {"kind": options.name, **allocation.record}
    return allocation


@register_strategy(Uniform)
def allocate_uniform(problem: AllocationProblem, options: Uniform) -> Allocation:
    """Every linear at the target."""
    return Allocation({n: problem.target for n in problem.names})
