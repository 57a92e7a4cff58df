"""What runs around a compiled graph on every call: the thresholds of the weights actually passed.

The backend (``backend.py``) compiles; this module is what its compiled callables do per call.
``ThresholdFeed`` appends, per call, the thresholds each planned weight carries (``planned.py``),
resolved once per (weights, plan generation), so a plan swap (attach again) takes effect at the next
call without recompiling; ``WeightLayoutChanged`` is what it raises when a weight was swapped under a
graph compiled without module guards; ``watch_for_late_plans`` warns when a dense graph meets
weights that got a plan after compiling.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import planned
from .passes.decisions import RewriteResult


class WeightLayoutChanged(RuntimeError):
    """A compiled graph met a weight of another type, dtype, shape or layout than it was compiled for."""


def weight_layout(weight: Any) -> tuple:
    """What a compiled graph assumes of a weight: its type, dtype, shape and strides."""
    if not isinstance(weight, torch.Tensor):
        return (type(weight),)
    return (type(weight), weight.dtype, tuple(weight.shape), tuple(weight.stride()))


def _describe(layout: tuple) -> str:
    if len(layout) == 1:
        return layout[0].__name__
    kind, dtype, shape, stride = layout
    return f"{kind.__name__} {str(dtype).removeprefix('torch.')} {list(shape)} strides {list(stride)}"


class ThresholdFeed:
    """The thresholds of the weights at fixed argument positions, for a compiled graph's extra inputs.

    Resolved once per (weight objects, ``planned.plan_generation()``): a steady decode step costs one
    identity check of the weight arguments (C-level, no attribute lookups) and gets the same tensor
    objects step to step (CUDA graphs need stable input addresses). The weights of the last
    resolution are held only while their model lives (a weak reference to it drops them). A weight
    with no plan gets zero thresholds (runs dense), and ``on_unplanned`` is called; such calls are
    resolved again each time (the backend warns once about them).

    ``compiled_weights`` (the weights the graph was compiled for) make each resolution check that
    the weights passed still have their type, dtype, shape and strides: Dynamo's guards recompile
    before that could differ, unless the model was compiled with a guard filter that skips module
    guards (``decode_compile_options``); then a weight swapped under the compiled graph (``detach``,
    a new ``weights=`` mode) raises ``WeightLayoutChanged`` instead of running on a wrong layout.
    """

    def __init__(
        self, positions: Sequence[int], examples: Sequence[torch.Tensor], on_unplanned: Callable[[], None],
        compiled_weights: Sequence[torch.Tensor] = (),
    ) -> None:
        self._layouts = [weight_layout(w) for w in compiled_weights]
        self._examples = list(examples)
        self._on_unplanned = on_unplanned
        get = operator.itemgetter(*positions) if positions else (lambda args: ())
        self._weights_of: Callable[[Sequence[Any]], tuple] = (lambda args: (get(args),)) if len(positions) == 1 else get
        self._weights: tuple | None = None  # the weights resolved last, while cacheable
        self._generation = -1
        self._thresholds: tuple[torch.Tensor, ...] = ()
        self._model_refs: list[weakref.ref] = []
        self._zeros: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        weights = self._weights_of(args)
        cached = self._weights
        if cached is None or self._generation != planned.plan_generation() or not all(map(operator.is_, weights, cached)):
            self._resolve(weights)
        return self._thresholds

    def bind(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """``compiled`` called with the thresholds appended to its arguments: ``__call__`` inlined
        into one frame, since this runs before every call of the compiled graph."""
        weights_of, is_, generation = self._weights_of, operator.is_, planned.plan_generation

        def run(*args: Any) -> Any:
            weights = weights_of(args)
            cached = self._weights
            if cached is None or self._generation != generation() or not all(map(is_, weights, cached)):
                self._resolve(weights)
            return compiled(*(args + self._thresholds))

        return run

    def _forget(self, _ref: object = None) -> None:
        self._weights, self._thresholds = None, ()  # the model died: let its weights and thresholds go

    def _resolve(self, weights: tuple) -> None:
        for j, (weight, layout) in enumerate(zip(weights, self._layouts)):
            if weight_layout(weight) != layout:
                raise WeightLayoutChanged(
                    f"wisparse: weight {j} of a compiled graph was {_describe(layout)} when compiled and is now "
                    f"{_describe(weight_layout(weight))} (detached, or attached with another weights= mode). "
                    "Dynamo's guards would recompile, but this model was compiled with a guard filter that skips "
                    "module guards: call torch._dynamo.reset() and compile again after changing weights"
                )
        thresholds: list[torch.Tensor] = []
        models: dict[int, nn.Module] = {}
        unplanned_weights, orphaned = 0, False
        for j, weight in enumerate(weights):
            site = planned.plan_of(weight)
            model = site.model() if site is not None else None
            if model is not None:
                models[id(model)] = model
            elif site is not None:
                orphaned = True  # its model is gone: nothing would let the weight go
            if site is not None:
                thresholds.append(site.thresholds_on(weight.device))
                continue
            unplanned_weights += 1
            t = self._zeros.get((j, weight.device))
            if t is None:
                t = self._zeros[(j, weight.device)] = torch.zeros_like(self._examples[j], device=weight.device)
            thresholds.append(t)
        # cacheable when every weight is planned on a live model (whose death then lets them go)
        cacheable = not unplanned_weights and not orphaned
        self._thresholds = tuple(thresholds)
        self._generation = planned.plan_generation()
        self._weights = weights if cacheable else None
        self._model_refs = [weakref.ref(m, self._forget) for m in models.values()] if cacheable else []
        if unplanned_weights:
            self._on_unplanned()


def with_thresholds(
    compiled: Callable[..., Any], result: RewriteResult, example_inputs: Sequence[Any]
) -> Callable[..., Any]:
    """Append, per call, the thresholds of the weights actually passed.

    ``ThresholdFeed`` resolves them once per (weights, plan generation): a steady decode step adds
    one identity check, and the same threshold tensors every step; a plan swap (attach again)
    takes effect at the next call without recompiling.
    """
    warned = False

    def warn_unplanned() -> None:
        nonlocal warned
        if not warned:
            warned = True
            warnings.warn(
                "wisparse: a graph compiled for a model with a plan is running with weights "
                "that have none; those linears run dense (zero thresholds)",
                stacklevel=4,  # the caller of the bound run (as before the feed)
            )

    compiled_weights = [example_inputs[i] for i in result.threshold_sources]
    return ThresholdFeed(result.threshold_sources, result.threshold_examples, warn_unplanned, compiled_weights).bind(
        compiled
    )


def watch_for_late_plans(compiled: Callable[..., Any], weight_indices: list[int]) -> Callable[..., Any]:
    """A dense graph that later meets planned weights (plan attached after compiling) says so."""
    if not weight_indices:
        return compiled
    seen_generation = -1

    def run(*args: Any) -> Any:
        nonlocal seen_generation
        generation = planned.plan_generation()
        if seen_generation != generation:
            seen_generation = generation
            if any(planned.plan_of(args[i]) is not None for i in weight_indices):
                warnings.warn(
                    "wisparse: this graph was compiled before a plan was attached and runs dense; "
                    "attach the plan before torch.compile, or call torch._dynamo.reset() and compile again",
                    stacklevel=2,
                )
        return compiled(*args)

    return run
